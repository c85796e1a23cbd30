"""CPU kernels for the AOTInductor backend (see `kernels/__init__.py` for the contract).

No one kernel wins at every row count (M, the activation's rows) on every CPU, so, as on CUDA, each
family has a PLAN: row buckets, each with the kernel that was fastest there, per ISA class of the
compile target (`qexport.lower.cpu_target`: this CPU, capped by ATEN_CPU_CAPABILITY). Kernels:

- "int8pack": `aten._weight_int8pack_mm`, int8 weights read directly, bf16/fp16 activations;
- "int4pack": `aten._weight_int4pack_mm_for_cpu`, weights repacked at compile time (tinygemm layout);
- "int4_loop" / "int8_loop": Inductor's own C++ loop over int4 / int8 codes (one row: a GEMV that
  decodes as it reads; int4 words laid out at the target's fp32 vector width, int8 codes as stored);
- "int_mm": `aten._int_mm` (int8 x int8 -> int32): fast only with VNNI (oneDNN's s8s8 GEMM);
- "float_weights": the target's fastest float GEMM (bf16 with AVX512-BF16/AMX, else fp32) on weights
  the scheme's own math decoded once, at compile time; activations keep the scheme's rounding;
- "dequant": the same GEMM on weights decoded per call (with `qexport.large_m="dequant"`: only the
  quantized weights are kept).

Buckets the program's range for M rules out are not built; where it spans several, `torch.cond`
picks at run time. Crossovers come from `benchmarks/bench_aoti.py --kernels` (2048x2048 layer, one
thread, docs/benchmarks/aoti_cpu.md) and name the ISA they were measured on; a target of another
class gets the plan that assumes the least (AVX2: no VNNI, no bf16 dot products), which is correct
everywhere and, on the ISAs measured, never slower than fp32.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)
import torch.nn.functional as F

from ...schemes import activation as act, math_for, quantize_input
from ...schemes.packing import unpack_uint4
from ..cpu_target import CPUTarget, compile_target
from . import Decline, KernelChoice, KernelContext, register_kernel
from .cuda import by_rows, reachable, row_range  # the row-bucket machinery both device tables share

aten = torch.ops.aten

#: the ISA classes plans were measured on (docs/benchmarks/aoti_cpu.md)
AVX512_VNNI_BF16 = "AVX512 VNNI BF16"  # AMD EPYC (Zen 4 class), native
AVX2 = "AVX2"  # the same host capped with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2; agrees with
# the figures from a real AVX2 machine (int8pack 3.1x / 1.5x / 0.74x fp32 at M = 1 / 16 / 128)

# (max rows, kernel) per family and ISA class, in row order; the last bucket has no bound.
# AVX2: _weight_int8pack_mm / _int4pack 1.10x fp32 at M=24, 0.99x at 32, 0.79x at 128 (the fp32
# GEMM is compute-bound first), so fp32 weights above 24. int8 activations: _int_mm without VNNI ran
# at 0.49x fp32 at M=1 and 0.05x at M=128 on the real AVX2 machine; their codes minus zero point
# (integers, exact in bf16) through _weight_int8pack_mm ran at 2.6x fp32 at M=1 but its bf16 output
# rounding left 4 x Linear(2048) 1.6-2.5 % from the reference, over int8's 2e-2: the fp32 GEMM on
# decoded weights (the reference's own arithmetic) at every M.
# int8 on AVX2, one row: Inductor's loop over the stored int8 codes (`_int8_loop`) 0.17 / 0.67 ms per
# 2048^2 / 4096^2 layer (1.3-1.4x its bytes' floor), _weight_int8pack_mm 0.19 / 1.1 ms (1.5x / 2.2x);
# with AVX-512's 16 lanes 0.64-0.67 vs 1.02-1.04 ms at 4096^2 (one thread; two: 0.45 vs 0.51), streaming
# six layers from DRAM, so AVX-512 CPUs with VNNI / BF16 take the loop at one row too.
# int4 on AVX2, one row: tinygemm's kernel without AVX-512 is compute-bound (0.42 ms per 2048^2 layer,
# 5x its weight bytes' floor); Inductor's loop over the `_int4_words` layout 0.18 ms (1.8x its floor).
# AVX512 VNNI BF16: int8pack 6.1x at M=4, 3.9x at 8 where the bf16 GEMM is 4.4x, so bf16 weights above 4;
# _int_mm 3.0-5.7x at every M.
# 8da4w computes in fp32 and tinygemm writes bf16 (~2e-3 relative per layer: greedy tokens of a small
# LM left eager's within 32 steps), so it gets only fp32-exact kernels (~4e-7): the int4 loop at one
# row (AVX-512, 16 lanes: 1.1-1.2x tinygemm's time per 2048^2 / 768x3072 layer, 3x faster than the
# fp32 GEMM), the fp32 GEMM above (tinygemm's prompt speed-up is bf16 rounding's).
PLANS: dict[str, dict[str, list[tuple[int | None, str]]]] = {
    "int8_weight_only": {AVX512_VNNI_BF16: [(1, "int8_loop"), (4, "int8pack"), (None, "float_weights")], AVX2: [(1, "int8_loop"), (24, "int8pack"), (None, "float_weights")]},
    "int4": {AVX512_VNNI_BF16: [(4, "int4pack"), (None, "float_weights")], AVX2: [(1, "int4_loop"), (24, "int4pack"), (None, "float_weights")]},
    "int8_dynamic_int4_weight": {AVX512_VNNI_BF16: [(1, "int4_loop"), (None, "float_weights")], AVX2: [(1, "int4_loop"), (None, "float_weights")]},
    "int8_activations": {AVX512_VNNI_BF16: [(None, "int_mm")], AVX2: [(None, "float_weights")]},
    "fp8": {AVX512_VNNI_BF16: [(None, "float_weights")], AVX2: [(None, "float_weights")]},
}
# With `qexport.large_m="dequant"` (keep only quantized weights) decoding per call replaces the
# decoded-weights bucket above these rows: the quantized kernel wins up to them (AVX2: int8pack 0.88x
# at M=64 where dequant+fp32 is 0.80x, 0.79x vs 0.87x at 128; AVX512 VNNI BF16: 1.9x vs 2.5x at 64).
DEQUANT_FROM = {AVX512_VNNI_BF16: 32, AVX2: 64}

KERNEL_NAMES = {
    "int8pack": "aten._weight_int8pack_mm", "int4pack": "aten._weight_int4pack_mm_for_cpu", "int_mm": "aten._int_mm",
    "int4_loop": "Inductor C++ loop over int4 codes", "int8_loop": "Inductor C++ loop over int8 codes",
    "float_weights": "{dtype} GEMM on weights decoded at compile time", "dequant": "{dtype} GEMM on weights decoded per call",
}
# Kernels whose weights torch packs in a layout of the ATen CPU capability in force when packing: torch 2.13's
# _convert_weight_to_int4pack_for_cpu under AVX2 and under AVX512 give different bytes, and the run-time
# kernel reads them by its own capability (a forced-AVX2 package on an AVX-512 host: rel. error 1.06, no
# error raised). The region records the capability (`aten_layout`); `aoti.check_cpu` refuses any other.
ATEN_LAYOUT_KERNELS = frozenset({"int4pack"})
# Activation dtypes the weight-only aten kernels are fast with. With fp32 activations
# aten._weight_int8pack_mm is 18x slower than with bf16 (FINDINGS.md), slower than Inductor's fusion.
_FAST_WEIGHT_ONLY_DTYPES = (torch.bfloat16, torch.float16)


def plan_isa(target: CPUTarget) -> str:
    """The measured ISA class whose plans serve `target`."""
    return AVX512_VNNI_BF16 if target.vnni and target.bf16_gemm else AVX2


def gemm_dtype(target: CPUTarget, compute: torch.dtype) -> torch.dtype:
    """The float GEMM dtype for a scheme computing in `compute`: bf16 only where the CPU has bf16
    dot products (an AVX2 bf16 GEMM runs at ~0.3x fp32 from M=16 on)."""
    return compute if compute == torch.bfloat16 and target.bf16_gemm else torch.float32


def cpu_plan(family: str, ctx: KernelContext, target: CPUTarget) -> list[tuple[int | None, str]]:
    """The family's buckets for the rows `ctx`'s program accepts, on `target`, under `qexport.large_m`."""
    isa = plan_isa(target)
    plan = PLANS[family][isa]
    policy = ctx.options.get("qexport.large_m", "bf16_weights")
    if policy == "dequant" and family != "fp8" and any(k == "float_weights" for _, k in plan):
        quantized = [(m, k) for m, k in plan if k != "float_weights"]
        if quantized and quantized[-1][1] != "int4_loop":  # the loop stays at one row: it reads the weight per row
            quantized[-1] = (DEQUANT_FROM[isa], quantized[-1][1])
        plan = [*quantized, (None, "dequant")]
    return reachable(plan, row_range(ctx))


def _without(plan: list[tuple[int | None, str]], kernel: str, ctx: KernelContext) -> list[tuple[int | None, str]]:
    """`plan` with `kernel`'s buckets run by the next bucket's kernel, or, in the last bucket (a program
    whose rows reach only that one: a static one-row head), by the weights decoded as large_m says."""
    last = "dequant" if ctx.options.get("qexport.large_m") == "dequant" else "float_weights"
    out: list[tuple[int | None, str]] = []
    for i, (max_m, k) in enumerate(plan):
        if k == kernel:
            k = next((k2 for _, k2 in plan[i + 1:] if k2 != kernel), last)
        out[-1:] = [(max_m, k)] if out and out[-1][1] == k else [*out[-1:], (max_m, k)]
    return out


def _stored(t: torch.Tensor) -> torch.Tensor:
    """`t` (per-row quantization parameters), which Inductor must write to a buffer once.

    Why: Inductor inlines a light pointwise value into every loop that reads it, and GCC cannot hoist
    it out of the vector loop (the loop's store may alias its loads), so each row's scale and zero
    point (two divisions and a rounding of its min / max) were recomputed for every 8 elements: ~6 %
    of a 384-wide layer's time on AVX2 (MiniLM int8_dynamic 0.91x fp32 AOTI at 128 tokens). A
    stride requirement is Inductor's own way to make a value a buffer; eagerly it returns `t`.
    """
    return torch.ops.prims.inductor_force_stride_order(t, t.stride())


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _choice(
    ctx: KernelContext, target: CPUTarget, plan: list[tuple[int | None, str]],
    build: Callable[[str], Callable[[torch.Tensor, dict], torch.Tensor]], operands: list, gemm: torch.dtype,
) -> KernelChoice:
    """A KernelChoice running `build(kernel)(x2d, t)` for each bucket of `plan`, where `t` maps each
    operand's name (its role, or the suffix of a tensor computed here) to its tensor (the bias, if
    any, as "bias"); every kernel returns [M, N] in the compute dtype, bias added. Then the static
    schemes' output rounding, and the input's dtype and shape."""
    scheme, n = ctx.scheme, ctx.tensor("weight").shape[0]
    if ctx.has("bias"):  # in the compute dtype, as the reference adds it
        operands = [*operands, ("bias_" + _dtype_name(scheme.torch_compute_dtype), ctx.tensor("bias").to(scheme.torch_compute_dtype))]
    names = [o if isinstance(o, str) else o[0] for o in operands]
    names = ["bias" if nm.startswith("bias_") else nm for nm in names]
    static = scheme.activation == "static"
    extra = ["output_scale", "output_zero_point"] if static else []

    def named(fn: Callable[[torch.Tensor, dict], torch.Tensor]) -> Callable[..., torch.Tensor]:
        return lambda x2d, *ts: fn(x2d, dict(zip(names, ts)))

    branches = [(max_m, named(build(kernel))) for max_m, kernel in plan]

    def body(x: torch.Tensor, *ops: torch.Tensor) -> torch.Tensor:
        y = by_rows(_as_2d(x), branches, *ops[: len(names)])
        if static:
            y = act.static_int8(y.float(), *ops[len(names):])
        return y.reshape(*x.shape[:-1], n).to(x.dtype)

    isa = plan_isa(target)
    label = lambda k: KERNEL_NAMES[k].format(dtype=_dtype_name(gemm))  # noqa: E731
    spans, lo = [], 1
    for max_m, kernel in plan:
        spans.append(((f"M>={lo}" if max_m is None else (f"M<={max_m}" if lo == 1 else f"{lo}<=M<={max_m}")), kernel))
        lo = (max_m or 0) + 1
    how = "; ".join(f"{s}: {label(k)}" for s, k in spans) + (" (torch.cond at run time)" if len(plan) > 1 else "")
    return KernelChoice(
        name=" / ".join(dict.fromkeys(label(k) for _, k in plan)),
        why=f"{how}; plan for {isa} (target: {target.describe()})",
        body=body,
        operands=[*operands, *extra],
        details={"isa": isa, "plan": [{"max_m": m, "kernel": label(k)} for m, k in plan],
                 **({"aten_layout": target.capability} if any(k in ATEN_LAYOUT_KERNELS for _, k in plan) else {})},
    )


def _decoded(ctx: KernelContext, roles: tuple[str, ...], dtype: torch.dtype) -> tuple[str, torch.Tensor]:
    """The "float_weights" operand: the scheme's own dequantization, run once here."""
    scheme = ctx.scheme
    shape = tuple(ctx.region.weight_shape or ctx.tensor("weight").shape)
    w = math_for(scheme).dequantize_weight(scheme, {r: ctx.tensor(r) for r in roles}, shape)
    # Round through the compute dtype first, so the fp32 GEMM sees the reference's weights.
    return ("weight_" + _dtype_name(dtype), w.to(scheme.torch_compute_dtype).to(dtype).contiguous())


