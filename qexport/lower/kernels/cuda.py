"""CUDA kernels for the AOTInductor backend (see `kernels/__init__.py` for the contract).

Measured on the lent H100 (docs/benchmarks/cuda.md): the weight-only families are memory-bound at
small M (rows of the activation) and compute-bound at large M, and no one kernel wins at both ends,
so each family has a PLAN: row buckets, each with the kernel that won there.

- "gemv": a broadcast-multiply-sum that Inductor fuses (weight load, dequant, reduction) into one
  Triton reduction kernel, tuned by coordinate descent at compile time (`INDUCTOR_OPTIONS`);
- "tinygemm": `aten._weight_int4pack_mm`, weights converted to its layout once, at compile time;
- ("triton", tile): `qexport::weight_only_mm`, a Triton GEMM that reads int8 / fp8 / packed int4
  weights and dequantizes each tile in registers;
- "dequant_mm": the scheme's own dequantization (one fused Inductor kernel) then cuBLAS;
- "scaled_mm": fp8 activations quantized per row by one fused Inductor kernel, `aten._scaled_mm` rowwise;
- "int_mm": int8 activations, `aten._int_mm` (int8 x int8 -> int32), zero-point correction in the epilogue.

Buckets the exported program's range for M rules out are never built; where the range spans a
crossover `torch.cond` picks at run time (AOTInductor compiles every branch into the package).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ...schemes import _activation as act, math_for
from . import Decline, KernelChoice, KernelContext, register_kernel

aten = torch.ops.aten

# Tiles: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, swap_ab). Narrow N tiles at small
# M so that 4096 output columns still make >= 128 programs for the H100's 132 SMs; swap_ab where the
# MMA's M side is better filled by weight rows than by activation rows.
TILE_M16_K256 = (16, 32, 256, 1, 4, 4, 0)
TILE_M16_K128 = (16, 32, 128, 1, 4, 4, 0)
TILE_M16_N64 = (16, 64, 256, 1, 4, 3, 0)
TILE_M32_N64 = (32, 64, 128, 1, 4, 4, 0)
TILE_M64_SWAP = (64, 64, 128, 1, 4, 4, 1)

# (max rows, kernel) per family, in row order; the last bucket has no bound. Each bucket is the
# fastest kernel at those rows in the per-layer lab (benchmarks/bench_cuda.py --lab, 4096x4096, H100,
# docs/benchmarks/cuda.md). Above the last Triton bucket cuBLAS on a freshly dequantized weight wins:
# these Triton GEMMs reach ~60% of cuBLAS when compute-bound.
PLANS: dict[str, list[tuple[int | None, Any]]] = {
    "int8_weight_only": [
        (1, "gemv"), (16, ("triton", TILE_M16_K256)), (32, ("triton", TILE_M16_K128)),
        (64, ("triton", TILE_M16_N64)), (256, ("triton", TILE_M64_SWAP)), (None, "dequant_mm"),
    ],
    "int4": [(8, "tinygemm"), (32, ("triton", TILE_M16_K128)), (128, ("triton", TILE_M32_N64)), (None, "dequant_mm")],
    "fp8": [(16, ("triton", TILE_M16_K256)), (None, "scaled_mm")],
    "int8_dynamic": [(4, "gemv"), (None, "int_mm")],
}
# aten._int_mm on CUDA needs more than 16 rows; fewer are padded with zero rows.
_INT_MM_MIN_M = 17

# Inductor options the kernels here rely on; `qexport.compile(device="cuda")` merges them under the
# caller's. Without coordinate descent Inductor's GEMV reduction runs at a third of the bandwidth
# (GPU_BASELINE.md: 143 µs -> 12 µs for one 4096x4096 int8 layer at M=1).
INDUCTOR_OPTIONS = {"coordinate_descent_tuning": True}

KERNEL_NAMES = {
    "gemv": "Inductor GEMV", "tinygemm": "tinygemm", "triton": "Triton GEMM", "dequant_mm": "dequant+cuBLAS",
    "scaled_mm": "_scaled_mm rowwise", "int_mm": "_int_mm",
}


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def by_rows(
    x2d: torch.Tensor,
    branches: Sequence[tuple[int | None, Callable[..., torch.Tensor]]],
    *operands: torch.Tensor,
) -> torch.Tensor:
    """Run the first `fn(x2d, *operands)` of `branches` ([(max_m, fn), ..., (None, fn)]) whose
    `max_m` covers x2d's row count: a Python choice for a static row count, `torch.cond` for a
    dynamic one (a Python `if` would specialise the whole program to one side). `branches` must
    already be cut to the buckets the row count can reach (`reachable`)."""
    m = x2d.shape[0]
    if not isinstance(m, torch.SymInt):
        return next(fn for max_m, fn in branches if max_m is None or m <= max_m)(x2d, *operands)
    if len(branches) <= 2:  # one cond, no nesting: leave Dynamo's defaults (see below)
        return _cond_chain(x2d, branches, operands)
    # Every region traces the same nested-branch code object; Dynamo's automatic dynamic shapes
    # would turn the next region's weight sizes symbolic (seen: KeyError Max(1, s16) tracing int4).
    # Only here: on a single cond the same patch made fp8's package 2.8x slower at M=256 on the H100
    # (unexplained; measured twice, docs/benchmarks/cuda.md).
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        return _cond_chain(x2d, branches, operands)


def _cond_chain(x2d: torch.Tensor, branches: Sequence[tuple[int | None, Callable[..., torch.Tensor]]], operands: tuple) -> torch.Tensor:
    (max_m, fn), rest = branches[0], branches[1:]
    if max_m is None or not rest:
        return fn(x2d, *operands)

    # No static check in here: torch.cond traces its branches with Dynamo, which presents the row
    # count to `isinstance` as a plain int, so a check would collapse the nested buckets into one
    # (seen on the H100: the M=4096 branch ran the 16-row kernel).
    def above(x: torch.Tensor, *ops: torch.Tensor) -> torch.Tensor:
        return _cond_chain(x, rest, ops)

    return torch.cond(x2d.shape[0] <= max_m, fn, above, (x2d, *operands))


def row_range(ctx: KernelContext) -> tuple[int, float]:
    """The row counts (leading dims flattened) the exported program accepts.

    Read from `range_constraints`, not from the trace's ShapeEnv: export traces a dynamic dim as if
    it were >= 2 (torch's 0/1 specialisation) yet accepts 1 at run time, the case GEMVs are for.
    """
    m = _as_2d(ctx.input_val).shape[0]
    if isinstance(m, int):
        return m, m
    from torch.utils._sympy.value_ranges import bound_sympy

    vr = bound_sympy(m.node.expr, dict(ctx.program.range_constraints))
    return int(vr.lower), float(vr.upper)


def _kind(kernel: Any) -> str:
    return kernel[0] if isinstance(kernel, tuple) else kernel


def reachable(plan: Sequence[tuple[int | None, Any]], rows: tuple[int, float]) -> list[tuple[int | None, Any]]:
    """The buckets of `plan` that row counts in `rows` = (lowest, highest) fall in; the last kept
    loses its bound."""
    out, lo = [], 1
    for max_m, kernel in plan:
        if (max_m is None or max_m >= rows[0]) and lo <= rows[1]:
            out.append((max_m, kernel))
        if max_m is None:
            break
        lo = max_m + 1
    return [*out[:-1], (None, out[-1][1])]


def plan_note(plan: Sequence[tuple[int | None, Any]]) -> tuple[str, str]:
    """(short kernel name, what runs at which M) for reports."""
    name = " / ".join(dict.fromkeys(KERNEL_NAMES[_kind(k)] for _, k in plan))
    parts, lo = [], 1
    for max_m, kernel in plan:
        span = f"M>={lo}" if max_m is None else (f"M<={max_m}" if lo == 1 else f"{lo}<=M<={max_m}")
        parts.append(f"{span}: {KERNEL_NAMES[_kind(kernel)]}")
        lo = (max_m or 0) + 1
    how = "; ".join(parts) + (" (torch.cond at run time)" if len(plan) > 1 else "")
    return name, how


# -- the Triton weight-only GEMM -------------------------------------------------------------------

try:  # Triton ships with CUDA builds of torch; without it the entries below decline.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

if triton is not None:

    # M is the dynamic dim: one compiled kernel serves every row count (as in the AOTI package).
    @triton.jit(do_not_specialize=["M"])
    def _weight_only_mm_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
        M, N, K,
        stride_xm, stride_wn, stride_sn, stride_ym,
        INT4: tl.constexpr, GROUP_K: tl.constexpr, SWAP_AB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # y[M, N] = x[M, K] @ dequant(w)[N, K]^T in x's dtype with fp32 accumulation. The weight stays
        # quantized in memory (int8, fp8 or packed int4); each tile is dequantized in registers right
        # before the dot. SWAP_AB computes y^T = w @ x^T instead: Hopper's wgmma takes only its A
        # operand from registers, which is where the dequantized weight is.
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * num_pid_n
        first_m = (pid // width) * GROUP_M
        rows = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % rows
        pid_n = (pid % width) // rows
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, tl.cdiv(K, BLOCK_K)):
            k0 = kt * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
            if INT4:
                offs_kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_kb[None, :], mask=mask_n[:, None], other=0)
                q = tl.interleave((b >> 4) & 0xF, b & 0xF)  # the even element sits in the high nibble
                g = k0 // GROUP_K
                s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + offs_n * stride_sn + g, mask=mask_n, other=0).to(tl.float32)
                w = ((q.to(tl.float32) - z[:, None]) * s[:, None]).to(a.dtype)
            else:
                # No `other`: Triton cannot cast a fill value to fp8; masked rows are never stored.
                b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask_n[:, None])
                w = b.to(a.dtype)
            if SWAP_AB:
                acc = tl.dot(w, tl.trans(a), acc)
            else:
                acc = tl.dot(a, tl.trans(w), acc)
        if SWAP_AB:
            if not INT4:  # per-channel scale: one multiply in the epilogue instead of one per weight
                acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            tl.store(
                y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None],
                acc.to(y_ptr.dtype.element_ty),
                mask=mask_m[None, :] & mask_n[:, None],
            )
        else:
            if not INT4:
                acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(
                y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
                acc.to(y_ptr.dtype.element_ty),
                mask=mask_m[:, None] & mask_n[None, :],
            )

    @torch.library.triton_op("qexport::weight_only_mm", mutates_args=())
    def weight_only_mm(
        x: torch.Tensor,
        weight: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        int4: bool,
        group_k: int,
        tile: list[int],
    ) -> torch.Tensor:
        """x[M, K] @ dequant(weight)^T in x's dtype: weight int8 / float8_e4m3fn [N, K] with a
        per-channel `scale` [N], or uint4 packed [N, K/2] with `scale`/`zero_point` [N, K/group_k]
        (w = (q - zp) * s). `tile` = (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages,
        swap_ab); K % BLOCK_K == 0."""
        m, k = x.shape
        n = weight.shape[0]
        y = x.new_empty((m, n))
        bm, bn, bk, gm, nw, ns, swap = tile

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        torch.library.wrap_triton(_weight_only_mm_kernel)[grid](
            x, weight, scale, zero_point, y,
            m, n, k,
            x.stride(0), weight.stride(0), scale.stride(0), y.stride(0),
            INT4=int4, GROUP_K=group_k, SWAP_AB=bool(swap),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
            num_warps=nw, num_stages=ns,
        )
        return y


def _fit_tile(x2d: torch.Tensor, tile: Sequence[int], max_k: int | None = None) -> list[int]:
    bm, bn, bk, gm, nw, ns, swap = tile
    bk = min(bk, max_k or bk)
    k = int(x2d.shape[1])
    while k % bk:  # the kernel has no K mask: take the largest tile depth dividing K (K % 16 == 0)
        bk //= 2
    return [bm, bn, bk, gm, nw, ns, swap]


def triton_weight_mm(x2d: torch.Tensor, w: torch.Tensor, s: torch.Tensor, tile: Sequence[int]) -> torch.Tensor:
    """int8 or fp8 weights [N, K] with a per-channel scale."""
    return torch.ops.qexport.weight_only_mm(x2d.contiguous(), w, s, s, False, 0, _fit_tile(x2d, tile))


def triton_int4_mm(x2d: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group_size: int, tile: Sequence[int]) -> torch.Tensor:
    return torch.ops.qexport.weight_only_mm(x2d.contiguous(), w, s, z, True, group_size, _fit_tile(x2d, tile, group_size))


# -- entries ----------------------------------------------------------------------------------

def _check_linear(ctx: KernelContext, k_multiple: int) -> Decline | None:
    if ctx.input_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return Decline(f"input dtype {ctx.input_dtype} is not a float dtype")
    k = ctx.region.weight_shape[-1] if ctx.region.weight_shape else ctx.tensor("weight").shape[-1]
    if k % k_multiple:
        return Decline(f"in_features={k} is not a multiple of {k_multiple}")
    return None


def _bias(ctx: KernelContext, dtype: torch.dtype) -> list:
    return [("bias_" + str(dtype).removeprefix("torch."), ctx.tensor("bias").to(dtype))] if ctx.has("bias") else []


def _finish(y: torch.Tensor, x: torch.Tensor, bias: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if bias:
        y = y + bias[0]
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def int8_gemv(x2d: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # Inductor's own mm decomposition for M == 1 (torch/_inductor/decomposition.py), written out so
    # that it also applies when M is symbolic; one reduction kernel reads the weight once.
    return ((x2d.float().unsqueeze(1) * w.unsqueeze(0).float()).sum(-1) * s).to(torch.bfloat16)


def _choice(
    plan: list, build: Callable[[Any], Callable[..., torch.Tensor]], operands: list, n_bias: int, cast: torch.dtype | None
) -> KernelChoice:
    """A KernelChoice running `build(kernel)(x2d, *tensors)` for each bucket of `plan`, the input
    cast to `cast` first (the compute dtype of weight-only schemes; None where the activation is
    quantized from its own dtype, as the reference does)."""
    branches = [(max_m, build(kernel)) for max_m, kernel in plan]

    def body(x: torch.Tensor, *ops: torch.Tensor) -> torch.Tensor:
        tensors, bias = (ops[:-n_bias], ops[-n_bias:]) if n_bias else (ops, ())
        x2d = _as_2d(x) if cast is None else _as_2d(x).to(cast)
        return _finish(by_rows(x2d, branches, *tensors), x, bias)

    name, how = plan_note(plan)
    return KernelChoice(name=name, why=how, body=body, operands=operands)


@register_kernel("int8_weight_only", "cuda", "linear")
def int8_weight_only_cuda(ctx: KernelContext) -> KernelChoice | Decline | None:
    if triton is None:
        return Decline("Triton is not installed")
    if ctx.scheme.torch_compute_dtype != torch.bfloat16:
        return Decline(f"compute_dtype={ctx.scheme.compute_dtype}: the CUDA int8 weight-only kernels compute in bfloat16")
    declined = _check_linear(ctx, 16)
    if declined:
        return declined
    scheme, shape = ctx.scheme, tuple(ctx.tensor("weight").shape)
    scale = ctx.tensor("weight_scale").float().reshape(-1).expand(shape[0]).contiguous()
    plan = reachable(PLANS["int8_weight_only"], row_range(ctx))

    def build(kernel: Any) -> Callable[..., torch.Tensor]:
        kind = _kind(kernel)
        if kind == "gemv":
            return int8_gemv
        if kind == "triton":
            return lambda x, w, s: triton_weight_mm(x, w, s, kernel[1])
        return lambda x, w, s: x @ math_for(scheme).dequantize_weight(scheme, {"weight": w, "weight_scale": s}, shape).to(x.dtype).t()

    bias = _bias(ctx, torch.bfloat16)
    return _choice(plan, build, ["weight", ("weight_scale_per_channel", scale), *bias], len(bias), torch.bfloat16)


def tinygemm_operands(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, inner_k_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scheme's int4 tensors in tinygemm's layout (done once, at compile time, on the GPU)."""
    # The scheme packs two codes per byte with the even element in the high nibble: the uint8 input
    # `_convert_weight_to_int4pack` takes on CUDA.
    packed = aten._convert_weight_to_int4pack(weight.cuda().contiguous(), inner_k_tiles)
    # tinygemm dequantizes w = (q - 8) * s + z; the scheme's w = (q - zp) * s, so z = (8 - zp) * s.
    s = scale.float().cuda()
    z = (8 - zero_point.float().cuda()) * s
    return packed, torch.stack([s, z], -1).transpose(0, 1).contiguous().to(torch.bfloat16)


@register_kernel("int4", "cuda", "linear")
def int4_weight_only_cuda(ctx: KernelContext) -> KernelChoice | Decline | None:
    if triton is None:
        return Decline("Triton is not installed")
    declined = _check_linear(ctx, 32)
    if declined:
        return declined
    scheme, gs = ctx.scheme, ctx.scheme.group_size
    n, k = ctx.tensor("weight").shape[0], ctx.tensor("weight").shape[1] * 2
    if n % 8:
        return Decline(f"out_features={n} is not a multiple of 8 (tinygemm's N tile)")
    plan = reachable(PLANS["int4"], row_range(ctx))
    kinds = {_kind(kn) for _, kn in plan}
    operands: list = []
    if "tinygemm" in kinds:
        # tinygemm needs K % (16 * inner_k_tiles) == 0; 8 tiles is its fastest layout.
        inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
        packed, sz = tinygemm_operands(ctx.tensor("weight"), ctx.tensor("weight_scale"), ctx.tensor("weight_zero_point"), inner_k_tiles)
        operands += [("weight_int4pack", packed), ("weight_scales_and_zeros", sz)]
    if kinds - {"tinygemm"}:
        operands += ["weight", "weight_scale", "weight_zero_point"]
    n_tg = 2 if "tinygemm" in kinds else 0

    def build(kernel: Any) -> Callable[..., torch.Tensor]:
        kind = _kind(kernel)
        if kind == "tinygemm":
            return lambda x, wp, sz, *_: aten._weight_int4pack_mm(x.contiguous(), wp, gs, sz)
        if kind == "triton":
            return lambda x, *o: triton_int4_mm(x, *o[n_tg:], gs, kernel[1])

        def dequant_mm(x: torch.Tensor, *o: torch.Tensor) -> torch.Tensor:
            t = dict(zip(("weight", "weight_scale", "weight_zero_point"), o[n_tg:]))
            return x @ math_for(scheme).dequantize_weight(scheme, t, (n, k)).to(x.dtype).t()

        return dequant_mm

    bias = _bias(ctx, torch.bfloat16)
    return _choice(plan, build, [*operands, *bias], len(bias), torch.bfloat16)


@register_kernel("fp8", "cuda", "linear")
def fp8_scaled_mm_cuda(ctx: KernelContext) -> KernelChoice | Decline | None:
    scheme = ctx.scheme
    if scheme.activation != "dynamic":
        return None
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        return Decline("aten._scaled_mm needs an sm_89+ GPU (Ada, Hopper)")
    declined = _check_linear(ctx, 16)
    if declined:
        return declined
    n = ctx.tensor("weight").shape[0]
    if n % 16:
        return Decline(f"out_features={n} is not a multiple of 16 (aten._scaled_mm)")
    plan = reachable(PLANS["fp8"], row_range(ctx))
    if triton is None:
        plan = [(None, "scaled_mm")]
    per_token = scheme.act_granularity == "per_token"
    cd = scheme.torch_compute_dtype
    scale_b = ctx.tensor("weight_scale").float().reshape(1, -1).expand(1, n).contiguous()

    def scaled_mm(x2d: torch.Tensor, w: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
        q, sa = act.quantize_fp8(x2d, per_token)
        # Rowwise scaling wants one scale per row on both sides.
        sa = sa.reshape(-1, 1).expand(x2d.shape[0], 1).contiguous()
        return aten._scaled_mm(q, w.t(), sa, sb, None, None, cd, True)

    def build(kernel: Any) -> Callable[..., torch.Tensor]:
        if _kind(kernel) == "triton":
            # Few rows: the fp8 GEMM would idle its tensor cores; the weight-only GEMM reads the same
            # fp8 bytes, with the activation fake-quantized exactly as the reference does.
            return lambda x, w, sb: triton_weight_mm(act.dynamic_fp8(x, per_token).to(cd), w, sb.reshape(-1), kernel[1])
        return scaled_mm

    bias = _bias(ctx, cd)
    return _choice(plan, build, ["weight", ("weight_scale_row", scale_b), *bias], len(bias), None)


@register_kernel("int8_dynamic", "cuda", "linear")
def int8_dynamic_int_mm_cuda(ctx: KernelContext) -> KernelChoice | Decline | None:
    scheme = ctx.scheme
    declined = _check_linear(ctx, 8)
    if declined:
        return declined
    w = ctx.tensor("weight")
    n = w.shape[0]
    if n % 8:
        return Decline(f"out_features={n} is not a multiple of 8 (aten._int_mm)")
    per_token = scheme.act_granularity == "per_token"
    cd = scheme.torch_compute_dtype
    scale = ctx.tensor("weight_scale").float().reshape(-1).expand(n).contiguous()
    # sum_k (xq_k - zp) w_k = (xq @ w^T) - zp * sum_k w_k: the row sums are constants of the package.
    w_sum = w.to(torch.int32).sum(1).float()
    plan = reachable(PLANS["int8_dynamic"], row_range(ctx))

    def gemv(x2d: torch.Tensor, w: torch.Tensor, s: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        xq = act.dynamic_int8(x2d.float(), per_token)
        return ((xq.unsqueeze(1) * w.unsqueeze(0).float()).sum(-1) * s).to(cd)

    def int_mm(x2d: torch.Tensor, w: torch.Tensor, s: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        xf = x2d.float()
        if per_token:
            mn, mx = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
        else:
            mn, mx = xf.amin(), xf.amax()
        sx, zp = act.int8_asym_qparams(mn, mx)
        q = act.quantize_int8(xf, sx, zp).to(torch.int8)
        m = q.shape[0]
        pad = torch.sym_max(_INT_MM_MIN_M - m, 0)
        acc = aten._int_mm(torch.cat([q, q.new_zeros((pad, q.shape[1]))]), w.t())[:m]
        return (sx * s * (acc.float() - zp * ws)).to(cd)

    bias = _bias(ctx, cd)
    operands = ["weight", ("weight_scale_per_channel", scale), ("weight_row_sum", w_sum), *bias]
    return _choice(plan, lambda kernel: gemv if _kind(kernel) == "gemv" else int_mm, operands, len(bias), None)
