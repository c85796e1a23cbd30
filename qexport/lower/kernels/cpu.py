"""CPU kernels for the AOTInductor backend (see `kernels/__init__.py` for the contract).

Measured on the dev box (docs/benchmarks/aoti_cpu.md): the weight-only families are memory-bound,
so the kernel that reads the quantized bytes directly wins; everything a kernel here does not take
falls back to Inductor's fusion of the region.
"""

from __future__ import annotations

import torch

from ...schemes import _activation as act, math_for
from ...schemes._region import apply_op, quantize_input
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


@register_kernel("int8", "cpu", "linear")
def int8_activations_int_mm(ctx: KernelContext) -> KernelChoice | Decline | None:
    """int8 x int8 -> int32 (aten._int_mm) for dynamic and static int8 activations.

    With asymmetric activations x = (qx - zx) * sx and symmetric weights w = qw * sw,
    x @ w.T = sx * sw * (qx @ qw.T - zx * colsum(qw)): the zero point costs one rank-1 correction
    with the weight's column sums, computed here once.
    """
    scheme = ctx.scheme
    if scheme.activation not in ("dynamic", "static") or scheme.act_dtype != "int8":
        return None
    if ctx.input_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return Decline(f"input dtype {ctx.input_dtype} is not floating point")
    weight = ctx.tensor("weight")
    n = weight.shape[0]
    w_scale = ctx.tensor("weight_scale").float().reshape(-1).expand(n).contiguous()
    colsum = weight.to(torch.int32).sum(1)
    operands: list = ["weight", ("weight_scale_f32", w_scale), ("weight_colsum", colsum)]
    static = scheme.activation == "static"
    if static:
        operands += ["input_scale", "input_zero_point", "output_scale", "output_zero_point"]
    if ctx.has("bias"):
        operands.append(("bias_f32", ctx.tensor("bias").float()))
    per_token = scheme.act_granularity == "per_token"

    def body(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, cs: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        x2 = _as_2d(x).float()
        if static:
            s, zp, out_s, out_zp, *bias = rest
            zp = zp.float()
        else:
            bias = list(rest)
            s, zp = act.dynamic_int8_qparams(x2, per_token)
        q = act.quantize_int8(x2, s, zp).to(torch.int8)
        acc = aten._int_mm(q, w.t()) - zp.to(torch.int32) * cs
        y = acc.float() * (s * ws)
        if bias:
            y = y + bias[0]
        if static:
            y = act.static_int8(y, out_s, out_zp)
        return y.reshape(*x.shape[:-1], n).to(x.dtype)

    return KernelChoice(
        name="aten._int_mm",
        why=f"int8 x int8 -> int32 with {scheme.activation} {scheme.act_granularity} activations, zero point folded via weight column sums",
        body=body,
        operands=operands,
    )


@register_kernel("fp8", "cpu", "linear")
def fp8_weights_decoded_at_compile_time(ctx: KernelContext) -> KernelChoice | Decline | None:
    """fp8 weights widened once, here, to the compute dtype; activations keep the scheme's fp8 rounding.

    Why: this CPU has no fp8 matmul (aten._scaled_mm on CPU took ~200 ms for one 4096x4096 layer)
    and Inductor's fusion re-decodes every weight on every call (about 7x slower than fp32 at batch 1).
    fp8 -> bf16 is exact, so numerics equal the reference; the package holds 2 bytes per weight.
    """
    scheme = ctx.scheme
    cd = scheme.torch_compute_dtype
    if not ctx.input_dtype.is_floating_point:
        return Decline(f"input dtype {ctx.input_dtype} is not floating point")
    shape = tuple(ctx.region.weight_shape or ctx.tensor("weight").shape)
    roles = [r for r in ctx.region.roles if r not in ("input", "bias")]
    w = math_for(scheme).dequantize_weight(scheme, {r: ctx.tensor(r) for r in roles}, shape).to(cd)
    operands: list = [("weight_" + str(cd).removeprefix("torch."), w)]
    if ctx.has("bias"):
        operands.append(("bias_" + str(cd).removeprefix("torch."), ctx.tensor("bias").to(cd)))
    op, op_params = ctx.region.op, ctx.region.op_params

    def body(x: torch.Tensor, w: torch.Tensor, *bias: torch.Tensor) -> torch.Tensor:
        xq = quantize_input(scheme, x, {}, op).to(cd)
        return apply_op(op, op_params, xq, w, bias[0] if bias else None).to(x.dtype)

    return KernelChoice(
        name=f"aten.linear ({scheme.compute_dtype} weights decoded at compile time)",
        why="no fp8 matmul on CPU: weights widened once at compile time (2 bytes/weight in the package), fp8 activation rounding kept",
        body=body,
        operands=operands,
    )
