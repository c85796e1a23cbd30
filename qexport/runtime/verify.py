"""`verify`: run artifacts on the same inputs as their reference program and compare outputs against
the tolerance of the reference's schemes (and, where the runtime exposes them, region by region)."""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from serializers.files import check_readable

from ..errors import ArtifactError, QExportError, UnknownSchemeError
from .loaders import artifact_kind, first_line, load, load_program, pinned
from .runner import Flat, describe_inputs, input_mismatch, make_inputs, program_inputs, program_runner, region_outputs

aten = torch.ops.aten

#: used when a program has no quantized region (an fp32 model against its own lowering)
FLOAT_TOLERANCE = 1e-3
#: an artifact within this many times the reference's own spread passes (see `reference_spread`)
SPREAD_FACTOR = 2.0


@dataclass
class RegionError:
    name: str
    module_path: str
    max_abs: float
    rel: float


@dataclass
class VerifyResult:
    path: Path
    kind: str
    tolerance: float
    max_abs: float | None = None
    rel: float | None = None
    error: str | None = None
    regions: list[RegionError] | None = None
    #: relative error against the unquantized (fp32) program's outputs, when verify had one
    rel_vs_baseline: float | None = None
    #: how far the reference itself moves when its GEMMs are computed more exactly (`reference_spread`)
    spread: float | None = None

    @property
    def within_tolerance(self) -> bool:
        return self.error is None and self.rel is not None and self.rel <= self.tolerance

    @property
    def within_spread(self) -> bool:
        """Over the tolerance, but no further from the reference than the reference is from itself."""
        return (self.error is None and self.rel is not None and self.spread is not None
                and not self.within_tolerance and self.rel <= SPREAD_FACTOR * self.spread)

    @property
    def passed(self) -> bool:
        return self.within_tolerance or self.within_spread


def tolerance_for(ep: torch.export.ExportedProgram) -> tuple[float, list[str]]:
    """The loosest documented tolerance among the program's schemes (and their names)."""
    from ..regions import regions
    from ..schemes import math_for

    schemes = {r.scheme.name: r.scheme for r in regions(ep) if r.scheme is not None}
    if not schemes:
        return FLOAT_TOLERANCE, []
    try:
        return max(math_for(s).tolerance for s in schemes.values()), sorted(schemes)
    except UnknownSchemeError as e:  # a user family: its tolerance lives with its math, in the user's module
        raise UnknownSchemeError(f"{e}; or give the tolerance yourself (qexport verify --tolerance REL, "
                                 f"runners.verify(..., tolerance=REL))") from None


class _Float64Gemms(TorchDispatchMode):
    """Every float matmul / convolution accumulated in float64 and rounded once: the reference computed
    by another, better GEMM."""

    supports_higher_order_operators = True  # run each region's body under the mode, as eager does
    _OPS = frozenset({aten.linear.default, aten.matmul.default, aten.mm.default, aten.addmm.default,
                      aten.bmm.default, aten.baddbmm.default, aten.convolution.default})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            with self:
                return args[0](*args[1:])
        if func in self._OPS and isinstance(args[0], torch.Tensor) and args[0].dtype in _FLOATS:
            wide = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            return func(*wide, **kwargs).to(args[0].dtype)
        return func(*args, **kwargs)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def reference_spread(ref: torch.export.ExportedProgram, flat: Sequence[torch.Tensor],
                     expected: Sequence[torch.Tensor]) -> float | None:
    """How far the reference moves when its GEMMs are computed more exactly (float64), relative to its
    max-abs output; None for a program whose regions do not round activations. A scheme that rounds
    activations at every layer turns a last-bit difference of one GEMM into a whole quantization step
    of the next layer's input, and a deep model carries it on: MiniLM int8_dynamic moves 5e-2 under
    this, so no artifact can be held closer to it than that."""
    from ..regions import regions

    if all(r.scheme is None or r.scheme.is_weight_only for r in regions(ref)):
        return None
    with _Float64Gemms():
        wide = program_runner(ref)([x.clone() for x in flat])
    return compare(expected, wide)[1]


