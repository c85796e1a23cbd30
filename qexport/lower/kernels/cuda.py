"""CUDA kernels for the AOTInductor backend (see `kernels/__init__.py` for the contract).

The weight-only families are memory-bound at small M (rows of the activation) and compute-bound at
large M, and no one kernel wins at both ends, so each family has a PLAN: row buckets, each with the
kernel that won there. Plans are TUNED on the GPU that compiles the package (`cuda_tune`: each
candidate below timed on the region's weights at a few row counts, cached per card and torch/Triton
version); `PLANS` are the static fallback, measured on the lent H100, used where no GPU is present
or with `qexport.cuda_plan="static"`. The report and the manifest say which plan a region got.

- "gemv": a broadcast-multiply-sum that Inductor fuses (weight load, dequant, reduction) into one
  Triton reduction kernel, tuned by coordinate descent at compile time (`INDUCTOR_OPTIONS`);
- ("triton_gemv", tile): `qexport::weight_only_gemv`, a few rows on the CUDA cores (no MMA), int8 /
  fp8 / packed int4 weights dequantized (int8 codes by the exponent trick; int4 codes eight per
  32-bit word, decoded and multiplied in inline PTX) and reduced in fp32 registers;
- "tinygemm": `aten._weight_int4pack_mm`, weights converted to its layout once, at compile time (a
  second copy beside the scheme's layout: a candidate only with `qexport.large_m="bf16_weights"`);
- ("triton", tile): `qexport::weight_only_mm`, a Triton GEMM that reads int8 / fp8 / packed int4
  weights and dequantizes each tile in registers;
- ("triton_fp8", tile): the same GEMM on fp8 activation codes with per-row scales, fp8 x fp8 on the
  tensor cores (no cuBLASLt algorithm search per call, which made `_scaled_mm` host-bound below ~512 rows);
- "dequant_mm": the scheme's own dequantization (one fused Inductor kernel) then cuBLAS;
- "bf16_weights": cuBLAS on weights the scheme's math decoded to bf16 once, at compile time, only
  with `qexport.large_m="bf16_weights"` (+2 bytes per weight in the package and on the GPU): where
  the GEMM is compute-bound no kernel reading quantized weights matched cuBLAS on bf16 ones (the H100
  lab's Triton GEMM reached 77 % of cuBLAS at M=4096). The default, "dequant", keeps only the
  quantized weights: those rows take the Triton GEMM's large tiles or dequant+cuBLAS, whichever tunes faster;
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

import json
from typing import Any, Callable, Optional, Sequence

import torch

from ...schemes import activation as act, math_for
from . import Decline, KernelChoice, KernelContext, register_kernel
from . import cuda_tune
from .cuda_tune import Candidate

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

# Candidates the tuner times (cuda_tune), by the rows they can win at: the small tiles and the
# swapped large ones (the dequantized weight is then wgmma's register operand, see the kernel).
WO_SMALL_TILES = (TILE_M16_K256, TILE_M16_K128, TILE_M16_N64, TILE_M32_N64, (16, 64, 256, 1, 4, 4, 1), (32, 64, 256, 1, 4, 4, 1),
                  (16, 32, 256, 1, 4, 4, 1), TILE_M64_SWAP, TILE_M128_SWAP)
WO_LARGE_TILES = ((128, 128, 64, 8, 4, 4, 1), (128, 128, 64, 8, 8, 3, 1), (128, 256, 64, 8, 8, 3, 1), (128, 128, 64, 8, 4, 4, 0),
                  (256, 128, 64, 8, 8, 3, 1))
Q8_TILES = ((TILE_Q8_M16_SWAP, 1, 256), (TILE_Q8_M32_SWAP, 1, 256), (TILE_Q8_M64_SWAP, 16, 1024), (TILE_Q8_M128_SWAP, 64, None),
            (TILE_Q8_M128_K128_SWAP, 64, None), (TILE_Q8_M128_N128, 64, None), ((128, 256, 128, 8, 8, 3, 0), 256, None),
            ((128, 128, 128, 8, 8, 3, 1), 256, None), ((64, 64, 128, 8, 4, 5, 1), 16, 1024))

# (max rows, kernel) per family, in row order; the last bucket has no bound. Each bucket is the
# fastest kernel at those rows in the per-layer sweeps (benchmarks/cuda_tiles.py and bench_cuda.py
# --lab, 4096x4096, H100, docs/benchmarks/cuda.md). The weight-only plans are the memory-lean ones
# (`qexport.large_m="dequant"`): above the last Triton bucket cuBLAS on a freshly dequantized weight
# wins, as these Triton GEMMs reach ~60-77 % of cuBLAS when compute-bound; `weight_only_plan` cuts
# them at LARGE_M_FROM under `qexport.large_m="bf16_weights"`. Used where no GPU tunes (cuda_tune).
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
# With `qexport.large_m="bf16_weights"` and the static plans a weight-only plan stops at these rows and cuBLAS
# on bf16 weights takes the rest: above them the lab's best quantized kernel no longer beats cuBLAS
# (int8 at M=64: Triton 22.4 vs 22.0 µs; int4 at M=32: 22.5 vs 21.8 µs).
LARGE_M_FROM = {"int8_weight_only": 32, "int4": 16}
# aten._int_mm on CUDA needs more than 16 rows; fewer are padded with zero rows.
_INT_MM_MIN_M = 17

# Inductor options the kernels here rely on; `qexport.compile(device="cuda")` merges them under the
# caller's. Without coordinate descent Inductor's GEMV reduction runs at a third of the bandwidth
# (GPU_BASELINE.md: 143 µs -> 12 µs for one 4096x4096 int8 layer at M=1).
INDUCTOR_OPTIONS = {"coordinate_descent_tuning": True}

# The CUDA-core GEMV's tiles, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, pipeline stages (1: none)): the fastest of the H200
# lab's one-row sweep (benchmarks/cuda_lab.py --m1, docs/benchmarks/cuda.md) over the 4096x4096 layer and
# the GPU Llama's shapes. int4 gained from pipelined 1024-2048-wide steps (4096x4096: 14.1 -> 10.4 µs); int8
# ran 12.0-12.4 µs whatever the tile, pipelined or not, and keeps its unpipelined whole-row tile among
# them. Multi-row tiles serve 2-16 rows (a second grid axis over rows).
GEMV_TILES = ((1, 2, 4096, 4, 1), (1, 4, 1024, 2, 4), (1, 8, 512, 2, 3), (1, 4, 2048, 2, 3), (1, 16, 1024, 4, 3), (1, 16, 2048, 4, 3),
              (1, 8, 1024, 2, 3), (1, 8, 2048, 4, 3), (1, 16, 2048, 8, 3), (2, 8, 512, 4, 3), (4, 8, 512, 8, 3), (4, 2, 4096, 8, 1))

# Kernels made of plain aten ops that Inductor fuses in the package: the tuner times them compiled.
INDUCTOR_FUSED = {"gemv", "dequant_mm", "int_mm"}
LARGE_M_DEFAULT = "dequant"

KERNEL_NAMES = {
    "gemv": "Inductor GEMV", "triton_gemv": "Triton GEMV", "tinygemm": "tinygemm", "triton": "Triton GEMM", "triton_fp8": "Triton fp8 GEMM", "triton_int8": "Triton int8 GEMM",
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

    pred = x2d.shape[0] <= max_m
    if _traced_by_make_fx_on_cpu(x2d):
        # the cond op's branches return a tuple (torch.cond's Dynamo pass makes them so): a bare tensor
        # traced and ran eagerly, then failed Inductor's lowering of the cond (significant_strides_equal)
        return torch.ops.higher_order.cond(pred, _returning_a_tuple(fn), _returning_a_tuple(above), (x2d, *operands))[0]
    return torch.cond(pred, fn, above, (x2d, *operands))


def _returning_a_tuple(fn: Callable[..., torch.Tensor]) -> Callable[..., tuple[torch.Tensor]]:
    return lambda *args: (fn(*args),)


def _traced_by_make_fx_on_cpu(x2d: torch.Tensor) -> bool:
    """Whether the cond op itself may trace the branches (make_fx is tracing, the kernel is a CPU one).

    Why: outside Dynamo, `torch.cond` first compiles its branches with Dynamo (torch.compile, eager
    backend) and make_fx then traces them again; for the CPU kernels that Dynamo pass was 4/5 of
    `apply_kernels` (TinyTransformer's 13 int8 linears: 24-28 s against 5.5 s, the same graph and
    outputs), the bulk of an AOTI compile's Python time. Under make_fx (`RegionSite.trace`, where the
    kernels are spliced) the cond op traces its branches with make_fx itself. CUDA keeps torch.cond's
    path: its packages' speed was measured through it, and a Dynamo setting alone once changed fp8's by
    2.8x on the H100 (`by_rows`); this path was not measured on a GPU.
    """
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return x2d.device.type == "cpu" and get_proxy_mode() is not None


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


def large_m(ctx: KernelContext) -> str:
    return ctx.options.get("qexport.large_m", LARGE_M_DEFAULT)


def weight_only_plan(family: str, ctx: KernelContext) -> list[tuple[int | None, Any]]:
    """The family's static buckets for the rows `ctx`'s program accepts, under its `qexport.large_m` policy."""
    plan = PLANS[family]
    if large_m(ctx) == "bf16_weights":
        cut, kept = LARGE_M_FROM[family], []
        for max_m, kernel in plan:  # the bucket that spans the cut ends at it
            kept.append((cut if max_m is None or max_m >= cut else max_m, kernel))
            if kept[-1][0] == cut:
                break
        plan = [*kept, (None, "bf16_weights")]
    return reachable(plan, row_range(ctx))


def plan_note(plan: Sequence[tuple[int | None, Any]], source: str = "") -> tuple[str, str]:
    """(short kernel name, what runs at which M, and which plan it is) for reports and the manifest."""
    name = " / ".join(dict.fromkeys(KERNEL_NAMES[_kind(k)] for _, k in plan))
    parts, lo = [], 1
    for max_m, kernel in plan:
        span = f"M>={lo}" if max_m is None else (f"M<={max_m}" if lo == 1 else f"{lo}<=M<={max_m}")
        parts.append(f"{span}: {KERNEL_NAMES[_kind(kernel)]}")
        lo = (max_m or 0) + 1
    how = "; ".join(parts) + (" (torch.cond at run time)" if len(plan) > 1 else "")
    return name, how + (f" [{source}]" if source else "")


def tuned_or_static(
    family: str,
    ctx: KernelContext,
    static: list[tuple[int | None, Any]],
    candidates: Sequence[Candidate],
    build: Callable[[Any], Callable[..., torch.Tensor]],
    operands: Callable[[set], list],
    cast: torch.dtype | None,
) -> tuple[list[tuple[int | None, Any]], str]:
    """The family's buckets for the rows `ctx`'s program accepts and a note saying where they came
    from: tuned on this GPU (`cuda_tune`) when one is present, else `static` (already `reachable`).
    `build(kernel)(x2d, t)` runs a kernel on `t` = {operand name: tensor} for `operands(kinds)`."""
    rows = row_range(ctx)
    if ctx.options.get(cuda_tune.PLAN_OPTION, "tuned") == "static":
        return static, f"static plan, {cuda_tune.PLAN_OPTION}='static'"
    if triton is None or not torch.cuda.is_available():
        return static, "static plan (H100-measured): no CUDA device to tune on"
    probes = cuda_tune.probes_for(rows)
    w = ctx.tensor("weight")
    dtype = cast or ctx.input_dtype
    key = " | ".join([cuda_tune.device_key(), family, json.dumps(ctx.scheme.to_dict(), sort_keys=True),
                      f"weight {list(w.shape)} {w.dtype}", f"x {dtype}", f"large_m {large_m(ctx)}", f"probes {list(probes)}"])
    k = int(ctx.input_val.shape[-1])
    tol = math_for(ctx.scheme).tolerance
    state: dict = {}

    def setup() -> dict:  # the operands of every candidate, on the GPU; built only on a cache miss
        if "t" not in state:
            ops = operands({_kind(c.kernel) for c in candidates} | {_kind(kn) for _, kn in static})
            state["t"] = {o if isinstance(o, str) else o[0]: (ctx.tensor(o) if isinstance(o, str) else o[1]).cuda() for o in ops}
        return state["t"]

    def timer(kernel: Any, m: int) -> float:
        fn = build(kernel)
        if _kind(kernel) in INDUCTOR_FUSED:
            # As the package runs it: fused by Inductor. Dynamo caches per code object and these
            # closures share one, so its cache is reset first (else past 8 entries it runs eager).
            torch._dynamo.reset()
            state["compiled"] = True
            fn = torch.compile(fn, dynamic=False, options=INDUCTOR_OPTIONS)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref_kernel = next(kn for max_m, kn in reachable(static, (m, m)) if max_m is None or m <= max_m)
        try:
            t = setup()
            with torch.no_grad():
                y, ref = fn(x, t), build(ref_kernel)(x, t)
                if not rel_err(y, ref) <= tol:  # a tile that miscomputes here (NaN too) is never picked
                    return float("nan")
                return cuda_tune.bench_us(lambda: fn(x, t))
        except Exception as e:  # e.g. a tile over this card's shared memory: not a candidate here
            state["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            return float("nan")

    try:
        plan, info = cuda_tune.tune(key, probes, candidates, timer)
    except RuntimeError as e:  # nothing ran at some row count: the static plan, and why
        return static, f"static plan: tuning on {torch.cuda.get_device_name()} failed ({e}; last error: {state.get('error')})"
    finally:
        if state.get("compiled"):  # leave no tuning closures in Dynamo's caches
            torch._dynamo.reset()
    how = "cached" if info["cached"] else "tuned now"
    return reachable(plan, rows), f"plan tuned on {torch.cuda.get_device_name()} ({how}, {cuda_tune.PLAN_OPTION}='tuned')"


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


# -- the Triton weight-only GEMM -------------------------------------------------------------------

try:  # Triton ships with CUDA builds of torch; without it the entries below decline.
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

if triton is not None:

    @triton.jit
    def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """This program's output tile (rows, columns and their masks), programs ordered GROUP_M row tiles
        at a time so that neighbours share weight columns in L2."""
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
        return offs_m, offs_n, offs_m < M, offs_n < N

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
        offs_m, offs_n, mask_m, mask_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc_dtype = tl.int32 if X_ZP else tl.float32
        wb = w_ptr.to(tl.pointer_type(tl.uint8), bitcast=True)
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
                b = tl.load(wb + offs_n[:, None] * stride_wn + offs_kb[None, :], mask=mask_n[:, None], other=0).to(tl.int32)
                q = tl.interleave(b >> 4, b & 0xF)  # the even element sits in the high nibble
                g = k0 // GROUP_K
                s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + offs_n * stride_sn + g, mask=mask_n, other=0).to(tl.float32)
                # The exponent trick (2**23 + code, exactly; the GEMV below uses it for int8): as fast as or up to 7 %
                # faster than int->float conversions here (H200 lab); for int8 codes a plain cast was
                # 6-11 % faster than the trick, so int8 weights keep it.
                w = (((q | 0x4B000000).to(tl.float32, bitcast=True) - (z + 8388608.0)[:, None]) * s[:, None]).to(a.dtype)
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

    @triton.jit
    def _int4_dot8(w, x0, x1, x2, x3, x4, x5, x6, x7):
        """sum_i (128 + q_i) * x_i over the 8 int4 codes of each int32 word (byte j: code 2j in the high
        nibble, 2j+1 in the low one) and their fp32 activations, one fp32 per word. Two prmt spread
        the bytes over the halves, a lop3 per pair (and a shift for the high nibbles) or-s the codes
        into the low mantissa of bf16 128.0, a shift or an and widens each half to fp32 (exact), eight
        fma chain: 3 instructions per code."""
        # Inline PTX because Triton decodes and reduces element by element: ~7 instructions per code,
        # which held the one-row GEMV to ~1.6 TB/s on the H200's LM head (71 % of the SMs' issue
        # rate; a read-only kernel of the same shape reads the bytes in half the time:
        # benchmarks/cuda_lab_read.py, docs/benchmarks/cuda.md session 10).
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t0, t1, h0, h1, p0, p1, p2, p3, e0, e1, e2, e3, e4, e5, e6, e7;
            prmt.b32 t0, $1, 0, 0x4140;
            prmt.b32 t1, $1, 0, 0x4342;
            lop3.b32 p0, t0, 0x000F000F, 0x43004300, 0xEA;
            lop3.b32 p1, t1, 0x000F000F, 0x43004300, 0xEA;
            shr.u32 h0, t0, 4;
            shr.u32 h1, t1, 4;
            lop3.b32 p2, h0, 0x000F000F, 0x43004300, 0xEA;
            lop3.b32 p3, h1, 0x000F000F, 0x43004300, 0xEA;
            shl.b32 e0, p2, 16;
            and.b32 e2, p2, 0xFFFF0000;
            shl.b32 e4, p3, 16;
            and.b32 e6, p3, 0xFFFF0000;
            shl.b32 e1, p0, 16;
            and.b32 e3, p0, 0xFFFF0000;
            shl.b32 e5, p1, 16;
            and.b32 e7, p1, 0xFFFF0000;
            mul.rn.f32 $0, e0, $2;
            fma.rn.f32 $0, e1, $3, $0;
            fma.rn.f32 $0, e2, $4, $0;
            fma.rn.f32 $0, e3, $5, $0;
            fma.rn.f32 $0, e4, $6, $0;
            fma.rn.f32 $0, e5, $7, $0;
            fma.rn.f32 $0, e6, $8, $0;
            fma.rn.f32 $0, e7, $9, $0;
            }""",
            constraints="=f,r,f,f,f,f,f,f,f,f", args=[w, x0, x1, x2, x3, x4, x5, x6, x7], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _gemv_weight_loads(w_ptr, s_ptr, z_ptr, offs_n, mask_n, k0, stride_wn, stride_sn,
                           INT4: tl.constexpr, INT8: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr):
        """One K step's weight codes [BLOCK_N, BLOCK_K] (int4: [BLOCK_N, BLOCK_K / 8] int32 words of
        packed codes) and, for int4, its groups' scales and zero points [BLOCK_N, BLOCK_K / GROUP_K]
        (other schemes: the codes again, unused)."""
        # One return statement: Triton type-checks the code after a `return` in a constexpr branch.
        wb = w_ptr.to(tl.pointer_type(tl.uint8), bitcast=True)
        if INT4:
            G: tl.constexpr = BLOCK_K // GROUP_K
            wp = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
            offs_kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            b = tl.load(wp + offs_n[:, None] * (stride_wn // 4) + offs_kw[None, :], mask=mask_n[:, None], other=0)
            offs_g = k0 // GROUP_K + tl.arange(0, G)
            sg = tl.load(s_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=mask_n[:, None], other=0.0)
            zg = tl.load(z_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=mask_n[:, None], other=0)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            if INT8:
                b = tl.load(wb + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask_n[:, None], other=0)
            else:  # no `other`: Triton cannot cast a fill value to fp8; masked codes are never used
                b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask_n[:, None])
            sg = b
            zg = b
        return b, sg, zg

    @triton.jit
    def _split8(t):
        """[..., 2, 2, 2] -> the eight [...] slices, in the order of the flattened last three dims."""
        c0, c1 = tl.split(t)
        b00, b01 = tl.split(c0)
        b10, b11 = tl.split(c1)
        e0, e4 = tl.split(b00)
        e2, e6 = tl.split(b01)
        e1, e5 = tl.split(b10)
        e3, e7 = tl.split(b11)
        return e0, e1, e2, e3, e4, e5, e6, e7

    @triton.jit
    def _gemv_row(b, sg, zg, x, INT4: tl.constexpr, INT8: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """sum_k dequant(w)[n, k] * x[k] over one K step, [BLOCK_N] (int8 / fp8: before the per-channel scale)."""
        if INT4:
            # Each word's 8 codes against their activations in PTX (`_int4_dot8`: 128 + q, exactly), then
            # per group and row: sum (q - z) x = sum (128 + q) x - (128 + z) sum x, times the scale.
            G: tl.constexpr = BLOCK_K // GROUP_K
            BW: tl.constexpr = BLOCK_K // 8
            x0, x1, x2, x3, x4, x5, x6, x7 = _split8(tl.reshape(x, (BW, 2, 2, 2)))  # x[8w + i] -> eight [BW]
            part = _int4_dot8(b, x0[None, :], x1[None, :], x2[None, :], x3[None, :], x4[None, :], x5[None, :], x6[None, :], x7[None, :])
            part = tl.sum(tl.reshape(part, (BLOCK_N, G, GROUP_K // 8)), axis=2)
            xsum = tl.sum(tl.reshape(x, (G, GROUP_K)), axis=1)
            out = tl.sum(sg.to(tl.float32) * (part - (128.0 + zg.to(tl.float32)) * xsum[None, :]), axis=1)
        else:
            if INT8:  # (code ^ 0x80) | 0x4B000000 read as fp32 is exactly 2**23 + 128 + code
                w = ((b.to(tl.int32) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
            else:
                w = b.to(tl.float32)
            out = tl.sum(w * x[None, :], axis=1)
        return out

    @triton.jit
    def _gemv_k_loop(x_ptr, w_ptr, s_ptr, z_ptr, offs_n, mask_n, m0, M, K, stride_xm, stride_wn, stride_sn,
                     INT4: tl.constexpr, INT8: tl.constexpr, GROUP_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        """[BLOCK_M, BLOCK_N]: rows m0.. of x times BLOCK_N weight rows, streamed over K (int8 / fp8:
        before the per-channel scale)."""
        rows = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=STAGES):
            k0 = step * BLOCK_K
            b, sg, zg = _gemv_weight_loads(w_ptr, s_ptr, z_ptr, offs_n, mask_n, k0, stride_wn, stride_sn, INT4, INT8, GROUP_K, BLOCK_K)
            for i in tl.static_range(BLOCK_M):
                x = tl.load(x_ptr + (m0 + i) * stride_xm + k0 + tl.arange(0, BLOCK_K), mask=m0 + i < M, other=0.0).to(tl.float32)
                row = _gemv_row(b, sg, zg, x, INT4, INT8, GROUP_K, BLOCK_N, BLOCK_K)
                acc += tl.where(rows[:, None] == i, row[None, :], 0.0)
        return acc

    # M is the dynamic dim, as above.
    @triton.jit(do_not_specialize=["M"])
    def _weight_only_gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
        INT4: tl.constexpr, INT8: tl.constexpr, GROUP_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    ):
        # y[M, N] = x @ dequant(w)^T for a few rows, on the CUDA cores: the memory-bound case, where
        # an MMA tile would idle and what counts is weight bytes in flight. Each program streams
        # BLOCK_N weight rows over K once, in 2-D [BLOCK_N, BLOCK_K] tiles (16-byte loads), for
        # BLOCK_M activation rows (a second grid axis covers more rows, re-reading the weight).
        # The K loop is a `tl.range` with `num_stages`, the only way Triton software-pipelines loads
        # that feed no `tl.dot` (cp.async into shared memory, STAGES steps in flight; STAGES=1 is a
        # plain loop, each step waiting for its own loads): int4 4096x4096 at M=1 14.1 -> 10.4 µs on
        # the H200 with 3 stages. Measured and not kept (docs/benchmarks/cuda.md): loads issued by
        # hand one step ahead into registers (12.0 µs), K split over programs with fp32 atomics
        # (two more kernels per layer: a zero fill and a cast; 13.0-15.6 µs).
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m0 = tl.program_id(1) * BLOCK_M
        mask_n = offs_n < N
        rows = tl.arange(0, BLOCK_M)
        if not INT4:  # per-channel scale, loaded first so that its latency hides under the weights'
            scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = _gemv_k_loop(x_ptr, w_ptr, s_ptr, z_ptr, offs_n, mask_n, m0, M, K, stride_xm, stride_wn, stride_sn,
                           INT4, INT8, GROUP_K, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)
        if not INT4:
            acc = acc * scale[None, :]
        offs_m = m0 + rows
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(offs_m < M)[:, None] & mask_n[None, :])

    @torch.library.triton_op("qexport::weight_only_gemv", mutates_args=())
    def weight_only_gemv(
        x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, int4: bool, group_k: int,
        tile: list[int],
    ) -> torch.Tensor:
        """`weight_only_mm`'s math for few rows without the tensor cores: `tile` = (BLOCK_M, BLOCK_N,
        BLOCK_K, num_warps[, pipeline stages (1: none)]); K % BLOCK_K == 0 and, for int4, BLOCK_K is a
        multiple of group_k and the packed rows start at multiples of 4 bytes (read as int32 words)."""
        m, k = x.shape
        n = weight.shape[0]
        bm, bn, bk, nw = tile[:4]
        stages = tile[4] if len(tile) > 4 else 1
        if int4 and weight.storage_offset() % 4:  # the kernel reads the packed codes as int32 words
            weight = weight.clone()
        y = x.new_empty((m, n))

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))

        torch.library.wrap_triton(_weight_only_gemv_kernel)[grid](
            x, weight, scale, zero_point, y, m, n, k, x.stride(0), weight.stride(0), scale.stride(0), y.stride(0),
            INT4=int4, INT8=weight.dtype == torch.int8, GROUP_K=group_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            STAGES=stages, num_warps=nw,
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

    @triton.jit
    def _int4_rows_kernel(ids_ptr, w_ptr, s_ptr, z_ptr, y_ptr, V, D, stride_wn, stride_sn, GROUP_K: tl.constexpr, BLOCK_B: tl.constexpr):
        # One program per index: its table row's codes (two per byte, the even element in the high
        # nibble) decoded as (q - z) * s in fp32 and rounded once to the output's dtype. An index outside
        # the table reads nothing and gives a row of NaN: memory-safe, and visible downstream.
        pid = tl.program_id(0)
        row = tl.load(ids_ptr + pid).to(tl.int64)
        inside = (row >= 0) & (row < V)
        row = tl.where(inside, row, 0)
        offs = tl.arange(0, BLOCK_B)
        mask = (offs < D // 2) & inside
        b = tl.load(w_ptr + row * stride_wn + offs, mask=mask, other=0).to(tl.int32)
        g = offs * 2 // GROUP_K
        s = tl.load(s_ptr + row * stride_sn + g, mask=mask, other=float("nan")).to(tl.float32)
        z = tl.load(z_ptr + row * stride_sn + g, mask=mask, other=0).to(tl.float32)
        y = tl.interleave(((b >> 4) & 15).to(tl.float32) - z, (b & 15).to(tl.float32) - z) * tl.interleave(s, s)
        offs_y = tl.arange(0, 2 * BLOCK_B)
        tl.store(y_ptr + pid.to(tl.int64) * D + offs_y, y.to(y_ptr.dtype.element_ty), mask=offs_y < D)

    @triton.jit
    def _int4_dequant_kernel(w_ptr, s_ptr, z_ptr, y_ptr, N, stride_wn, stride_sn, stride_yn,
                             GROUP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # The packed codes read as 32-bit words (16-byte loads) and the rows written in 16-byte stores:
        # Inductor's fusion of the scheme's unpack (shift, and, stack, view) read each byte twice and
        # took 28.7 µs per 4096² layer on the H200 where this takes 14.5 with the L2 flushed
        # (benchmarks/cuda_lab_dequant.py). Byte j of a little-endian word holds code 2j in its high
        # nibble and 2j + 1 in its low one; (q - z) * s in fp32, rounded once, as the scheme's math.
        BW: tl.constexpr = BLOCK_K // 8
        G: tl.constexpr = BLOCK_K // GROUP_K
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        mask_n = (offs_n < N)[:, None]
        rows = offs_n.to(tl.int64)[:, None]
        wp = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        words = tl.load(wp + rows * (stride_wn // 4) + k0 // 8 + tl.arange(0, BW)[None, :], mask=mask_n, other=0)
        i = tl.arange(0, 8)
        codes = (words[:, :, None] >> (8 * (i // 2) + 4 * (1 - i % 2))[None, None, :]) & 0xF
        codes = tl.reshape(codes, (BLOCK_N, G, GROUP_K)).to(tl.float32)
        offs_g = k0 // GROUP_K + tl.arange(0, G)[None, :]
        sc = tl.load(s_ptr + rows * stride_sn + offs_g, mask=mask_n, other=0.0).to(tl.float32)
        zp = tl.load(z_ptr + rows * stride_sn + offs_g, mask=mask_n, other=0).to(tl.float32)
        w = tl.reshape((codes - zp[:, :, None]) * sc[:, :, None], (BLOCK_N, BLOCK_K))
        tl.store(y_ptr + rows * stride_yn + k0 + tl.arange(0, BLOCK_K)[None, :], w.to(y_ptr.dtype.element_ty), mask=mask_n)

    @torch.library.triton_op("qexport::int4_dequant", mutates_args=())
    def int4_dequant(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_k: int,
                     dtype: torch.dtype) -> torch.Tensor:
        """The packed int4 weight [N, K / 2] decoded to [N, K] in `dtype` (K a multiple of 8 and of group_k)."""
        n, k = weight.shape[0], weight.shape[1] * 2
        if weight.storage_offset() % 4 or weight.stride(0) % 4 or weight.stride(1) != 1:  # read as int32 words
            weight = weight.clone(memory_format=torch.contiguous_format)
        bk = group_k * max(1, 256 // group_k)
        while k % bk:
            bk //= 2
        y = torch.empty((n, k), dtype=dtype, device=weight.device)
        torch.library.wrap_triton(_int4_dequant_kernel)[(triton.cdiv(n, 32), k // bk)](
            weight, scale, zero_point, y, n, weight.stride(0), scale.stride(0), y.stride(0),
            GROUP_K=group_k, BLOCK_N=32, BLOCK_K=bk, num_warps=4)
        return y

    @torch.library.triton_op("qexport::int4_embedding", mutates_args=())
    def int4_embedding(ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_k: int,
                       dtype: torch.dtype) -> torch.Tensor:
        """The int4 table's rows `ids` (1-D) decoded, [len(ids), 2 * weight.shape[1]] in `dtype`."""
        v, d = weight.shape[0], weight.shape[1] * 2
        y = torch.empty((ids.shape[0], d), dtype=dtype, device=weight.device)
        torch.library.wrap_triton(_int4_rows_kernel)[(ids.shape[0],)](
            ids, weight, scale, zero_point, y, v, d, weight.stride(0), scale.stride(0),
            GROUP_K=group_k, BLOCK_B=triton.next_power_of_2(d // 2), num_warps=4)
        return y

if triton is not None:

    @triton.jit
    def _greedy_token_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
        # One program: each lane keeps the first maximum it saw, then the smallest index among the lanes
        # holding the row's maximum wins (torch.argmax's first maximum; NaN counts as the largest).
        offs = tl.arange(0, BLOCK)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        at = tl.full([BLOCK], 0, tl.int32)
        for start in range(0, N, BLOCK):
            v = tl.load(x_ptr + start + offs, mask=start + offs < N, other=float("-inf")).to(tl.float32)
            v = tl.where(v != v, float("inf"), v)
            take = v > best
            best = tl.where(take, v, best)
            at = tl.where(take, start + offs, at)
        top = tl.max(best, axis=0)
        tl.store(out_ptr, tl.min(tl.where(best == top, at, N), axis=0).to(tl.int64))

    @triton.jit
    def _greedy_token_blocks_kernel(x_ptr, val_ptr, idx_ptr, ticket_ptr, out_ptr, N, BLOCK: tl.constexpr, P_BLOCK: tl.constexpr):
        # Each program takes its block's first maximum; the last program to finish (an atomic ticket)
        # picks among the blocks' and puts the ticket back to 0 for the next launch.
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs, mask=offs < N, other=float("-inf")).to(tl.float32)
        v = tl.where(v != v, float("inf"), v)
        top = tl.max(v, axis=0)
        tl.store(val_ptr + pid, top)
        tl.store(idx_ptr + pid, tl.min(tl.where(v == top, offs, N), axis=0))
        tl.debug_barrier()  # every thread's partials before the ticket (released by the atomic)
        if tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            p = tl.arange(0, P_BLOCK)
            mask = p < tl.num_programs(0)
            vals = tl.load(val_ptr + p, mask=mask, other=float("-inf"), volatile=True)
            at = tl.load(idx_ptr + p, mask=mask, other=N, volatile=True)
            tl.store(out_ptr, tl.min(tl.where(vals == tl.max(vals, axis=0), at, N), axis=0).to(tl.int64))
            tl.store(ticket_ptr, 0)


def _last_row(logits: torch.Tensor) -> torch.Tensor:
    """The logits of the last position (what greedy decoding picks from), contiguous."""
    return logits.reshape(-1, logits.shape[-1])[-1].contiguous()


def greedy_token(logits: torch.Tensor, num_warps: int = 8, block: int = 4096) -> torch.Tensor:
    """The index of the first maximum of `logits`' last row, as a [1] int64 tensor on its device, in one
    kernel: torch's CUDA argmax reduces one long row in one block (10.4 µs for 32000 logits on the
    H200, a tenth of an int4 decode step; benchmarks/cuda_lab_argmax.py)."""
    row = _last_row(logits)
    out = torch.empty(1, dtype=torch.int64, device=row.device)
    _greedy_token_kernel[(1,)](row, out, row.numel(), BLOCK=block, num_warps=num_warps)
    return out


class GreedyBlocks:
    """The same pick as `greedy_token` spread over one program per `block` logits, still one kernel
    (the last program to finish reduces the blocks' maxima): one program reading 32000-152000 logits
    in a loop takes 7-15 µs on the H200. Holds its workspace (per-block maxima and the ticket, which
    the kernel leaves at 0), so one instance serves one stream at a time; CUDA-graph capturable."""

    def __init__(self, vocab: int, device: torch.device | str, block: int = 1024, num_warps: int = 4) -> None:
        self.vocab, self.block, self.num_warps = vocab, block, num_warps
        self.programs = triton.cdiv(vocab, block)
        self.p_block = triton.next_power_of_2(self.programs)
        self.values = torch.empty(self.programs, dtype=torch.float32, device=device)
        self.index = torch.empty(self.programs, dtype=torch.int32, device=device)
        self.ticket = torch.zeros(1, dtype=torch.int32, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        row = _last_row(logits)
        if row.numel() != self.vocab:
            raise ValueError(f"GreedyBlocks for {self.vocab} logits got a row of {row.numel()}")
        out = torch.empty(1, dtype=torch.int64, device=row.device)
        _greedy_token_blocks_kernel[(self.programs,)](row, self.values, self.index, self.ticket, out, self.vocab, BLOCK=self.block,
                                                       P_BLOCK=self.p_block, num_warps=self.num_warps)
        return out


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


def _fit_gemv_tile(k: int, tile: Sequence[int], group_size: int | None = None) -> list[int]:
    bm, bn, bk, nw = tile[:4]
    while k % bk or (group_size and bk % group_size):  # no K mask; whole groups per tile
        bk //= 2
    if group_size and bk < group_size:  # a group wider than any power-of-two tile dividing K
        bk = group_size
    return [bm, bn, bk, nw, *tile[4:5]]


def triton_gemv(x2d: torch.Tensor, t: dict, tile: Sequence[int], int4_group: int | None = None) -> torch.Tensor:
    """The GEMV on int8 / fp8 weights with a per-channel scale (t: weight, weight_scale_per_channel) or,
    with `int4_group`, on the scheme's packed int4 (t: weight, weight_scale, weight_zero_point)."""
    k = int(x2d.shape[1])
    if int4_group:
        w, s, z = (t[r] for r in _INT4_ROLES)
        return torch.ops.qexport.weight_only_gemv(x2d.contiguous(), w, s, z, True, int4_group, _fit_gemv_tile(k, tile, int4_group))
    s = t["weight_scale_per_channel"]
    return torch.ops.qexport.weight_only_gemv(x2d.contiguous(), t["weight"], s, s, False, 0, _fit_gemv_tile(k, tile))


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
    plan: list, build: Callable[[Any], Callable[..., torch.Tensor]], operands: list, bias: list, cast: torch.dtype | None,
    source: str = "",
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

    name, how = plan_note(plan, source)
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

    def operands_for(kinds: set) -> list:
        operands: list = []
        if kinds - {"bf16_weights"}:
            scale = ctx.tensor("weight_scale").float().reshape(-1).expand(shape[0]).contiguous()
            operands += ["weight", ("weight_scale_per_channel", scale)]
        if "bf16_weights" in kinds:
            operands.append(_decoded(ctx, ("weight", "weight_scale"), shape))
        return operands

    def build(kernel: Any) -> Callable[..., torch.Tensor]:
        kind = _kind(kernel)
        if kind == "gemv":
            return lambda x, t: int8_gemv(x, t["weight"], t["weight_scale_per_channel"])
        if kind == "triton":
            return lambda x, t: triton_weight_mm(x, t["weight"], t["weight_scale_per_channel"], kernel[1])
        if kind == "triton_gemv":
            return lambda x, t: triton_gemv(x, t, kernel[1])
        if kind == "bf16_weights":
            return _cublas_bf16

        def dequant_mm(x: torch.Tensor, t: dict) -> torch.Tensor:
            w = math_for(scheme).dequantize_weight(scheme, {"weight": t["weight"], "weight_scale": t["weight_scale_per_channel"]}, shape)
            return x @ w.to(x.dtype).t()

        return dequant_mm

    candidates = [Candidate("gemv", max_rows=1), *weight_only_candidates(ctx)]
    plan, source = tuned_or_static(
        "int8_weight_only", ctx, weight_only_plan("int8_weight_only", ctx), candidates, build, operands_for, torch.bfloat16
    )
    operands = operands_for({_kind(k) for _, k in plan})
    return _choice(plan, build, operands, _bias(ctx, torch.bfloat16), torch.bfloat16, source)


def weight_only_candidates(ctx: KernelContext) -> list[Candidate]:
    """The Triton GEMV and GEMM tiles and dequant+cuBLAS, plus cuBLAS on bf16 weights where the policy keeps them."""
    out = [Candidate(("triton_gemv", t), min_rows=1 if t[0] == 1 else 2, max_rows=4 if t[0] == 1 else 16) for t in GEMV_TILES]
    out += [Candidate(("triton", t), max_rows=256) for t in WO_SMALL_TILES]
    out += [Candidate(("triton", t), min_rows=64) for t in WO_LARGE_TILES]
    out.append(Candidate("dequant_mm", min_rows=256))
    if large_m(ctx) == "bf16_weights":
        out.append(Candidate("bf16_weights", min_rows=16))
    return out


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
    if ctx.scheme.activation != "none":
        return None  # int8_dynamic_int4_weight: these kernels take float activations
    if triton is None:
        return Decline("Triton is not installed")
    declined = _check_linear(ctx, 32)
    if declined:
        return declined
    gs = ctx.scheme.group_size
    n, k = ctx.tensor("weight").shape[0], ctx.tensor("weight").shape[1] * 2
    if n % 8:
        return Decline(f"out_features={n} is not a multiple of 8 (tinygemm's N tile)")

    def operands_for(kinds: set) -> list:
        operands: list = []
        if "tinygemm" in kinds:
            # tinygemm needs K % (16 * inner_k_tiles) == 0; 8 tiles is its fastest layout.
            inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
            packed, sz = tinygemm_operands(*(ctx.tensor(r) for r in _INT4_ROLES), inner_k_tiles)
            operands += [("weight_int4pack", packed), ("weight_scales_and_zeros", sz)]
        if kinds & {"triton", "triton_gemv", "dequant_mm"}:
            operands += list(_INT4_ROLES)
        if "bf16_weights" in kinds:
            operands.append(_decoded(ctx, _INT4_ROLES, (n, k)))
        return operands

    def build(kernel: Any) -> Callable[..., torch.Tensor]:
        kind = _kind(kernel)
        if kind == "tinygemm":
            return lambda x, t: aten._weight_int4pack_mm(x.contiguous(), t["weight_int4pack"], gs, t["weight_scales_and_zeros"])
        if kind == "triton":
            return lambda x, t: triton_int4_mm(x, *(t[r] for r in _INT4_ROLES), gs, kernel[1])
        if kind == "triton_gemv":
            return lambda x, t: triton_gemv(x, t, kernel[1], gs)
        if kind == "bf16_weights":
            return _cublas_bf16

        def dequant_mm(x: torch.Tensor, t: dict) -> torch.Tensor:
            return x @ torch.ops.qexport.int4_dequant(*(t[r] for r in _INT4_ROLES), gs, x.dtype).t()

        return dequant_mm

    # tinygemm reads its own layout, a second copy of the weights beside the scheme's that the other
    # kernels read: a candidate only where the policy keeps extra copies anyway.
    candidates = [*([Candidate("tinygemm", max_rows=64)] if large_m(ctx) == "bf16_weights" else []), *weight_only_candidates(ctx)]
    plan, source = tuned_or_static("int4", ctx, weight_only_plan("int4", ctx), candidates, build, operands_for, torch.bfloat16)
    operands = operands_for({_kind(kn) for _, kn in plan})
    return _choice(plan, build, operands, _bias(ctx, torch.bfloat16), torch.bfloat16, source)


@register_kernel("int4", "cuda", "embedding")
def int4_embedding_cuda(ctx: KernelContext) -> KernelChoice | Decline | None:
    # Inductor fuses the rows' decode into the consumer, on the GPU Llama the first RMSNorm's reduction,
    # where the int4 row took 7.1 µs per token (bf16's 2.2; docs/llm.md): one small kernel decodes it.
    if ctx.scheme.activation != "none":
        return None
    if triton is None:
        return Decline("Triton is not installed")
    packed = ctx.tensor("weight")  # [rows, dim / 2]: two codes per byte, whatever the region recorded
    if packed.dim() != 2 or ctx.input_dtype not in (torch.int64, torch.int32):
        return Decline(f"a 2-D table looked up by integer indices (got {list(packed.shape)} packed, {ctx.input_dtype})")
    dim, gs, cd = packed.shape[1] * 2, ctx.scheme.group_size, ctx.scheme.torch_compute_dtype
    out_dtype = getattr(torch, ctx.region.op_params.get("out_dtype", "float32"))

    def body(ids: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        rows = torch.ops.qexport.int4_embedding(ids.reshape(-1), w, s, z, gs, cd)
        return rows.reshape(*ids.shape, dim).to(out_dtype)

    return KernelChoice(name="Triton int4 rows", why="the indexed rows decoded in one kernel, before their consumer",
                        body=body, operands=_INT4_ROLES)


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
    tunable = per_token and triton is not None and not ctx.tensor("weight").shape[1] % 32
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

    operands = ["weight", ("weight_scale_row", scale_b)]
    source = "static plan"
    if tunable:
        candidates = [*(Candidate(("triton_fp8", t), lo, hi or 1 << 30) for t, lo, hi in Q8_TILES), Candidate("scaled_mm", min_rows=16)]
        plan, source = tuned_or_static("fp8", ctx, plan, candidates, build, lambda kinds: operands, None)
    return _choice(plan, build, operands, _bias(ctx, cd), None, source)


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
    tunable = per_token and triton is not None and not w.shape[1] % 32
    if triton is None or w.shape[1] % 32:
        plan = reachable(PLANS["int8_dynamic_per_tensor"], row_range(ctx))

    # Without a bias the epilogue rounds straight to the input's dtype (the one rounding the reference
    # does after its compute dtype): a separate cast kernel was a third kernel per layer.
    out_dtype = cd if ctx.has("bias") else ctx.input_dtype

    def triton_int8(x2d: torch.Tensor, t: dict, tile: Sequence[int]) -> torch.Tensor:
        q, sx, zp = torch.ops.qexport.int8_quantize_rows(x2d.contiguous())
        s = t["weight_scale_per_channel"]
        return torch.ops.qexport.weight_only_mm(q, t["weight"], s, s, False, 0, _fit_tile(q, tile), sx, out_dtype, zp, t["weight_row_sum"])

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

    source = "static plan"
    if tunable:
        candidates = [*(Candidate(("triton_int8", t), lo, hi or 1 << 30) for t, lo, hi in Q8_TILES), Candidate("int_mm", min_rows=256)]
        plan, source = tuned_or_static("int8_dynamic", ctx, plan, candidates, build, lambda kinds: operands, None)
    return _choice(plan, build, operands, _bias(ctx, cd), None, source)
