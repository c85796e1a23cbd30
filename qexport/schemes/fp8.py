"""fp8 family: float8_e4m3fn per-row weights, dynamic per-row (per-token) fp8 activations.

Scheme: fp8_e4m3.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import InvalidSchemeError
from .activation import FP8_E4M3_MAX
from ._scheme import Scheme, SchemeMath
from .registry import _register_builtin


class Fp8Math(SchemeMath):
    family = "fp8"
    weight_format = ("float8_e4m3fn", 8)
    weight_roles = ("weight", "weight_scale")
    supported_ops = frozenset({"linear"})
    tolerance = 8e-2

    def validate(self, s: Scheme) -> None:
        super().validate(s)
        if s.granularity not in ("per_channel", "per_tensor"):
            raise InvalidSchemeError(f"{s.name}: granularity={s.granularity!r}; fp8 weights are per_channel (rowwise) or per_tensor")
        if not (-FP8_E4M3_MAX <= s.qmin and s.qmax <= FP8_E4M3_MAX):
            raise InvalidSchemeError(f"{s.name}: qmin/qmax outside float8_e4m3fn range ±{FP8_E4M3_MAX}")
        if not s.symmetric or s.qmin != -s.qmax:
            # the scale is amax / qmax with no zero point: an asymmetric range would only clip one sign
            raise InvalidSchemeError(
                f"{s.name}: fp8 weights are symmetric (symmetric=True, qmin=-qmax), got symmetric={s.symmetric}, "
                f"qmin={s.qmin}, qmax={s.qmax}")
        if s.activation not in ("none", "dynamic") or (s.activation == "dynamic" and s.act_dtype != "float8_e4m3fn"):
            raise InvalidSchemeError(f"{s.name}: fp8 activations are dynamic float8_e4m3fn or none")

    def quantize_weight(self, s: Scheme, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        w = weight.detach().float().reshape(weight.shape[0], -1)
        amax = w.abs().amax(1) if s.granularity == "per_channel" else w.abs().amax().reshape(1)
        scale = (amax / s.qmax).clamp(min=torch.finfo(torch.float32).eps)
        q = (w / scale[:, None]).clamp(s.qmin, s.qmax).to(torch.float8_e4m3fn)
        return {"weight": q.reshape(weight.shape), "weight_scale": scale}

    def dequantize_weight(self, s: Scheme, t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return t["weight"].float() * t["weight_scale"].reshape(-1, *([1] * (len(shape) - 1)))


FP8 = Fp8Math()
FP8_E4M3 = Scheme(
    name="fp8_e4m3", family="fp8", weight_dtype="float8_e4m3fn", bits=8, granularity="per_channel",
    symmetric=True, qmin=-FP8_E4M3_MAX, qmax=FP8_E4M3_MAX, activation="dynamic", act_dtype="float8_e4m3fn",
    act_granularity="per_token", act_symmetric=True, compute_dtype="bfloat16",
)
_register_builtin(FP8_E4M3, FP8)