def compare(expected: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(max-abs error, max-abs error relative to the expected outputs' max-abs) over all outputs.
    Raises ArtifactError when the outputs do not line up (count or shape)."""
    if len(expected) != len(got):
        raise ArtifactError(f"returned {len(got)} outputs, the reference {len(expected)}")
    max_abs, scale = 0.0, 0.0
    for i, (e, g) in enumerate(zip(expected, got)):
        if tuple(e.shape) != tuple(g.shape):
            raise ArtifactError(f"output {i} has shape {tuple(g.shape)}, the reference {tuple(e.shape)}")
        e, g = e.detach().float(), g.detach().float()
        if e.numel():
            max_abs = max(max_abs, (e - g).abs().max().item())
            scale = max(scale, e.abs().max().item())
    return max_abs, max_abs / max(scale, 1e-12)


def verify(
    reference: "str | PathLike[str] | torch.export.ExportedProgram",
    artifacts: Sequence["str | PathLike[str]"],
    *,
    seed: int = 0,
    per_region: bool = True,
    tolerance: float | None = None,
    on_artifact: Callable[[Path], Any] | None = None,
    expected_sha256: "Mapping[str | PathLike[str], str] | None" = None,
    baseline: "str | PathLike[str] | torch.export.ExportedProgram | None" = None,
) -> list[VerifyResult]:
    """Run each artifact on the same inputs as the reference program (generated from its input
    specs) and compare outputs, against the loosest tolerance of the reference's schemes.

    An artifact that cannot be loaded or run gives a failed result with the reason; a missing
    path is an error before any work. Region-by-region errors are reported where the artifact
    exposes its regions: a `.pt2`, an `.onnx` written with keep_regions=True (AOTI and ExecuTorch
    fuse them away). Where the reference's schemes round activations, an artifact over the tolerance
    still passes when it is within SPREAD_FACTOR times the reference's own spread
    (`reference_spread`: its outputs with float64 GEMMs). `tolerance` replaces the schemes' bound (and
    the spread): the family tolerances bound one region, and errors compound over a deep model. `expected_sha256` maps
    paths (the reference's too) to the SHA-256 each must have (see `load`). `baseline` (the unquantized
    program, e.g. the demo's model_fp32.pt2) adds each artifact's error against the float model
    (`rel_vs_baseline`): what quantization plus lowering cost, next to what lowering alone cost."""
    if tolerance is not None and not tolerance > 0:
        raise ArtifactError(f"tolerance must be positive, got {tolerance}")
    paths = [check_readable(a) for a in artifacts]
    if isinstance(reference, torch.export.ExportedProgram):
        ref = reference
    else:
        rp = check_readable(reference)
        kind = artifact_kind(rp)
        if kind != "pt2":
            raise ArtifactError(f"{rp}: the reference must be an exported program (.pt2 from qexport export), not {kind}")
        ref = load_program(rp, pinned(expected_sha256, rp))
    tol = tolerance if tolerance is not None else tolerance_for(ref)[0]
    infos = program_inputs(ref)
    flat = make_inputs(infos, seed)
    ref_runner = program_runner(ref)
    expected = ref_runner(flat)
    ref_regions = region_outputs(ref, flat) if per_region else {}
    spread = reference_spread(ref, flat, expected) if tolerance is None else None
    float_out = None
    if baseline is not None:
        float_out = _baseline_outputs(baseline, flat, expected, expected_sha256)
    results = []
    for p in paths:
        if on_artifact is not None:
            on_artifact(p)
        res = VerifyResult(p, "?", tol, spread=spread)
        try:
            runner = load(p, expected_sha256=pinned(expected_sha256, p))
            res.kind = runner.kind
            if (why := input_mismatch(runner, flat)) is not None:
                raise ArtifactError(f"{why}; the reference takes {describe_inputs(flat)}: is it made from another model?")
            got = runner([x.clone() for x in flat])
            res.max_abs, res.rel = compare(expected, got)
            if float_out is not None:
                res.rel_vs_baseline = compare(float_out, got)[1]
            if per_region and ref_regions and runner.region_call is not None:
                res.regions = _region_errors(ref_regions, runner.region_outputs(flat))
        except QExportError as e:
            res.error = str(e)
        except Exception as e:  # a runtime failing on this input is a verification failure, not a crash
            res.error = f"{type(e).__name__}: {first_line(e)}"
        results.append(res)
    return results


def _baseline_outputs(baseline: "str | PathLike[str] | torch.export.ExportedProgram", flat: Flat, expected: Flat,
                      expected_sha256: "Mapping[str | PathLike[str], str] | None") -> Flat:
    """The baseline program's outputs on the reference's inputs; ArtifactError, before any artifact runs,
    for a baseline of another model (its run failed on a torch guard with a traceback, or every
    artifact's row failed on the baseline's output shapes)."""
    if isinstance(baseline, torch.export.ExportedProgram):
        runner = program_runner(baseline)
    else:
        bp = check_readable(baseline)
        runner = program_runner(load_program(bp, pinned(expected_sha256, bp)), bp)
    why = input_mismatch(runner, flat)
    if why is None:
        out = runner([x.clone() for x in flat])
        try:
            compare(expected, out)
            return out
        except ArtifactError as e:
            why = str(e)
    raise ArtifactError(f"baseline {runner.path}: {why}; the reference takes {describe_inputs(flat)}: give the "
                        f"unquantized program of the reference's model")


def _region_errors(ref: dict, got: dict) -> list[RegionError]:
    out = []
    for key, (name, e) in ref.items():
        if key not in got:
            continue
        g = got[key][1]
        if e.shape != g.shape:
            continue
        max_abs, rel = compare([e], [g])
        out.append(RegionError(name, key, max_abs, rel))
    return out


__all__ = ["FLOAT_TOLERANCE", "SPREAD_FACTOR", "RegionError", "VerifyResult", "compare", "reference_spread", "tolerance_for",
           "verify"]
