"""int4 family: groupwise uint4 weights with zero points, two per byte; float activations or dynamic
per-token int8 activations.

Schemes: int4_weight_only (asymmetric, group_size 32 / 64 / 128 / 256), int8_dynamic_int4_weight
("8da4w": symmetric weights, zero point 8, as XNNPACK's qd8 x qb4w kernels and torchao's 8da4w take
them). Codes are chosen by round to nearest, HQQ or GPTQ (`algorithm`, schemes/algorithms.py); all
three fill the same grid, which dequantize_weight reads.
"""

from __future__ import annotations

from functools import partial
from typing import Mapping

import torch

from ..errors import InvalidSchemeError
from . import algorithms as alg
from .packing import grouped, pack_uint4, unpack_uint4
from ._scheme import Scheme, SchemeMath
from .registry import _register_builtin

GROUP_SIZES = (32, 64, 128, 256)

_QPARAMS = {"rtn": alg.rtn_qparams, "hqq": alg.hqq_qparams}


class Int4Math(SchemeMath):
    family = "int4"
    weight_format = ("uint4", 4)
    weight_roles = ("weight", "weight_scale", "weight_zero_point")
    supported_ops = frozenset({"linear", "embedding"})
    tolerance = 5e-2
    algorithms = ("rtn", "hqq", "gptq")
    calibration_free_algorithm = "hqq"

    def validate(self, s: Scheme) -> None:
        super().validate(s)
        if s.granularity != "per_group" or s.group_size not in GROUP_SIZES:
            raise InvalidSchemeError(
                f"{s.name}: group_size={s.group_size} is not supported; choose one of {GROUP_SIZES}"
            )
        if (s.qmin, s.qmax) != (0, 15):
            raise InvalidSchemeError(f"{s.name}: uint4 codes span qmin=0..qmax=15, got {s.qmin}..{s.qmax}")
        if s.activation not in ("none", "dynamic") or (
            s.activation == "dynamic" and (s.act_dtype != "int8" or s.act_granularity != "per_token")
        ):
            raise InvalidSchemeError(
                f"{s.name}: int4 schemes take float activations (activation='none') or dynamic per-token int8 "
                f"ones (int8_dynamic_int4_weight)"
            )

    def quantize_weight(
        self, s: Scheme, weight: torch.Tensor, hessian: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        w = weight.detach().float().reshape(weight.shape[0], -1)
        if s.algorithm == "gptq":
            if hessian is None:
                raise InvalidSchemeError(f"{s.name}: algorithm='gptq' needs the layer's calibration Hessian")
            codes, scale, zero = alg.gptq(w, hessian, s.group_size, partial(alg.hqq_qparams, symmetric=s.symmetric))
        else:
            g = grouped(w, s.group_size)
            scale, zero = _QPARAMS[s.algorithm](g, s.symmetric)
            codes = alg.grid_codes(g, scale, zero)
        return {
            "weight": pack_uint4(codes.reshape(weight.shape[0], -1)),
            # bf16 scales (as torchao/tinygemm keep them): with f32 scales the metadata alone is 1/8 of
            # the 4-bit codes at group 32 and the artifact misses 0.16x of fp32; the rounding stays far
            # below one int4 step. Codes are computed against the rounded scale, so it is exact.
            "weight_scale": scale.to(torch.bfloat16),
            "weight_zero_point": zero.to(torch.uint8),
        }

    def dequantize_weight(self, s: Scheme, t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        codes = grouped(unpack_uint4(t["weight"]), s.group_size).float()
        w = (codes - t["weight_zero_point"].float()[..., None]) * t["weight_scale"].float()[..., None]
        return w.reshape(shape)


INT4 = Int4Math()
_COMMON = dict(family="int4", weight_dtype="uint4", bits=4, granularity="per_group", qmin=0, qmax=15)
# bf16 activations: aten._weight_int4pack_mm(_for_cpu) and tinygemm take bf16 (FINDINGS.md).
INT4_WEIGHT_ONLY = Scheme(name="int4_weight_only", group_size=128, symmetric=False, compute_dtype="bfloat16", **_COMMON)
# ExecuTorch's Llama recipe (8da4w, -G 128): per-token asymmetric int8 activations (XNNPACK's qd8) x
# symmetric int4 weights (its qb4w blocks: bf16 scales, no per-block zero point); fp32 compute, as the
# qd8-f32-qb4w kernels run.
INT8_DYNAMIC_INT4_WEIGHT = Scheme(
    name="int8_dynamic_int4_weight", group_size=128, symmetric=True, activation="dynamic", act_dtype="int8",
    act_granularity="per_token", act_symmetric=False, compute_dtype="float32", **_COMMON,
)
for _s in (INT4_WEIGHT_ONLY, INT8_DYNAMIC_INT4_WEIGHT):
    _register_builtin(_s, INT4)