def fp8_e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """fp32 `v`, already within +-448, rounded to the nearest float8_e4m3fn value, ties to even: the
    value `v.to(torch.float8_e4m3fn).float()` gives, by arithmetic Inductor vectorises.

    Why: Inductor's C++ converts to fp8 one element at a time (3.8 ms for a [512, 2048] activation with
    AVX2, 8 % of that layer's fp32 GEMM, which made fp8 0.93x fp32), and reading the exponent through
    `view(torch.int32)` is a scalar loop too (no vector bitcast in torch 2.13's C++ codegen). Veltkamp's
    split does it in a few vector operations: with t = v * (2^20 + 1), t - (t - v) is v rounded to
    24 - 20 = 4 significant bits (e4m3's 1 + 3), to nearest, ties to even, as long as every operation
    is rounded (no FMA contraction: `INDUCTOR_OPTIONS`); below 2^-6 e4m3's subnormals have the fixed
    step 2^-9, and multiplying by a power of two is exact.
    """
    t = v * _VELTKAMP_E4M3
    normal = t - (t - v)
    subnormal = torch.round(v * 512.0) * (1.0 / 512)
    return torch.where(v.abs() < 2.0**-6, subnormal, normal)


_VELTKAMP_E4M3 = float(2**20 + 1)
#: Inductor configs these kernels rely on (`compile` puts the caller's options over them): every
#: floating-point operation rounded on its own, never fused into an FMA (`fp8_e4m3_round`); and the
#: thread count read where the package runs, not frozen where it was compiled (Inductor's default
#: takes the compiling process's: a package built with one thread, as in a one-CPU build container,
#: never ran its loops in parallel on any server; same speed at 1 and 2 threads, docs/benchmarks/aoti_cpu.md).
INDUCTOR_OPTIONS = {"cpp.enable_floating_point_contract_flag": "off", "cpp.dynamic_threads": True}


