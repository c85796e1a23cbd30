"""CUDA kernels for the AOTInductor backend (see `kernels/__init__.py` for the contract).

Measured on the lent H100 (docs/benchmarks/cuda.md): the weight-only families are memory-bound at
small M (rows of the activation) and compute-bound at large M, and no one kernel wins at both ends,
so each family has a PLAN: row buckets, each with the kernel that won there.

- "gemv": a broadcast-multiply-sum that Inductor fuses (weight load, dequant, reduction) into one
  Triton reduction kernel, tuned by coordinate descent at compile time (`INDUCTOR_OPTIONS`);
- "tinygemm": `aten._weight_int4pack_mm`, weights converted to its layout once, at compile time;
- ("triton", tile): `qexport::weight_only_mm`, a Triton GEMM that reads int8 / fp8 / packed int4
  weights and dequantizes each tile in registers;
- ("triton_fp8", tile): the same GEMM on fp8 activation codes with per-row scales, fp8 x fp8 on the
  tensor cores (no cuBLASLt algorithm search per call, which made `_scaled_mm` host-bound below ~512 rows);
- "dequant_mm": the scheme's own dequantization (one fused Inductor kernel) then cuBLAS;
- "bf16_weights": cuBLAS on weights the scheme's math decoded to bf16 once, at compile time: where
  the GEMM is compute-bound no kernel reading quantized weights beats cuBLAS on bf16 ones (the lab's
  Triton GEMM reached 77 % of cuBLAS at M=4096 even on bf16 weights), so the rows the compile
  option `qexport.large_m` ("bf16_weights", the default) hands to this kernel run exactly as fast as
  bf16, at +2 bytes per weight; `qexport.large_m="dequant"` keeps only quantized weights;
- "scaled_mm": fp8 activations quantized per row (`qexport::fp8_quantize_rows`, one Triton program per
  row: Inductor's reduction, tuned for the example's row count, took 48 µs where this takes 22 at
  M=4096), then `aten._scaled_mm` rowwise;
- "int_mm": int8 activations, `aten._int_mm` (int8 x int8 -> int32), zero-point correction in the epilogue;
- ("triton_int8", tile): per-token int8 activations (`qexport::int8_quantize_rows`) into the same Triton
  GEMM, int8 x int8 -> int32 with the zero-point correction and both scales in its epilogue.

Buckets the exported program's range for M rules out are never built; where the range spans a
crossover `torch.cond` picks at run time (AOTInductor compiles every branch into the package).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

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
TILE_M64_SWAP = (64, 64, 128, 8, 4, 4, 1)
TILE_M128_SWAP = (128, 64, 128, 8, 4, 4, 1)
# 8-bit x 8-bit (fp8 or int8 activation codes): deeper K tiles, the weight rows on the MMA's M side.
TILE_Q8_M16_SWAP = (16, 64, 256, 8, 4, 4, 1)  # fp8 and int8 sweeps' best up to 32 rows
TILE_Q8_M32_SWAP = (32, 64, 256, 8, 4, 4, 1)
TILE_Q8_M64_SWAP = (64, 64, 256, 8, 4, 4, 1)
TILE_Q8_M128_SWAP = (128, 64, 256, 8, 4, 4, 1)
TILE_Q8_M128_K128_SWAP = (128, 64, 128, 8, 8, 4, 1)
TILE_Q8_M128_N128 = (128, 128, 128, 8, 4, 3, 0)

# (max rows, kernel) per family, in row order; the last bucket has no bound. Each bucket is the
# fastest kernel at those rows in the per-layer sweeps (benchmarks/cuda_tiles.py and bench_cuda.py
# --lab, 4096x4096, H100, docs/benchmarks/cuda.md). The weight-only plans are the memory-lean ones
# (`qexport.large_m="dequant"`): above the last Triton bucket cuBLAS on a freshly dequantized weight
# wins, as these Triton GEMMs reach ~60-77 % of cuBLAS when compute-bound; `weight_only_plan` cuts
# them at LARGE_M_FROM for the default policy.
PLANS: dict[str, list[tuple[int | None, Any]]] = {
    "int8_weight_only": [
        (1, "gemv"), (16, ("triton", TILE_M16_K256)), (32, ("triton", TILE_M16_K128)),
        (64, ("triton", TILE_M16_N64)), (128, ("triton", TILE_M64_SWAP)), (256, ("triton", TILE_M128_SWAP)),
        (None, "dequant_mm"),
    ],
    "int4": [(8, "tinygemm"), (32, ("triton", TILE_M16_K128)), (128, ("triton", TILE_M32_N64)), (None, "dequant_mm")],
    # Per-row activations: the activation quantized by `qexport::fp8_quantize_rows`, then fp8 x fp8 on
    # the tensor cores; up to 256 rows in our Triton GEMM (14-17 µs per layer where `_scaled_mm` takes
    # 18 on the GPU and, in a package, as long again on the host choosing its cuBLASLt algorithm).
    "fp8": [
        (32, ("triton_fp8", TILE_Q8_M16_SWAP)), (128, ("triton_fp8", TILE_Q8_M64_SWAP)), (256, ("triton_fp8", TILE_Q8_M128_SWAP)),
        (None, "scaled_mm"),
    ],
    # One scale for the whole activation needs a grid-wide reduction first, left to Inductor: the
    # bf16-activation GEMM on fp8 weights for few rows, `_scaled_mm` above.
    "fp8_per_tensor": [(16, ("triton", TILE_M16_K256)), (None, "scaled_mm")],
    # Per-token activations: `qexport::int8_quantize_rows`, then int8 x int8 -> int32 in our Triton GEMM
    # with the zero-point correction and scales in its epilogue (lab, 4096x4096: 15 µs at M=1, 17.6 at
    # 256, 124.5 at 4096 where bf16 takes 22, 27 and 178, and `_int_mm` alone 170 at 4096).
    "int8_dynamic": [
        (32, ("triton_int8", TILE_Q8_M16_SWAP)), (128, ("triton_int8", TILE_Q8_M32_SWAP)),
        (512, ("triton_int8", TILE_Q8_M128_K128_SWAP)), (None, ("triton_int8", TILE_Q8_M128_N128)),
    ],
    # One scale for the whole activation: its reduction left to Inductor, then `_int_mm`.
    "int8_dynamic_per_tensor": [(4, "gemv"), (None, "int_mm")],
}
# With `qexport.large_m="bf16_weights"` (the default) a weight-only plan stops at these rows and cuBLAS
# on bf16 weights takes the rest: above them the lab's best quantized kernel no longer beats cuBLAS
# (int8 at M=64: Triton 22.4 vs 22.0 µs; int4 at M=32: 22.5 vs 21.8 µs).
LARGE_M_FROM = {"int8_weight_only": 32, "int4": 16}
# aten._int_mm on CUDA needs more than 16 rows; fewer are padded with zero rows.
_INT_MM_MIN_M = 17

# Inductor options the kernels here rely on; `qexport.compile(device="cuda")` merges them under the
# caller's. Without coordinate descent Inductor's GEMV reduction runs at a third of the bandwidth
# (GPU_BASELINE.md: 143 µs -> 12 µs for one 4096x4096 int8 layer at M=1).
INDUCTOR_OPTIONS = {"coordinate_descent_tuning": True}

KERNEL_NAMES = {
    "gemv": "Inductor GEMV", "tinygemm": "tinygemm", "triton": "Triton GEMM", "triton_fp8": "Triton fp8 GEMM", "triton_int8": "Triton int8 GEMM",
    "dequant_mm": "dequant+cuBLAS",
    "bf16_weights": "cuBLAS on bf16 weights",
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


def weight_only_plan(family: str, ctx: KernelContext) -> list[tuple[int | None, Any]]:
    """The family's buckets for the rows `ctx`'s program accepts, under its `qexport.large_m` policy."""
    plan = PLANS[family]
    if ctx.options.get("qexport.large_m", "bf16_weights") == "bf16_weights":
        cut, kept = LARGE_M_FROM[family], []
        for max_m, kernel in plan:  # the bucket that spans the cut ends at it
            kept.append((cut if max_m is None or max_m >= cut else max_m, kernel))
            if kept[-1][0] == cut:
                break
        plan = [*kept, (None, "bf16_weights")]
    return reachable(plan, row_range(ctx))


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
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

if triton is not None:

    # M is the dynamic dim: one compiled kernel serves every row count (as in the AOTI package).
    @triton.jit(do_not_specialize=["M"])
    def _weight_only_mm_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, xs_ptr, xz_ptr, ws_ptr, y_ptr,
        M, N, K,
        stride_xm, stride_wn, stride_sn, stride_ym,
        INT4: tl.constexpr, GROUP_K: tl.constexpr, SWAP_AB: tl.constexpr, X_SCALE: tl.constexpr, X_ZP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # y[M, N] = x[M, K] @ dequant(w)[N, K]^T in x's dtype with fp32 accumulation. The weight stays
        # quantized in memory (int8, fp8 or packed int4); each tile is dequantized in registers right
        # before the dot. SWAP_AB computes y^T = w @ x^T instead: Hopper's wgmma takes only its A
        # operand from registers, which is where the dequantized weight is. X_SCALE: x holds fp8
        # codes with one scale per row (xs), the dot runs fp8 x fp8 on the tensor cores. X_ZP: x
        # holds int8 codes with a scale and zero point per row (xs, xz), the dot runs int8 x int8
        # into int32 and the epilogue subtracts xz * sum_k w (ws, per output column).
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
        acc_dtype = tl.int32 if X_ZP else tl.float32
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=acc_dtype)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
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
                acc = tl.dot(w, tl.trans(a), acc, out_dtype=acc_dtype)
            else:
                acc = tl.dot(a, tl.trans(w), acc, out_dtype=acc_dtype)
        acc = acc.to(tl.float32)
        if SWAP_AB:
            if X_ZP:
                xz = tl.load(xz_ptr + offs_m, mask=mask_m, other=0.0)
                acc = acc - xz[None, :] * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
            if not INT4:  # per-channel scale: one multiply in the epilogue instead of one per weight
                acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            if X_SCALE:
                acc = acc * tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)[None, :]
            tl.store(
                y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None],
                acc.to(y_ptr.dtype.element_ty),
                mask=mask_m[None, :] & mask_n[:, None],
            )
        else:
            if X_ZP:
                xz = tl.load(xz_ptr + offs_m, mask=mask_m, other=0.0)
                acc = acc - xz[:, None] * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
            if not INT4:
                acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if X_SCALE:
                acc = acc * tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
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
        x_scale: Optional[torch.Tensor] = None,
        out_dtype: Optional[torch.dtype] = None,
        x_zero_point: Optional[torch.Tensor] = None,
        weight_row_sum: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x[M, K] @ dequant(weight)^T in x's dtype: weight int8 / float8_e4m3fn [N, K] with a
        per-channel `scale` [N], or uint4 packed [N, K/2] with `scale`/`zero_point` [N, K/group_k]
        (w = (q - zp) * s). With `x_scale` [M, 1], x is float8_e4m3fn codes scaled per row and the
        result is `out_dtype`; with `x_zero_point` [M, 1] too, x and weight are int8 codes and
        `weight_row_sum` [N] is sum_k weight (x = (codes - zp) * scale). `tile` = (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages,
        swap_ab); K % BLOCK_K == 0."""
        m, k = x.shape
        n = weight.shape[0]
        y = x.new_empty((m, n), dtype=out_dtype or x.dtype)
        bm, bn, bk, gm, nw, ns, swap = tile

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        torch.library.wrap_triton(_weight_only_mm_kernel)[grid](
            x, weight, scale, zero_point,
            scale if x_scale is None else x_scale,
            scale if x_zero_point is None else x_zero_point,
            scale if weight_row_sum is None else weight_row_sum,
            y,
            m, n, k,
            x.stride(0), weight.stride(0), scale.stride(0), y.stride(0),
            INT4=int4, GROUP_K=group_k, SWAP_AB=bool(swap), X_SCALE=x_scale is not None, X_ZP=x_zero_point is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
            num_warps=nw, num_stages=ns,
        )
        return y

    # M is the dynamic dim, as above; rows index in int64 so that M * K may pass 2**31.
    @triton.jit(do_not_specialize=["M"])
    def _fp8_quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
        # One program per row: the row is read once and its amax, scale and codes stay in registers,
        # the math of `_activation.quantize_fp8` (448 = float8_e4m3fn's max, 2**-23 = fp32 eps), its
        # divisions done as torch does them (see `_int8_quantize_rows_kernel`).
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) * (1.0 / 448.0), 1.1920928955078125e-07)
        q = tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0).to(tl.float8e4nv)
        tl.store(q_ptr + row * stride_qm + offs, q, mask=mask)
        tl.store(s_ptr + row, scale)

    @torch.library.triton_op("qexport::fp8_quantize_rows", mutates_args=())
    def fp8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic per-row float8_e4m3fn quantization of x[M, K]: (codes [M, K], fp32 scales [M, 1])."""
        m, k = x.shape
        q = x.new_empty((m, k), dtype=torch.float8_e4m3fn)
        scale = x.new_empty((m, 1), dtype=torch.float32)
        block = triton.next_power_of_2(k)

        def grid(meta):
            return (m,)

        torch.library.wrap_triton(_fp8_quantize_rows_kernel)[grid](
            x, q, scale, m, k, x.stride(0), q.stride(0), BLOCK_K=block, num_warps=4 if block <= 4096 else 8,
        )
        return q, scale

    @triton.jit(do_not_specialize=["M"])
    def _int8_quantize_rows_kernel(x_ptr, q_ptr, s_ptr, z_ptr, M, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
        # `_activation.dynamic_int8` per token in one pass: asymmetric int8 over [min(x, 0), max(x, 0)],
        # round half to even as torch.round; 2**-23 = fp32 eps. Divisions as torch does them, or codes
        # move by one (seen on the H100: 0.5 % of them): by a Python number, times its fp32 reciprocal;
        # by a tensor, IEEE-rounded (div_rn; Triton's `/` is approximate).
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        mn = tl.minimum(tl.min(x, axis=0), 0.0)
        mx = tl.maximum(tl.max(x, axis=0), 0.0)
        scale = tl.maximum((mx - mn) * (1.0 / 255.0), 1.1920928955078125e-07)
        zp = tl.clamp(-128.0 - libdevice.rint(tl.math.div_rn(mn, scale)), -128.0, 127.0)
        q = tl.clamp(libdevice.rint(tl.math.div_rn(x, scale)) + zp, -128.0, 127.0)
        tl.store(q_ptr + row * stride_qm + offs, q.to(tl.int8), mask=mask)
        tl.store(s_ptr + row, scale)
        tl.store(z_ptr + row, zp)

    @torch.library.triton_op("qexport::int8_quantize_rows", mutates_args=())
    def int8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dynamic per-row asymmetric int8 quantization of x[M, K]: (codes, fp32 scales [M, 1], fp32
        zero points [M, 1])."""
        m, k = x.shape
        q = x.new_empty((m, k), dtype=torch.int8)
        scale = x.new_empty((m, 1), dtype=torch.float32)
        zp = x.new_empty((m, 1), dtype=torch.float32)
        block = triton.next_power_of_2(k)

        def grid(meta):
            return (m,)

        torch.library.wrap_triton(_int8_quantize_rows_kernel)[grid](
            x, q, scale, zp, m, k, x.stride(0), q.stride(0), BLOCK_K=block, num_warps=4 if block <= 4096 else 8,
        )
        return q, scale, zp


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
    plan: list, build: Callable[[Any], Callable[..., torch.Tensor]], operands: list, bias: list, cast: torch.dtype | None
) -> KernelChoice:
    """A KernelChoice running `build(kernel)(x2d, t)` for each bucket of `plan`, where `t` maps each
    operand's name (its role, or its suffix for a tensor computed here) to its tensor; the input is
    cast to `cast` first (the compute dtype of weight-only schemes; None where the activation is
    quantized from its own dtype, as the reference does)."""
    names = [o if isinstance(o, str) else o[0] for o in operands]

    def named(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return lambda x2d, *ts: fn(x2d, dict(zip(names, ts)))

    branches = [(max_m, named(build(kernel))) for max_m, kernel in plan]

    def body(x: torch.Tensor, *ops: torch.Tensor) -> torch.Tensor:
        x2d = _as_2d(x) if cast is None else _as_2d(x).to(cast)
        return _finish(by_rows(x2d, branches, *ops[: len(names)]), x, ops[len(names):])

    name, how = plan_note(plan)
    return KernelChoice(name=name, why=how, body=body, operands=[*operands, *bias])


def _decoded(ctx: KernelContext, roles: Sequence[str], shape: tuple[int, ...]) -> tuple[str, torch.Tensor]:
    """The "bf16_weights" operand: the scheme's own dequantization, run once here, so those rows
    compute exactly what the reference does."""
    scheme = ctx.scheme
    w = math_for(scheme).dequantize_weight(scheme, {r: ctx.tensor(r) for r in roles}, shape)
    return ("weight_bf16", w.to(torch.bfloat16).contiguous())


def _cublas_bf16(x: torch.Tensor, t: dict) -> torch.Tensor:
    return x @ t["weight_bf16"].t()


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
    plan = weight_only_plan("int8_weight_only", ctx)
    kinds = {_kind(k) for _, k in plan}
    operands: list = []
    if kinds - {"bf16_weights"}:
        scale = ctx.tensor("weight_scale").float().reshape(-1).expand(shape[0]).contiguous()
        operands += ["weight", ("weight_scale_per_channel", scale)]
    if "bf16_weights" in kinds:
        operands.append(_decoded(ctx, ("weight", "weight_scale"), shape))

    def build(kernel: Any) -> Callable[..., torch.Tensor]:
        kind = _kind(kernel)
        if kind == "gemv":
            return lambda x, t: int8_gemv(x, t["weight"], t["weight_scale_per_channel"])
        if kind == "triton":
            return lambda x, t: triton_weight_mm(x, t["weight"], t["weight_scale_per_channel"], kernel[1])
        if kind == "bf16_weights":
            return _cublas_bf16

        def dequant_mm(x: torch.Tensor, t: dict) -> torch.Tensor:
            w = math_for(scheme).dequantize_weight(scheme, {"weight": t["weight"], "weight_scale": t["weight_scale_per_channel"]}, shape)
            return x @ w.to(x.dtype).t()

        return dequant_mm

    return _choice(plan, build, operands, _bias(ctx, torch.bfloat16), torch.bfloat16)


def tinygemm_operands(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, inner_k_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scheme's int4 tensors in tinygemm's layout (done once, at compile time, on the GPU)."""
    # The scheme packs two codes per byte with the even element in the high nibble: the uint8 input
    # `_convert_weight_to_int4pack` takes on CUDA.
    packed = aten._convert_weight_to_int4pack(weight.cuda().contiguous(), inner_k_tiles)
    # tinygemm dequantizes w = (q - 8) * s + z; the scheme's w = (q - zp) * s, so z = (8 - zp) * s.
    s = scale.float().cuda()
    z = (8 - zero_point.float().cuda()) * s
    return packed, torch.stack([s, z], -1).transpose(0, 1).contiguous().to(torch.bfloat16)


_INT4_ROLES = ("weight", "weight_scale", "weight_zero_point")


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
    plan = weight_only_plan("int4", ctx)
    kinds = {_kind(kn) for _, kn in plan}
    operands: list = []
    if "tinygemm" in kinds:
        # tinygemm needs K % (16 * inner_k_tiles) == 0; 8 tiles is its fastest layout.
        inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
        packed, sz = tinygemm_operands(*(ctx.tensor(r) for r in _INT4_ROLES), inner_k_tiles)
        operands += [("weight_int4pack", packed), ("weight_scales_and_zeros", sz)]
    if kinds & {"triton", "dequant_mm"}:
        operands += list(_INT4_ROLES)
    if "bf16_weights" in kinds:
        operands.append(_decoded(ctx, _INT4_ROLES, (n, k)))

    def build(kernel: Any) -> Callable[..., torch.Tensor]:
        kind = _kind(kernel)
        if kind == "tinygemm":
            return lambda x, t: aten._weight_int4pack_mm(x.contiguous(), t["weight_int4pack"], gs, t["weight_scales_and_zeros"])
        if kind == "triton":
            return lambda x, t: triton_int4_mm(x, *(t[r] for r in _INT4_ROLES), gs, kernel[1])
        if kind == "bf16_weights":
            return _cublas_bf16

        def dequant_mm(x: torch.Tensor, t: dict) -> torch.Tensor:
            w = math_for(scheme).dequantize_weight(scheme, {r: t[r] for r in _INT4_ROLES}, (n, k))
            return x @ w.to(x.dtype).t()

        return dequant_mm

    return _choice(plan, build, operands, _bias(ctx, torch.bfloat16), torch.bfloat16)


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
    plan = reachable(PLANS["fp8" if per_token else "fp8_per_tensor"], row_range(ctx))
    # fp8 tensor-core dots take K in steps of 32; without Triton only cuBLASLt's GEMM is left.
    if triton is None or ctx.tensor("weight").shape[1] % 32:
        plan = [(None, "scaled_mm")]
    cd = scheme.torch_compute_dtype
    scale_b = ctx.tensor("weight_scale").float().reshape(1, -1).expand(1, n).contiguous()

    def scaled_mm(x2d: torch.Tensor, t: dict) -> torch.Tensor:
        if per_token and triton is not None:
            q, sa = torch.ops.qexport.fp8_quantize_rows(x2d.contiguous())
        else:  # one scale for the whole tensor: a grid-wide reduction first, left to Inductor
            q, sa = act.quantize_fp8(x2d, per_token)
            # Rowwise scaling wants one scale per row on both sides.
            sa = sa.reshape(-1, 1).expand(x2d.shape[0], 1).contiguous()
        return aten._scaled_mm(q, t["weight"].t(), sa, t["weight_scale_row"], None, None, cd, True)

    def triton_fp8(x2d: torch.Tensor, t: dict, tile: Sequence[int]) -> torch.Tensor:
        q, sa = torch.ops.qexport.fp8_quantize_rows(x2d.contiguous())
        s_b = t["weight_scale_row"].reshape(-1)
        return torch.ops.qexport.weight_only_mm(q, t["weight"], s_b, s_b, False, 0, _fit_tile(q, tile), sa, cd)

    def build(kernel: Any) -> Callable[..., torch.Tensor]:
        if _kind(kernel) == "triton_fp8":
            return lambda x, t: triton_fp8(x, t, kernel[1])
        if _kind(kernel) == "triton":
            # Few rows: the fp8 GEMM would idle its tensor cores; the weight-only GEMM reads the same
            # fp8 bytes, with the activation fake-quantized exactly as the reference does.
            return lambda x, t: triton_weight_mm(
                act.dynamic_fp8(x, per_token).to(cd), t["weight"], t["weight_scale_row"].reshape(-1), kernel[1]
            )
        return scaled_mm

    return _choice(plan, build, ["weight", ("weight_scale_row", scale_b)], _bias(ctx, cd), None)


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
    plan = reachable(PLANS["int8_dynamic" if per_token else "int8_dynamic_per_tensor"], row_range(ctx))
    # int8 tensor-core dots take K in steps of 32; without Triton, cuBLAS's `_int_mm` is left.
    if triton is None or w.shape[1] % 32:
        plan = reachable(PLANS["int8_dynamic_per_tensor"], row_range(ctx))

    def triton_int8(x2d: torch.Tensor, t: dict, tile: Sequence[int]) -> torch.Tensor:
        q, sx, zp = torch.ops.qexport.int8_quantize_rows(x2d.contiguous())
        s = t["weight_scale_per_channel"]
        return torch.ops.qexport.weight_only_mm(q, t["weight"], s, s, False, 0, _fit_tile(q, tile), sx, cd, zp, t["weight_row_sum"])

    def gemv(x2d: torch.Tensor, t: dict) -> torch.Tensor:
        xq = act.dynamic_int8(x2d.float(), per_token)
        return ((xq.unsqueeze(1) * t["weight"].unsqueeze(0).float()).sum(-1) * t["weight_scale_per_channel"]).to(cd)

    def int_mm(x2d: torch.Tensor, t: dict) -> torch.Tensor:
        xf = x2d.float()
        sx, zp = act.dynamic_int8_qparams(xf, per_token)
        q = act.quantize_int8(xf, sx, zp).to(torch.int8)
        m = q.shape[0]
        pad = torch.sym_max(_INT_MM_MIN_M - m, 0)
        acc = aten._int_mm(torch.cat([q, q.new_zeros((pad, q.shape[1]))]), t["weight"].t())[:m]
        return (sx * t["weight_scale_per_channel"] * (acc.float() - zp * t["weight_row_sum"])).to(cd)

    operands = ["weight", ("weight_scale_per_channel", scale), ("weight_row_sum", w_sum)]
    def build(kernel: Any) -> Callable[..., torch.Tensor]:
        if _kind(kernel) == "triton_int8":
            return lambda x, t: triton_int8(x, t, kernel[1])
        return gemv if _kind(kernel) == "gemv" else int_mm

    return _choice(plan, build, operands, _bias(ctx, cd), None)
