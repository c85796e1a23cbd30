"""CPU kernels for the AOTInductor backend (see `kernels/__init__.py` for the contract).

Measured on the dev box (docs/benchmarks/aoti_cpu.md): the weight-only families are memory-bound,
so the kernel that reads the quantized bytes directly wins; everything a kernel here does not take
falls back to Inductor's fusion of the region.
"""

from __future__ import annotations

import torch

from ...schemes._packing import unpack_uint4
from . import Decline, KernelChoice, KernelContext, register_kernel

aten = torch.ops.aten

# Activation dtypes the weight-only aten kernels are fast with. With fp32 activations
# aten._weight_int8pack_mm is 18x slower than with bf16 (FINDINGS.md), slower than Inductor's fusion.
_FAST_WEIGHT_ONLY_DTYPES = (torch.bfloat16, torch.float16)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


@register_kernel("int8", "cpu", "linear")
def int8_weight_only_int8pack_mm(ctx: KernelContext) -> KernelChoice | Decline | None:
    scheme = ctx.scheme
    if scheme.activation != "none":
        return None
    cd = scheme.torch_compute_dtype
    if cd not in _FAST_WEIGHT_ONLY_DTYPES:
        return Decline(f"compute_dtype={scheme.compute_dtype}: _weight_int8pack_mm is slow with fp32 activations")
    if not ctx.input_dtype.is_floating_point:
        return Decline(f"input dtype {ctx.input_dtype} is not floating point")
    weight = ctx.tensor("weight")
    n = weight.shape[0]
    # Per-tensor schemes store one scale; the kernel takes one per output channel in the activation dtype.
    scale = ctx.tensor("weight_scale").reshape(-1).expand(n).to(cd).contiguous()
    operands: list = ["weight", ("weight_scale_" + str(cd).removeprefix("torch."), scale)]
    if ctx.has("bias"):
        operands.append(("bias_" + str(cd).removeprefix("torch."), ctx.tensor("bias").to(cd)))

    def body(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, *bias: torch.Tensor) -> torch.Tensor:
        y = aten._weight_int8pack_mm(_as_2d(x).to(cd), w, s)
        if bias:
            y = y + bias[0]
        return y.reshape(*x.shape[:-1], n).to(x.dtype)

    return KernelChoice(
        name="aten._weight_int8pack_mm",
        why=f"reads int8 weights directly, {scheme.compute_dtype} activations (the scheme's compute dtype)",
        body=body,
        operands=operands,
    )


@register_kernel("int4", "cpu", "linear")
def int4_weight_int4pack_mm_for_cpu(ctx: KernelContext) -> KernelChoice | Decline | None:
    scheme = ctx.scheme
    cd = scheme.torch_compute_dtype
    if not ctx.input_dtype.is_floating_point:
        return Decline(f"input dtype {ctx.input_dtype} is not floating point")
    weight = ctx.tensor("weight")
    n, k = weight.shape[0], weight.shape[1] * 2
    gs = scheme.group_size
    # Repacked once, here: the tinygemm layout and its (scale, zero) pairs become buffers of the program.
    codes = unpack_uint4(weight).to(torch.int32)
    packed = aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # innerKTiles is unused on CPU
    scale = ctx.tensor("weight_scale").float()
    zp = ctx.tensor("weight_zero_point").float()
    # tinygemm dequantizes w = (q - 8) * s + z; the scheme's w = (q - zp) * s, so z = (8 - zp) * s.
    scales_and_zeros = torch.stack([scale, (8 - zp) * scale], -1).transpose(0, 1).contiguous().to(cd)
    operands: list = [("weight_int4pack", packed), ("weight_scales_and_zeros", scales_and_zeros)]
    if ctx.has("bias"):
        operands.append(("bias_" + str(cd).removeprefix("torch."), ctx.tensor("bias").to(cd)))

    def body(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, *bias: torch.Tensor) -> torch.Tensor:
        y = aten._weight_int4pack_mm_for_cpu(_as_2d(x).to(cd).contiguous(), w, gs, sz)
        if bias:
            y = y + bias[0]
        return y.reshape(*x.shape[:-1], n).to(x.dtype)

    assert k == scheme.group_size * scale.shape[1]
    return KernelChoice(
        name="aten._weight_int4pack_mm_for_cpu",
        why=f"tinygemm int4 layout packed at compile time, {scheme.compute_dtype} activations",
        body=body,
        operands=operands,
    )
