"""CUDA kernels for the AOTInductor backend (see `kernels/__init__.py` for the contract).

Measured on the lent H100 (docs/benchmarks/cuda.md, ../shared/GPU_BASELINE.md): every weight-only
family is memory-bound at small M and compute-bound at large M, and no single kernel wins both ends,
so each entry picks its kernel by M, the activation's row count:

- int8 weight-only: M <= INT8_GEMV_MAX_M a GEMV written as a broadcast-multiply-sum, which Inductor
  fuses (int8 load, dequant, reduction) into one Triton reduction kernel, tuned by coordinate descent
  at compile time (`INDUCTOR_OPTIONS`); above it a Triton GEMM that loads int8 weights and dequantizes
  them in registers (`qexport::weight_only_mm`).
- int4: tinygemm `aten._weight_int4pack_mm` up to INT4_TINYGEMM_MAX_M (weights converted once, at
  compile time), the same Triton GEMM reading the scheme's own packed layout above it.
- fp8: per-row activation quantization (fused by Inductor into one kernel) + `aten._scaled_mm` rowwise.
- int8 dynamic: `aten._int_mm` (int8 x int8 -> int32) with the zero-point correction in the epilogue;
  small M stays a fused GEMV.

Where the exported program's range for M proves one side of a crossover the other side is never
built; otherwise `torch.cond` picks at run time (AOTInductor compiles both branches).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ...schemes import _activation as act
from . import Decline, KernelChoice, KernelContext, register_kernel

aten = torch.ops.aten

# Row-count crossovers, from benchmarks/bench_cuda.py on the H100 (docs/benchmarks/cuda.md).
INT8_GEMV_MAX_M = 4
INT4_TINYGEMM_MAX_M = 8
INT8_DYNAMIC_GEMV_MAX_M = 4
# aten._int_mm on CUDA needs more than 16 rows; fewer are padded with zero rows.
_INT_MM_MIN_M = 17

# Inductor options the kernels here rely on; `qexport.compile(device="cuda")` merges them under the
# caller's. Without coordinate descent Inductor's GEMV reduction runs at a third of the bandwidth
# (GPU_BASELINE.md: 143 µs -> 12 µs for one 4096x4096 int8 layer at M=1).
INDUCTOR_OPTIONS = {"coordinate_descent_tuning": True}

# Triton GEMM tile configurations by M bucket (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages).
# Small M: narrow N tiles so 4096 output columns still make >= 128 programs for 132 SMs.
SMALL_M_TILE = (16, 32, 256, 1, 4, 4)
LARGE_M_TILE = (128, 128, 64, 8, 8, 3)
SMALL_M_TILE_MAX_M = 64


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def by_rows(
    x2d: torch.Tensor,
    branches: Sequence[tuple[int | None, Callable[..., torch.Tensor]]],
    *operands: torch.Tensor,
) -> torch.Tensor:
    """Run the first `fn(x2d, *operands)` of `branches` whose `max_m` covers x2d's row count.

    `branches` is [(max_m, fn), ..., (None, fn)]. A branch the row count's range (static or
    symbolic) rules out is never traced; an undecided crossover becomes `torch.cond`, since a
    Python `if` on a dynamic dim would specialise the whole program to one side.
    """
    m = x2d.shape[0]
    (max_m, fn), rest = branches[0], branches[1:]
    if max_m is None or not rest:
        return fn(x2d, *operands)
    if statically_known_true(m <= max_m):
        return fn(x2d, *operands)
    if statically_known_true(m > max_m):
        return by_rows(x2d, rest, *operands)

    def above(x: torch.Tensor, *ops: torch.Tensor) -> torch.Tensor:
        return by_rows(x, rest, *ops)

    return torch.cond(m <= max_m, fn, above, (x2d, *operands))


def _row_range_note(ctx: KernelContext, branches: Sequence[tuple[int | None, str]]) -> str:
    m = _as_2d(ctx.input_val).shape[0]
    parts = []
    lo = 1
    for max_m, name in branches:
        if max_m is None:
            parts.append(f"M>={lo}: {name}")
        else:
            parts.append(f"M<={max_m}: {name}" if lo == 1 else f"M in [{lo},{max_m}]: {name}")
            lo = max_m + 1
    static = "" if isinstance(m, int) else " (chosen at run time by torch.cond where the exported range spans a crossover)"
    return "; ".join(parts) + static


# -- the Triton weight-only GEMM -------------------------------------------------------------------

try:  # Triton ships with CUDA builds of torch; without it the entries below decline.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

if triton is not None:

    @triton.jit
    def _weight_only_mm_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
        M, N, K,
        stride_xm, stride_wn, stride_sn, stride_ym,
        INT4: tl.constexpr, GROUP_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # y[M, N] = x[M, K] @ dequant(w)[N, K]^T in x's dtype with fp32 accumulation. The weight stays
        # quantized in memory; each tile is dequantized in registers right before the dot.
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
                s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0)
                z = tl.load(z_ptr + offs_n * stride_sn + g, mask=mask_n, other=0).to(tl.float32)
                w = ((q.to(tl.float32) - z[:, None]) * s[:, None]).to(a.dtype)
            else:
                b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask_n[:, None], other=0)
                w = b.to(a.dtype)
            acc = tl.dot(a, tl.trans(w), acc)
        if not INT4:  # per-channel scale: one multiply in the epilogue instead of one per weight
            acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
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
        block_m: int,
        block_n: int,
        block_k: int,
        group_m: int,
        num_warps: int,
        num_stages: int,
    ) -> torch.Tensor:
        """bf16 x[M, K] @ dequant(weight)^T: int8 [N, K] with per-channel `scale` [N], or int4 packed
        [N, K/2] with `scale`/`zero_point` [N, K/group_k] (w = (q - zp) * s). K % block_k == 0."""
        m, k = x.shape
        n = weight.shape[0]
        y = x.new_empty((m, n))

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        torch.library.wrap_triton(_weight_only_mm_kernel)[grid](
            x, weight, scale, zero_point, y,
            m, n, k,
            x.stride(0), weight.stride(0), scale.stride(0), y.stride(0),
            INT4=int4, GROUP_K=group_k,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
            num_warps=num_warps, num_stages=num_stages,
        )
        return y


def _tile_for(x2d: torch.Tensor, tile: tuple[int, ...] | None = None) -> tuple[int, ...]:
    if tile is None:
        tile = SMALL_M_TILE if statically_known_true(x2d.shape[0] <= SMALL_M_TILE_MAX_M) else LARGE_M_TILE
    bm, bn, bk, gm, nw, ns = tile
    k = int(x2d.shape[1])
    while k % bk:  # the kernel has no K mask: take the largest tile depth dividing K (K % 16 == 0)
        bk //= 2
    return bm, bn, bk, gm, nw, ns


def triton_int8_mm(x2d: torch.Tensor, w: torch.Tensor, s: torch.Tensor, tile: tuple[int, ...] | None = None) -> torch.Tensor:
    bm, bn, bk, gm, nw, ns = _tile_for(x2d, tile)
    return torch.ops.qexport.weight_only_mm(x2d.contiguous(), w, s, s, False, 0, bm, bn, bk, gm, nw, ns)


def triton_int4_mm(
    x2d: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group_size: int, tile: tuple[int, ...] | None = None
) -> torch.Tensor:
    bm, bn, bk, gm, nw, ns = _tile_for(x2d, tile)
    return torch.ops.qexport.weight_only_mm(x2d.contiguous(), w, s, z, True, group_size, bm, bn, min(bk, group_size), gm, nw, ns)


def _tile_branches(mm: Callable[..., torch.Tensor]) -> list[tuple[int | None, Callable[..., torch.Tensor]]]:
    """The Triton GEMM as two row buckets, each with its own tiles (a kernel's tile is fixed at compile time)."""
    return [
        (SMALL_M_TILE_MAX_M, lambda x, *o: mm(x, *o, tile=SMALL_M_TILE)),
        (None, lambda x, *o: mm(x, *o, tile=LARGE_M_TILE)),
    ]


# -- entries ----------------------------------------------------------------------------------

def _check_linear(ctx: KernelContext, k_multiple: int) -> Decline | None:
    if ctx.input_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return Decline(f"input dtype {ctx.input_dtype} is not a float dtype")
    n, k = ctx.region.weight_shape or ctx.tensor("weight").shape
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
    # that it also applies when M is symbolic; one reduction kernel reads the int8 weight once.
    return ((x2d.float().unsqueeze(1) * w.unsqueeze(0).float()).sum(-1) * s).to(torch.bfloat16)


@register_kernel("int8_weight_only", "cuda", "linear")
def int8_weight_only_cuda(ctx: KernelContext) -> KernelChoice | Decline | None:
    if triton is None:
        return Decline("Triton is not installed")
    if ctx.scheme.torch_compute_dtype != torch.bfloat16:
        return Decline(f"compute_dtype={ctx.scheme.compute_dtype}: the CUDA int8 weight-only kernels compute in bfloat16")
    declined = _check_linear(ctx, 16)
    if declined:
        return declined
    n = ctx.tensor("weight").shape[0]
    scale = ctx.tensor("weight_scale").float().reshape(-1).expand(n).contiguous()
    branches = [(INT8_GEMV_MAX_M, int8_gemv), *_tile_branches(triton_int8_mm)]

    def body(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, *bias: torch.Tensor) -> torch.Tensor:
        return _finish(by_rows(_as_2d(x).to(torch.bfloat16), branches, w, s), x, bias)

    return KernelChoice(
        name="int8 GEMV (Inductor) | Triton w8a16 GEMM",
        why=_row_range_note(ctx, [(INT8_GEMV_MAX_M, "fused dequant GEMV"), (None, "Triton GEMM dequantizing int8 in registers")]),
        body=body,
        operands=["weight", ("weight_scale_per_channel", scale), *_bias(ctx, torch.bfloat16)],
    )


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
    n, k = ctx.tensor("weight").shape[0], ctx.tensor("weight").shape[1] * 2
    if n % 8:
        return Decline(f"out_features={n} is not a multiple of 8 (tinygemm's N tile)")
    # tinygemm needs K % (16 * inner_k_tiles) == 0; 8 tiles is its fastest layout.
    inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
    gs = ctx.scheme.group_size
    m = _as_2d(ctx.input_val).shape[0]
    need_tinygemm = not statically_known_true(m > INT4_TINYGEMM_MAX_M)
    need_triton = not statically_known_true(m <= INT4_TINYGEMM_MAX_M)
    operands: list = []
    if need_tinygemm:
        packed, sz = tinygemm_operands(ctx.tensor("weight"), ctx.tensor("weight_scale"), ctx.tensor("weight_zero_point"), inner_k_tiles)
        operands += [("weight_int4pack", packed), ("weight_scales_and_zeros", sz)]
    if need_triton:
        operands += ["weight", "weight_scale", "weight_zero_point"]
    operands += _bias(ctx, torch.bfloat16)
    n_bias = int(ctx.has("bias"))

    def tinygemm(x2d: torch.Tensor, wp: torch.Tensor, sz: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return aten._weight_int4pack_mm(x2d.contiguous(), wp, gs, sz)

    def triton_mm(x2d: torch.Tensor, *o: torch.Tensor, tile: tuple[int, ...]) -> torch.Tensor:
        w, s, z = o[-3:]
        return triton_int4_mm(x2d, w, s, z, gs, tile=tile)

    branches: list = []
    if need_tinygemm:
        branches.append((INT4_TINYGEMM_MAX_M if need_triton else None, tinygemm))
    if need_triton:
        branches += _tile_branches(triton_mm)

    def body(x: torch.Tensor, *ops: torch.Tensor) -> torch.Tensor:
        tensors, bias = (ops[:-n_bias], ops[-n_bias:]) if n_bias else (ops, ())
        return _finish(by_rows(_as_2d(x).to(torch.bfloat16), branches, *tensors), x, bias)

    names = [(INT4_TINYGEMM_MAX_M, "tinygemm _weight_int4pack_mm"), (None, "Triton GEMM dequantizing int4 in registers")]
    return KernelChoice(
        name="tinygemm | Triton w4a16 GEMM" if need_tinygemm and need_triton else ("tinygemm" if need_tinygemm else "Triton w4a16 GEMM"),
        why=_row_range_note(ctx, names if need_tinygemm and need_triton else names[:1] if need_tinygemm else names[1:]),
        body=body,
        operands=operands,
    )


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
    per_token = scheme.act_granularity == "per_token"
    cd = scheme.torch_compute_dtype
    scale_b = ctx.tensor("weight_scale").float().reshape(1, -1).expand(1, n).contiguous()

    def body(x: torch.Tensor, w: torch.Tensor, sb: torch.Tensor, *bias: torch.Tensor) -> torch.Tensor:
        x2d = _as_2d(x)
        q, sa = act.quantize_fp8(x2d, per_token)
        # Rowwise scaling wants one scale per row on both sides.
        sa = sa.reshape(-1, 1).expand(x2d.shape[0], 1).contiguous()
        y = aten._scaled_mm(q, w.t(), sa, sb, None, None, cd, True)
        return _finish(y, x, bias)

    return KernelChoice(
        name="aten._scaled_mm rowwise",
        why="dynamic fp8 activations quantized by one fused Inductor kernel, fp8 tensor-core GEMM with fast accumulation",
        body=body,
        operands=["weight", ("weight_scale_row", scale_b), *_bias(ctx, cd)],
    )


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

    def body(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, ws: torch.Tensor, *bias: torch.Tensor) -> torch.Tensor:
        y = by_rows(_as_2d(x), [(INT8_DYNAMIC_GEMV_MAX_M, gemv), (None, int_mm)], w, s, ws)
        return _finish(y, x, bias)

    return KernelChoice(
        name="int8 GEMV (Inductor) | aten._int_mm",
        why=_row_range_note(ctx, [(INT8_DYNAMIC_GEMV_MAX_M, "fused fp32 GEMV"), (None, "int8 x int8 -> int32 tensor-core GEMM")]),
        body=body,
        operands=["weight", ("weight_scale_per_channel", scale), ("weight_row_sum", w_sum), *_bias(ctx, cd)],
    )
