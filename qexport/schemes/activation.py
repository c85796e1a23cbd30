"""Activation quantization shared by every family (written once; families only pick it by fields).

All functions are fake-quant (quantize then dequantize in float) so the reference stays runnable
everywhere; backends replace them with real integer/fp8 kernels chosen by the scheme.
"""

from __future__ import annotations

import torch

EPS = torch.finfo(torch.float32).eps
INT8_MIN, INT8_MAX = -128, 127
FP8_E4M3_MAX = 448.0


def int8_asym_qparams(mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int8 scale/zero point covering [mn, mx] (and 0, so zero is exact)."""
    mn = mn.clamp(max=0)
    mx = mx.clamp(min=0)
    scale = ((mx - mn) / (INT8_MAX - INT8_MIN)).clamp(min=EPS)
    zero_point = (INT8_MIN - torch.round(mn / scale)).clamp(INT8_MIN, INT8_MAX)
    return scale, zero_point


def quantize_int8(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """int8 codes of x, still in x's float dtype (kernels that take real int8 call `.to(torch.int8)`)."""
    return torch.clamp(torch.round(x / scale) + zero_point, INT8_MIN, INT8_MAX)


def fake_quant_int8(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (quantize_int8(x, scale, zero_point) - zero_point) * scale


def dynamic_int8_qparams(x: torch.Tensor, per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of dynamic asymmetric int8 over float x's range, per token (last dim) or
    per tensor: what every kernel quantizing activations at run time must reproduce."""
    if per_token:
        return int8_asym_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True))
    return int8_asym_qparams(x.amin(), x.amax())


def dynamic_int8(x: torch.Tensor, per_token: bool) -> torch.Tensor:
    """Per-token (last dim) or per-tensor dynamic asymmetric int8 fake quantization."""
    xf = x.float()
    scale, zp = dynamic_int8_qparams(xf, per_token)
    return fake_quant_int8(xf, scale, zp).to(x.dtype)


def static_int8(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return fake_quant_int8(x.float(), scale, zero_point.float()).to(x.dtype)


def quantize_fp8(x: torch.Tensor, per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic float8_e4m3fn quantization: (codes, fp32 scale), the scale per row (token) or per tensor."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True) if per_token else xf.abs().amax()
    scale = (amax / FP8_E4M3_MAX).clamp(min=EPS)
    return (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale


def dynamic_fp8(x: torch.Tensor, per_token: bool) -> torch.Tensor:
    """Per-row (token) or per-tensor dynamic float8_e4m3fn fake quantization."""
    q, scale = quantize_fp8(x, per_token)
    return (q.float() * scale).to(x.dtype)
