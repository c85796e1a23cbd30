"""int4 family: groupwise asymmetric uint4 weights with zero points, two per byte; float activations.

Scheme: int4_weight_only (group_size 32 / 64 / 128 / 256).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import InvalidSchemeError
from .packing import grouped, pack_uint4, unpack_uint4
from ._scheme import Scheme, SchemeMath
from .registry import _register_builtin

GROUP_SIZES = (32, 64, 128, 256)


class Int4Math(SchemeMath):
    family = "int4"
    weight_roles = ("weight", "weight_scale", "weight_zero_point")
    supported_ops = frozenset({"linear", "embedding"})
    tolerance = 5e-2

    def validate(self, s: Scheme) -> None:
        super().validate(s)
        if s.bits != 4 or s.weight_dtype != "uint4":
            raise InvalidSchemeError(f"{s.name}: bits={s.bits} ({s.weight_dtype}) is not supported; int4 schemes use bits=4")
        if s.granularity != "per_group" or s.group_size not in GROUP_SIZES:
            raise InvalidSchemeError(
                f"{s.name}: group_size={s.group_size} is not supported; choose one of {GROUP_SIZES}"
            )
        if (s.qmin, s.qmax) != (0, 15):
            raise InvalidSchemeError(f"{s.name}: uint4 codes span qmin=0..qmax=15, got {s.qmin}..{s.qmax}")
        if s.activation != "none":
            raise InvalidSchemeError(f"{s.name}: int4 schemes are weight-only (activation='none')")

    def quantize_weight(self, s: Scheme, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        g = grouped(weight.detach().float(), s.group_size)
        eps = torch.finfo(torch.float32).eps
        if s.symmetric:
            scale = (g.abs().amax(-1) / 7).clamp(min=eps)
        else:
            mn, mx = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
            scale = ((mx - mn) / 15).clamp(min=eps)
        scale = scale.to(torch.bfloat16).float()
        zero = torch.full_like(scale, 8) if s.symmetric else torch.clamp(torch.round(-mn / scale), 0, 15)
        codes = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, 15)
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
# bf16 activations: aten._weight_int4pack_mm(_for_cpu) and tinygemm take bf16 (FINDINGS.md).
INT4_WEIGHT_ONLY = Scheme(
    name="int4_weight_only", family="int4", weight_dtype="uint4", bits=4, granularity="per_group",
    group_size=128, symmetric=False, qmin=0, qmax=15, compute_dtype="bfloat16",
)
_register_builtin(INT4_WEIGHT_ONLY, INT4)
