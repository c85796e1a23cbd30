"""torchao's own versions of our quantized variants, built the same way: ONE AOTInductor package per variant.

bench_cuda.py times each qexport variant against the bf16 AOTI package. This module answers the obvious
next question -- is that faster than what torchao already gives a user? -- so each torchao row is
built from the same bf16 model, exported with the same dynamic M and compiled to a single package, and
sits beside the qexport variant it claims to match (the second element of each TORCHAO_VARIANTS entry).
torchao ships its schemes as tensor subclasses (`quantize_`), not as graph ops; where torch.export or
AOTI cannot lower a subclass, the row falls back to torch.compile and says so in its `how`, because
a number from another route must not be read as a package number.

torchao is imported lazily: a machine without it can still import this module and print the reason.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

TORCHAO_VARIANTS: list[tuple[str, str]] = [
    ("torchao int8 weight-only", "int8_weight_only"),
    ("torchao int4 g128 (tinygemm)", "int4_weight_only g128"),
    ("torchao fp8 rowwise dynamic", "fp8_e4m3"),
]

# torchao's recommended_inductor_config_setter(), which quantize_ calls when set_inductor_config=True.
# Called, it writes process-wide inductor config (and on torchao 0.17 the fp32 matmul precision) that
# would then leak into every qexport package compiled later in the same run; passed per compile instead,
# torchao gets the settings it recommends and nothing else does.
_INDUCTOR: dict[str, Any] = {
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "force_fuse_int_mm_with_mul": True,
}


def _configs(label: str) -> list[Any]:
    """torchao configs for `label`, in the order to try them: the first that quantizes is used."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    if label == "torchao int8 weight-only":
        # version 2 (Int8Tensor) explicitly: 0.17 defaults to the deprecated version 1 (AffineQuantizedTensor),
        # 0.18 removed version 1, so naming 2 gives the same tensor subclass on both.
        return [Int8WeightOnlyConfig(version=2, set_inductor_config=False)]
    if label == "torchao int4 g128 (tinygemm)":
        # The default packing (PLAIN, Int4Tensor) needs the mslk package's kernels, not tinygemm;
        # tile_packed_to_4d is the tinygemm layout (aten._weight_int4pack_mm) in 0.17 and 0.18, and its
        # from_hp requires a CUDA device of SM >= 8.0, so on CPU this row fails rather than mislabels.
        # version=1 is no candidate: both releases assert version == 2 for int4.
        return [Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d",
                                     set_inductor_config=False)]
    if label == "torchao fp8 rowwise dynamic":
        # kernel_preference AUTO: mslk's f8f8bf16_rowwise where mslk is installed (the package then needs it
        # at load), else torch._scaled_mm.
        return [Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)]
    raise KeyError(f"unknown torchao variant {label!r}; known: {[v for v, _ in TORCHAO_VARIANTS]}")


def available() -> str | None:
    """None when torchao imports and has the configs; else a one-line reason."""
    try:
        import torchao
    except ImportError as e:
        return f"torchao is not installed ({e})"
    try:
        for label, _ in TORCHAO_VARIANTS:
            _configs(label)
    except Exception as e:  # a renamed config or argument: report it, the bench goes on without torchao
        return f"torchao {getattr(torchao, '__version__', '?')} lacks a config: {type(e).__name__}: {e}"[:200]
    return None


def _quantized(label: str, model: nn.Module) -> tuple[nn.Module, str]:
    from torchao.quantization import quantize_

    errors = []
    for config in _configs(label):
        qm = copy.deepcopy(model)
        try:
            quantize_(qm, config)
            return qm, type(config).__name__
        except Exception as e:
            errors.append(f"{type(config).__name__}: {type(e).__name__}: {e}")
    raise RuntimeError(f"no torchao config quantizes {label!r}: " + " | ".join(errors))


def build(label: str, model: nn.Module, example: torch.Tensor, dynamic_shapes: Any,
          package_path: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """(callable, how): torchao's `label` as one AOTI package at `package_path`, or torch.compile if that fails.

    The device is the one `model` and `example` are on; `model` itself is left unquantized.
    """
    qm, config_name = _quantized(label, model)
    with torch.no_grad():
        try:
            ep = torch.export.export(qm, (example,), dynamic_shapes=dynamic_shapes)
            torch._inductor.aoti_compile_and_package(ep, package_path=package_path, inductor_configs=_INDUCTOR)
            # Single-threaded, as qexport's CUDA packages load: the default runner cannot be graph-captured.
            runner = torch._inductor.aoti_load_package(package_path, run_single_threaded=True)
            return runner, f"{config_name} + quantize_ + export + AOTI"
        except Exception as e:  # a subclass export/AOTI cannot lower: still time torchao, on its other route
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:80]
    compiled = torch.compile(qm, dynamic=True, options=_INDUCTOR)
    return compiled, f"{config_name} + quantize_ + torch.compile (AOTI export failed: {reason})"
