"""int8 family: per-channel symmetric int8 weights; activations none / dynamic / static.

Schemes: int8_weight_only, int8_dynamic, int8_static. Codes are chosen by round to nearest of absmax
(rtn), the least-squares scale (mse, calibration-free) or GPTQ (`algorithm`, schemes/algorithms.py);
all three fill the same grid, which dequantize_weight reads.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import InvalidSchemeError
from . import algorithms as alg
from ._scheme import Scheme, SchemeMath
from .registry import _register_builtin


class Int8Math(SchemeMath):
    family = "int8"
    weight_format = ("int8", 8)
    weight_roles = ("weight", "weight_scale")
    tolerance = 2e-2
    # 7-bit weights, named as onnxruntime's quantizer names them: with every code within +-64 a u8 x s8
    # pair sum fits 16 bits (2 * 255 * 64 <= 32767), so the integer kernels of CPUs without VNNI
    # (onnxruntime's on AVX2) cannot saturate and ONNX files keep its faster u8 x s8 kernels on every target.
    shorthands = {"reduce_range": {"qmin": -64, "qmax": 64}}
    algorithms = ("rtn", "mse", "gptq")
    calibration_free_algorithm = "mse"

    def validate(self, s: Scheme) -> None:
        super().validate(s)
        if s.granularity not in ("per_channel", "per_tensor"):
            raise InvalidSchemeError(f"{s.name}: granularity={s.granularity!r}; int8 weights are per_channel or per_tensor")
        if not s.symmetric:
            raise InvalidSchemeError(f"{s.name}: int8 weights are symmetric (symmetric=True); use int4_weight_only for zero points")
        if not (-128 <= s.qmin and s.qmax <= 127) or not (float(s.qmin).is_integer() and float(s.qmax).is_integer()):
            raise InvalidSchemeError(f"{s.name}: qmin/qmax {s.qmin}/{s.qmax} must be whole codes within int8 [-128, 127]")
        if s.activation == "dynamic" and s.act_dtype != "int8":
            raise InvalidSchemeError(f"{s.name}: dynamic activations of the int8 family are int8")

    def quantize_weight(
        self, s: Scheme, weight: torch.Tensor, hessian: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        w = weight.detach().float().reshape(weight.shape[0], -1)
        rows = w if s.granularity == "per_channel" else w.reshape(1, -1)
        if s.algorithm == "rtn":
            scale = (rows.abs().amax(1) / s.qmax).clamp(min=torch.finfo(torch.float32).eps)
        else:
            scale = alg.mse_scale(rows, s.qmin, s.qmax)
        if s.algorithm == "gptq":
            if hessian is None:
                raise InvalidSchemeError(f"{s.name}: algorithm='gptq' needs the layer's calibration Hessian")
            col = scale.expand(w.shape[0])[:, None]  # one group of K per row
            q, _, _ = alg.gptq(w, hessian, w.shape[1], lambda _g: (col, torch.zeros_like(col)), s.qmin, s.qmax)
        else:
            q = alg.symmetric_codes(w, scale, s.qmin, s.qmax)
        return {"weight": q.to(torch.int8).reshape(weight.shape), "weight_scale": scale}

    def dequantize_weight(self, s: Scheme, t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        scale = t["weight_scale"].reshape(-1, *([1] * (len(shape) - 1)))
        return t["weight"].float() * scale


INT8 = Int8Math()
_COMMON = dict(family="int8", weight_dtype="int8", bits=8, granularity="per_channel", symmetric=True, qmin=-127, qmax=127)

# bf16 activations: the CPU and CUDA int8 weight-only kernels are fast only in bf16 (fp32 activations
# make aten._weight_int8pack_mm 18x slower on CPU, see FINDINGS.md).
INT8_WEIGHT_ONLY = Scheme(name="int8_weight_only", compute_dtype="bfloat16", **_COMMON)
# Asymmetric per-token int8 activations: XNNPACK's qd8 and ExecuTorch's choose_qparams_per_token_asymmetric.
INT8_DYNAMIC = Scheme(
    name="int8_dynamic", activation="dynamic", act_dtype="int8", act_granularity="per_token", act_symmetric=False, **_COMMON
)
# Per-tensor asymmetric int8 inputs and outputs from calibration, as PT2E's XNNPACKQuantizer does.
INT8_STATIC = Scheme(
    name="int8_static", activation="static", act_dtype="int8", act_granularity="per_tensor", act_symmetric=False, **_COMMON
)

for _s in (INT8_WEIGHT_ONLY, INT8_DYNAMIC, INT8_STATIC):
    _register_builtin(_s, INT8)