def _dynamic_fp8(x: torch.Tensor, per_token: bool) -> torch.Tensor:
    """`act.dynamic_fp8` with the cast replaced by `fp8_e4m3_round` (same values)."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True) if per_token else xf.abs().amax()
    scale = _stored((amax / act.FP8_E4M3_MAX).clamp(min=torch.finfo(torch.float32).eps))
    return (fp8_e4m3_round((xf / scale).clamp(-act.FP8_E4M3_MAX, act.FP8_E4M3_MAX)) * scale).to(x.dtype)


def _float_kernels(ctx: KernelContext, roles: tuple[str, ...], gemm: torch.dtype) -> dict[str, Callable]:
    """"float_weights" and "dequant": the activation with the scheme's rounding (fake-quantized as the
    reference does), then `gemm`-dtype F.linear."""
    scheme, op = ctx.scheme, ctx.region.op
    shape = tuple(ctx.region.weight_shape or ctx.tensor("weight").shape)
    math, cd = math_for(scheme), scheme.torch_compute_dtype
    wname = "weight_" + _dtype_name(gemm)

    fp8 = scheme.activation == "dynamic" and scheme.act_dtype == "float8_e4m3fn"
    per_token = scheme.act_granularity == "per_token" and op != "conv2d"

    int8_dynamic = scheme.activation == "dynamic" and not fp8

    def activation(x: torch.Tensor, t: dict) -> torch.Tensor:
        if fp8 or int8_dynamic:
            x = _stored(x)
        if fp8:
            xq = _dynamic_fp8(x, per_token)
        elif int8_dynamic:  # act.dynamic_int8, its parameters stored once per row
            xf = x.float()
            xq = act.fake_quant_int8(xf, *map(_stored, act.dynamic_int8_qparams(xf, per_token))).to(x.dtype)
        else:
            xq = quantize_input(scheme, x, t, op)
        return xq.to(cd).to(gemm)

    def linear(x: torch.Tensor, w: torch.Tensor, t: dict) -> torch.Tensor:
        b = t.get("bias")
        return F.linear(activation(x, t), w, None if b is None else b.to(gemm)).to(cd)

    def float_weights(x: torch.Tensor, t: dict) -> torch.Tensor:
        return linear(x, t[wname], t)

    def dequant(x: torch.Tensor, t: dict) -> torch.Tensor:
        return linear(x, math.dequantize_weight(scheme, {r: t[r] for r in roles}, shape).to(cd).to(gemm), t)

    return {"float_weights": float_weights, "dequant": dequant}


def _plus_bias(y: torch.Tensor, t: dict, cd: torch.dtype) -> torch.Tensor:
    b = t.get("bias")
    return (y if b is None else y + b.to(y.dtype)).to(cd)


def _operands(ctx: KernelContext, plan: list, roles: tuple[str, ...], gemm: torch.dtype, static_inputs: bool) -> list:
    kinds = {k for _, k in plan}
    ops: list = []
    if "float_weights" in kinds:
        ops.append(_decoded(ctx, roles, gemm))
    if "dequant" in kinds:
        ops += [r for r in roles if r not in ops]
    if static_inputs and kinds & {"float_weights", "dequant", "int_mm"}:
        ops += ["input_scale", "input_zero_point"]
    return ops


def _check_float_input(ctx: KernelContext) -> Decline | None:
    if ctx.input_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return Decline(f"input dtype {ctx.input_dtype} is not floating point")
    return None


#: int4 codes per int32 word of `_int4_words`, and words per vector (AVX2: 8 fp32 lanes)
_NIBBLES, _LANES = 8, 8
#: int8 codes per int32 word `_int8_loop` reads
_BYTES = 4
#: K must be a multiple of this for aten._weight_int8pack_mm: torch 2.13's CPU kernel has no tail for
#: the last partial vector of K, and past it reads out of bounds (a wrong result, e.g. K=100 0.1 relative
#: error on AVX2, or SIGSEGV: K=20, 36): K % 8 is needed on AVX2, K % 16 on AVX-512, and the kernel is
#: the loading CPU's ATen dispatch, not the compile target's, so a package takes it only for K % 16 == 0
_INT8PACK_K = 16
_fma = torch.ops.prims.fma  # Inductor's fused multiply-add (C++: at::vec::fmadd); eagerly (a * b) + c


def _int8_loop(x: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, lanes: int = _LANES) -> torch.Tensor:
    """x [M, K] (fp32) times the int8 weight `codes` [N, K] (as stored: the package's one copy, which
    aten._weight_int8pack_mm reads above one row) with per-output scales `s` [N], in fp32; `lanes`:
    the target's fp32 vector width (`_vector_lanes`).

    Why (AVX2, one row): the codes are read as 32-bit words through a dtype view (no copy; the words
    as float32, then int32: torch 2.13's AVX2 `Vectorized<int32_t>::loadu(ptr, count)` copies through
    memcpy, the float one loads directly); byte j of word i is code 4i + j. XOR 0x00808080 makes bytes
    0-2 code + 128 (0..255) and leaves byte 3 the signed code, so `word & (255 << 8j)` = (code + 128)
    * 256^j (byte 3: code * 2^24), exact in fp32, against x permuted and pre-scaled by 256^-j once per
    call (no unpacking to bytes, which AVX2 loads element by element), each vector of words meeting
    `lanes` x values per byte position side by side (four streams of x 4K floats apart ran 2.5x
    slower). Per code an AND, a conversion and a fused multiply-add (`prims.fma`, as `_int4_loop`), a
    word's four in one chain, one add per word into the row's sum; the +128 of bytes 0-2 costs 128 *
    (sum of their x), once per call.
    """
    m, k = x.shape
    n = codes.shape[0]
    blocks = k // (_BYTES * lanes)
    words = codes.view(torch.float32).view(torch.int32).reshape(n, blocks, lanes) ^ 0x00808080
    xb = x.reshape(m, 1, blocks, lanes, _BYTES)  # element 4 (lanes b + i) + j
    xs = _stored(torch.stack([xb[..., j] * 256.0**-j for j in range(_BYTES)], 3))  # scalars: no tensor constant
    top = _BYTES - 1

    def code(j: int) -> torch.Tensor:  # (code + 128) * 256^j, code * 2^24 for the top byte
        return (words & ((255 << 8 * j) if j < top else -(1 << 8 * j))).float()

    t = code(top) * xs[:, :, :, top]
    for j in reversed(range(top)):
        t = _fma(code(j), xs[:, :, :, j], t)
    return (t.sum((2, 3)) - 128.0 * _stored(xb[..., :top].sum((2, 3, 4)))) * s


@register_kernel("int8", "cpu", "linear")
def int8_weight_only_cpu(ctx: KernelContext) -> KernelChoice | Decline | None:
    scheme = ctx.scheme
    if scheme.activation != "none":
        return None
    cd = scheme.torch_compute_dtype
    if cd not in _FAST_WEIGHT_ONLY_DTYPES:
        return Decline(f"compute_dtype={scheme.compute_dtype}: _weight_int8pack_mm is slow with fp32 activations")
    declined = _check_float_input(ctx)
    if declined:
        return declined
    target = compile_target()
    plan = cpu_plan("int8_weight_only", ctx, target)
    n, k_in = ctx.tensor("weight").shape
    lanes = _vector_lanes(target)
    lanes = lanes if k_in % (_BYTES * lanes) == 0 else _LANES
    if k_in % (_BYTES * lanes):
        plan = _without(plan, "int8_loop", ctx)
    if k_in % _INT8PACK_K:
        plan = _without(plan, "int8pack", ctx)
    gemm = gemm_dtype(target, cd)
    roles = ("weight", "weight_scale")
    operands = _operands(ctx, plan, roles, gemm, False)
    chosen = {k for _, k in plan}
    if chosen & {"int8pack", "int8_loop"} and "weight" not in operands:  # both read the stored codes
        operands = ["weight", *operands]
    # Per-tensor schemes store one scale; the kernels take one per output channel (int8pack's in the activation dtype).
    per_channel = ctx.tensor("weight_scale").reshape(-1).expand(n)
    if "int8pack" in chosen:
        operands = [*operands, ("weight_scale_" + _dtype_name(cd), per_channel.to(cd).contiguous())]
    if "int8_loop" in chosen:
        operands = [*operands, ("weight_scale_float32", per_channel.float().contiguous())]
    kernels = _float_kernels(ctx, roles, gemm)
    kernels["int8pack"] = lambda x, t: _plus_bias(aten._weight_int8pack_mm(x.to(cd), t["weight"], t["weight_scale_" + _dtype_name(cd)]), t, cd)
    # The activation rounded to the compute dtype as the reference does, stored once (see `int4_loop`); sums in fp32.
    kernels["int8_loop"] = lambda x, t: _plus_bias(
        _int8_loop(_stored(x.to(cd).float()), t["weight"], t["weight_scale_float32"], lanes), t, cd)
    return _choice(ctx, target, plan, kernels.__getitem__, operands, gemm)


_INT4_ROLES = ("weight", "weight_scale", "weight_zero_point")


def _vector_lanes(target: CPUTarget) -> int:
    """fp32 lanes of the vectors Inductor writes for `target`: the one-row loops' layouts must match them
    (with 8-lane rows an AVX-512 build ran 8da4w's one-row int4 layers 6x slower than with 16)."""
    return 16 if target.capability.startswith("AVX512") else _LANES


def _int4_loop_fits(k: int, group_size: int, lanes: int = _LANES) -> bool:
    """A block of 8 x `lanes` codes must lie in one group or hold whole groups of whole rows of `lanes`."""
    block = _NIBBLES * lanes
    return k % block == 0 and group_size % lanes == 0 and (block % group_size == 0 or group_size % block == 0)


def _int4_words(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int,
                lanes: int = _LANES) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 codes [N, K] as int32 words [N, K/64, 8] whose nibble j of word (b, i) is code k = 64b + 8j + i
    (the top nibble, j = 7, holds code - 8 in two's complement), and per block its R = max(1, 64 /
    group_size) groups' scale and minus zero point, [N, K/64, R, 2] (for 8 `lanes`; with 16, blocks of 128
    codes: words [N, K/128, 16], nibble j of word (b, i) = code 128b + 16j + i).

    Why this layout: Inductor vectorises a loop along the innermost contiguous dim at the fp32 width;
    over uint8 codes that is a partial 8-byte load per vector, which AVX2 (no byte-masked loads)
    does element by element (3.3 ms per 2048^2 layer). Over 32-bit words every load is a full vector,
    nibble j is a mask, and it meets the activation's elements 64b + 8j .. 64b + 8j + 7,
    a contiguous vector too. The words are stored as float32 bit patterns and viewed as int32 in the
    loop: torch 2.13's AVX2 `Vectorized<int32_t>::loadu(ptr, count)` copies through memcpy even for a
    full vector (a call per load: 0.80 ms per layer), the float one loads directly (0.28 ms). A group's
    two parameters sit side by side, so the loop reads them in one pass and cache line; a group wider
    than a block repeats them per block (g128: 8 bytes per 64 codes), which keeps the loop one level
    deep (one copy per group needs a loop over the group's blocks; not measured apart from the
    reduction split below, so kept simple).
    """
    n, k = codes.shape
    block = _NIBBLES * lanes
    c = codes.to(torch.int32).reshape(n, k // block, _NIBBLES, lanes)
    words = c[:, :, 0, :].clone()
    for j in range(1, _NIBBLES):
        words |= (c[:, :, j, :] ^ (8 if j == _NIBBLES - 1 else 0)) << (4 * j)
    per_block, rep = max(1, block // group_size), max(1, group_size // block)
    params = torch.stack([scale.float(), -zero_point.float()], -1).repeat_interleave(rep, 1)
    return words.view(torch.float32).contiguous(), params.reshape(n, k // block, per_block, 2).contiguous()


def _int4_loop(x: torch.Tensor, words: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """x [M, K] (fp32) times the int4 weight behind `_int4_words`, in fp32: per group
    s * (sum code * x - zp * sum x). Written for M = 1; Inductor fuses it into one loop per output.

    Why this form (AVX2 is compute-bound: the loop runs out of vector ALU slots, not of memory
    bandwidth): each code costs three vector operations per 8 lanes, the least this data path can
    do (an AND, a conversion, a fused multiply-add). Nibble j is taken in place, `word & (15 << 4j)` =
    code * 16^j (exact in fp32), against the activation pre-scaled by 16^-j once per call; the top
    nibble's field is the word's sign bit, so it holds code - 8 and the mask alone gives (code - 8) *
    16^7 (a shift cost a variable-shift instruction per word, three micro-ops on Haswell). A group's
    products are a chain of `prims.fma` (explicit: packages compile with FMA contraction off,
    `INDUCTOR_OPTIONS`) that starts from -zp * (the group's activations summed per lane) and, in the
    group holding the top nibble, + 8 * its activation, so the zero point and the top nibble's 8 cost
    one operation per group and no pass of their own: a pass over the scales per zero-point term and
    one per top-nibble term read 6 MB more per 4096^2 layer (g32), the most of a call once two
    threads share the loop. The group's scale joins the sum by one more fma; one add per block.
    """
    m, k = x.shape
    n, blocks, per_block = params.shape[:3]
    lanes = words.shape[-1]
    words = words.view(torch.int32)
    p = params.reshape(n, blocks, per_block, 1, 2)
    xb = x.reshape(m, 1, blocks, _NIBBLES, lanes)
    # Powers of two: x * 16^-j * (code * 16^j) rounds as x * code does (short of fp32's subnormal range).
    # (Python scalars, not a tensor of them: a region body must not create tensor constants.)
    xs = _stored(torch.stack([xb[..., j, :] * 16.0**-j for j in range(_NIBBLES)], -2))
    xsl = _stored(xb.reshape(m, 1, blocks, per_block, _NIBBLES // per_block, lanes).sum(-2))  # per group, per lane
    x8 = _stored(xb[..., _NIBBLES - 1, :] * 8.0)  # the top nibble's +8, per lane

    def code(j: int) -> torch.Tensor:  # code * 16^j, (code - 8) * 16^7 for the top nibble
        return (words & ((15 << (4 * j)) if j < _NIBBLES - 1 else -(1 << 4 * j))).float()

    # One reduction per group, and at least two per block: Inductor inlines a body into its reduction only
    # while it reads at most 12 buffer locations (`realize_cpu_acc_reads_threshold`); past that it writes
    # the body to an [N, K/8] buffer first (2x slower). The reductions share one loop over the words.
    parts = max(2, per_block)
    rows = _NIBBLES // parts
    y = None
    for q in range(parts):
        r = q * per_block // parts  # the group this part of the block lies in
        s, neg_zp = p[:, :, r, :, 0], p[:, :, r, :, 1]
        g = neg_zp * xsl[..., r, :] if q * per_block % parts == 0 else None  # the group's first part
        if q == parts - 1:
            g = x8 if g is None else _fma(neg_zp, xsl[..., r, :], x8)
        for j in range(q * rows, (q + 1) * rows):
            g = code(j) * xs[..., j, :] if g is None else _fma(code(j), xs[..., j, :], g)
        part = (g * s).sum((2, 3))
        y = part if y is None else y + part
    return y


@register_kernel("int4", "cpu", "linear")
def int4_weight_only_cpu(ctx: KernelContext) -> KernelChoice | Decline | None:
    scheme = ctx.scheme
    declined = _check_float_input(ctx)
    if declined:
        return declined
    cd = scheme.torch_compute_dtype
    target = compile_target()
    plan = cpu_plan("int4" if scheme.activation == "none" else "int8_dynamic_int4_weight", ctx, target)
    gemm = gemm_dtype(target, cd)
    gs = scheme.group_size
    k_in = ctx.tensor("weight_scale").shape[-1] * gs
    lanes = _vector_lanes(target)
    lanes = lanes if _int4_loop_fits(k_in, gs, lanes) else _LANES
    if not _int4_loop_fits(k_in, gs, lanes):
        plan = _without(plan, "int4_loop", ctx)
    if ctx.tensor("weight").shape[0] % 16:
        # tinygemm's CPU packing takes output features in multiples of 16 only (torch 2.13: "expect N
        # to be dividable by 16"): a 10- or 1000-class head decodes its weights instead
        plan = _without(plan, "int4pack", ctx)
    operands = _operands(ctx, plan, _INT4_ROLES, gemm, False)
    chosen = {k for _, k in plan}
    codes = unpack_uint4(ctx.tensor("weight")) if chosen & {"int4pack", "int4_loop"} else None  # both layouts start from them
    if "int4pack" in chosen:
        # Repacked once, here: the tinygemm layout and its (scale, zero) pairs become buffers of the program.
        packed = aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)  # innerKTiles is unused on CPU
        scale = ctx.tensor("weight_scale").float()
        zp = ctx.tensor("weight_zero_point").float()
        # tinygemm dequantizes w = (q - 8) * s + z; the scheme's w = (q - zp) * s, so z = (8 - zp) * s.
        sz = torch.stack([scale, (8 - zp) * scale], -1).transpose(0, 1).contiguous().to(cd)
        operands += [("weight_int4pack", packed), ("weight_scales_and_zeros", sz), ("weight_group_size", torch.tensor(gs))]
    if "int4_loop" in chosen:
        words = _int4_words(codes, ctx.tensor("weight_scale"), ctx.tensor("weight_zero_point"), gs, lanes)
        operands += [("weight_int4_words", words[0]), ("weight_int4_params", words[1])]
    kernels = _float_kernels(ctx, _INT4_ROLES, gemm)

    # The tensor-group-size form of aten._weight_int4pack_mm_for_cpu (what Inductor lowers that op to),
    # the group size a buffer: Inductor's lowering makes it a graph constant, which AOTInductor does not
    # declare inside torch.cond branches (torch 2.13: "true_graph_0_constant0 was not declared").
    def int4mm(x: torch.Tensor, t: dict) -> torch.Tensor:
        return torch.ops.quantized.int4mm_packed_weight_cpu(
            x.contiguous(), t["weight_int4pack"], t["weight_group_size"], t["weight_scales_and_zeros"])

    def int4pack(x: torch.Tensor, t: dict) -> torch.Tensor:  # weight-only plans only (8da4w: see PLANS)
        return _plus_bias(int4mm(x.to(cd), t), t, cd)

    def int4_loop(x: torch.Tensor, t: dict) -> torch.Tensor:
        xf = x.to(cd).float()  # the reference rounds the activation to the compute dtype first; sums are fp32
        if scheme.activation != "none":  # 8da4w: the token's int8 grid, as the reference computes
            xf = act.fake_quant_int8(xf, *map(_stored, act.dynamic_int8_qparams(xf, True)))
        # Stored once: the loop reads the activation once per output channel, and Inductor inlined the
        # rounding into every read (8da4w on 4 x Linear(2048), AVX2: 3.8 ms, 3x int4 weight-only's loop).
        return _plus_bias(_int4_loop(_stored(xf), t["weight_int4_words"], t["weight_int4_params"]), t, cd)

    kernels["int4pack"] = int4pack
    kernels["int4_loop"] = int4_loop
    return _choice(ctx, target, plan, kernels.__getitem__, operands, gemm)


@register_kernel("int8", "cpu", "linear")
def int8_activations_cpu(ctx: KernelContext) -> KernelChoice | Decline | None:
    """int8 activations (dynamic per token / per tensor, static per tensor) with int8 weights.

    With asymmetric activations x = (qx - zx) * sx and symmetric weights w = qw * sw,
    x @ w.T = sx * sw * (qx @ qw.T - zx * colsum(qw)): with `_int_mm` the zero point costs one rank-1
    correction with the weight's column sums (computed here once).
    """
    scheme = ctx.scheme
    if scheme.activation not in ("dynamic", "static") or scheme.act_dtype != "int8":
        return None
    declined = _check_float_input(ctx)
    if declined:
        return declined
    target = compile_target()
    plan = cpu_plan("int8_activations", ctx, target)
    kinds = {k for _, k in plan}
    gemm = gemm_dtype(target, scheme.torch_compute_dtype)
    roles = ("weight", "weight_scale")
    static = scheme.activation == "static"
    weight = ctx.tensor("weight")
    n = weight.shape[0]
    operands = _operands(ctx, plan, roles, gemm, static)
    if "int_mm" in kinds:
        if "weight" not in operands:
            operands.append("weight")
        operands.append(("weight_scale_f32", ctx.tensor("weight_scale").float().reshape(-1).expand(n).contiguous()))
        operands.append(("weight_colsum", weight.to(torch.int32).sum(1)))
    per_token = scheme.act_granularity == "per_token"
    cd = scheme.torch_compute_dtype

    def int_mm(x: torch.Tensor, t: dict) -> torch.Tensor:
        x2 = x.float()
        if static:
            s, zp = t["input_scale"], t["input_zero_point"].float()
        else:
            s, zp = map(_stored, act.dynamic_int8_qparams(x2, per_token))
        q = act.quantize_int8(x2, s, zp)
        acc = aten._int_mm(q.to(torch.int8), t["weight"].t()) - zp.to(torch.int32) * t["weight_colsum"]
        return _plus_bias(acc.float() * (s * t["weight_scale_f32"]), t, cd)

    kernels = {**_float_kernels(ctx, roles, gemm), "int_mm": int_mm}
    return _choice(ctx, target, plan, kernels.__getitem__, operands, gemm)


@register_kernel("fp8", "cpu", "linear")
def fp8_weights_decoded_at_compile_time(ctx: KernelContext) -> KernelChoice | Decline | None:
    """fp8 weights widened once, here, to the target's GEMM dtype; activations keep the scheme's fp8 rounding.

    Why: no CPU has an fp8 matmul worth calling (aten._scaled_mm on CPU took ~200 ms for one 4096x4096
    layer) and Inductor's fusion re-decodes every weight on every call (about 7x slower than fp32 at
    batch 1). fp8 -> bf16 is exact, so numerics equal the reference; the package holds 2 bytes per
    weight (bf16, with AVX512-BF16/AMX) or 4 (fp32, elsewhere: a bf16 GEMM on AVX2 runs at ~0.3x fp32).
    """
    declined = _check_float_input(ctx)
    if declined:
        return declined
    target = compile_target()
    plan = cpu_plan("fp8", ctx, target)
    gemm = gemm_dtype(target, ctx.scheme.torch_compute_dtype)
    roles = tuple(r for r in ctx.region.roles if r not in ("input", "bias"))
    operands = _operands(ctx, plan, roles, gemm, False)
    return _choice(ctx, target, plan, _float_kernels(ctx, roles, gemm).__getitem__, operands, gemm)
