"""Kernel lab on the lent GPU (issue 16/17, session 10): an int4 tensor-core GEMV. Measured, not adopted:
it ties the package's CUDA-core GEMV on the LM head and loses elsewhere (docs/benchmarks/cuda.md, session 10).

The package's GEMV read the GPU Llama's LM head (32000 x 3072 int4) at ~1.6 TB/s, and tinygemm no faster
(session 9). Its PTX issues ~7 instructions per code (unpack, convert, fma, reductions); Nsight Compute
(`benchmarks/cuda_ncu_layer.py`) puts it at 71 % of the SMs' issue rate and 39 % of DRAM bandwidth there.
This GEMV decodes codes to exact bf16 (q - z) by byte operations in inline PTX and leaves the
multiply-adds to the tensor cores (rows padded to 16): ~3 PTX instructions per code. It then holds 184
registers per thread (12.5 % occupancy) and waits on memory instead (35 % SM, 38 % DRAM, the same ~30 µs).
The lab times, per layer shape and row count, its tiles against the package's GEMV tiles, tinygemm, cuBLAS
on bf16 weights and a copy of the int4 bytes: CUDA-graph replay, L2 flushed (`cuda_tune.bench_us`),
medians of 3; each kernel's output is checked against the fp32 product.

    python benchmarks/cuda_lab_int4_mma.py --out DIR [--sweep] [--rows 1,16] [--shapes 32000x3072,...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import qexport  # noqa: E402
from qexport.lower.kernels import cuda as qk  # noqa: E402
from qexport.lower.kernels import cuda_tune  # noqa: E402
from qexport.schemes import math_for  # noqa: E402

@triton.jit
def _int4_minus_zero(b, zz):
    """uint8 codes (the even element in the high nibble) -> (even, odd) bf16 q - z, exactly: a code
    or-ed into the low mantissa bits of 128.0 reads as 128 + q; minus zz, the bf16 pair (128 + z,
    128 + z) as int32, per element: the four elements of one call may come from two rows (the MMA
    operand's layout), so each pair takes its own. Per four bytes: four prmt, two shifts, four lop3
    and four bf16x2 subtractions."""
    # Inline PTX because Triton decodes element by element (unpack, convert, scale).
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t0, t1, z0, z1;
        prmt.b32 t0, $4, 0, 0x4140;
        prmt.b32 t1, $4, 0, 0x4342;
        prmt.b32 z0, $5, $6, 0x7610;
        prmt.b32 z1, $7, $8, 0x7610;
        lop3.b32 $2, t0, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 $3, t1, 0x000F000F, 0x43004300, 0xEA;
        shr.b32 t0, t0, 4;
        shr.b32 t1, t1, 4;
        lop3.b32 $0, t0, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 $1, t1, 0x000F000F, 0x43004300, 0xEA;
        sub.rn.bf16x2 $0, $0, z0;
        sub.rn.bf16x2 $1, $1, z1;
        sub.rn.bf16x2 $2, $2, z0;
        sub.rn.bf16x2 $3, $3, z1;
        }""",
        constraints="=r,=r,=r,=r,r,r,r,r,r", args=[b, zz], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)

@triton.jit
def _quad_order(t, R: tl.constexpr, C: tl.constexpr):
    """Each 16 columns reordered so that the four k an MMA operand gives one lane (2c, 2c+1, 2c+8,
    2c+9) are four adjacent bytes: one 32-bit register into the decoder, no byte shuffling. A dot
    does not depend on the order of k, so the activations take the same order."""
    t = tl.reshape(t, (R, C // 16, 4, 2, 2))
    t = tl.permute(t, (0, 1, 3, 2, 4))
    return tl.reshape(t, (R, C))

@triton.jit
def _int4_group_operands(x_ptr, s_ptr, z_ptr, offs_m, mask_m, offs_n, mask_n, g, stride_xm, stride_sn, GROUP_K: tl.constexpr):
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (g * GROUP_K + tl.arange(0, GROUP_K))[None, :], mask=mask_m[:, None], other=0.0)
    s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0)
    z = tl.load(z_ptr + offs_n * stride_sn + g, mask=mask_n, other=0)
    return x, s, z

# M is the dynamic dim, as above.
@triton.jit(do_not_specialize=["M"])
def _int4_mma_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
    GROUP_K: tl.constexpr, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):
    # y[M, N] = x @ dequant(w)^T for few rows on the tensor cores: y^T = w @ x^T with the weight rows
    # on the MMA's M side (wgmma takes that operand from registers, where it is decoded) and the
    # activation rows padded to BLOCK_M. Codes are decoded to exact bf16 q - z by byte operations
    # (`_int4_minus_zero`), each group's dot is scaled once in fp32.
    HALF: tl.constexpr = GROUP_K // 2
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    wb = w_ptr.to(tl.pointer_type(tl.uint8), bitcast=True)
    offs_b = tl.arange(0, HALF)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    n_groups = K // GROUP_K
    # Triton pipelines the weight tile (cp.async); the activations, scales and zero points are too
    # narrow for it, so the next group's are loaded one group ahead by hand.
    x, s, z = _int4_group_operands(x_ptr, s_ptr, z_ptr, offs_m, mask_m, offs_n, mask_n, 0, stride_xm, stride_sn, GROUP_K)
    for step in tl.range(0, n_groups // GROUPS, num_stages=STAGES):
        for i in tl.static_range(GROUPS):
            g = step * GROUPS + i
            b = tl.load(wb + offs_n[:, None] * stride_wn + (g * HALF + offs_b)[None, :], mask=mask_n[:, None], other=0)
            xn, sn, zn = _int4_group_operands(x_ptr, s_ptr, z_ptr, offs_m, mask_m, offs_n, mask_n, tl.minimum(g + 1, n_groups - 1),
                                              stride_xm, stride_sn, GROUP_K)
            xe, xo = tl.split(tl.reshape(x, (BLOCK_M, HALF, 2)))
            zi = z.to(tl.int32) | 0x4300
            hi, lo = _int4_minus_zero(_quad_order(b, BLOCK_N, HALF), (zi | (zi << 16))[:, None])
            d = tl.dot(hi, tl.trans(_quad_order(xe, BLOCK_M, HALF)))
            d = tl.dot(lo, tl.trans(_quad_order(xo, BLOCK_M, HALF)), d)
            acc += s.to(tl.float32)[:, None] * d
            x, s, z = xn, sn, zn
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[None, :] & mask_n[:, None])

def int4_mma_gemv(x: torch.Tensor, t: dict, tile, group_k: int) -> torch.Tensor:
    """x [M, K] bf16 @ dequant(int4 weight)^T: `tile` = (BLOCK_M, BLOCK_N, groups per K step, num_warps,
    pipeline stages); K % (group_k * groups) == 0 (groups halves until it does), group_k >= 32."""
    bm, bn, groups, nw, stages = tile
    m, k = x.shape
    while groups > 1 and k % (group_k * groups):
        groups //= 2
    w, s, z = t["weight"], t["weight_scale"], t["weight_zero_point"]
    n = w.shape[0]
    y = x.new_empty((m, n))
    _int4_mma_gemv_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
        x, w, s, z, y, m, n, k, x.stride(0), w.stride(0), s.stride(0), y.stride(0),
        GROUP_K=group_k, GROUPS=groups, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, num_warps=nw,
    )
    return y


# (BLOCK_M, BLOCK_N, groups per K step, num_warps, pipeline stages)
MMA_GEMV_TILES = ((16, 64, 1, 4, 4), (16, 64, 2, 4, 4), (16, 128, 1, 4, 4), (16, 128, 2, 4, 3), (16, 128, 1, 8, 4),
                  (16, 256, 1, 4, 3), (16, 256, 1, 8, 3), (16, 32, 1, 4, 4))


SHAPES = [(4096, 4096), (32000, 3072), (16384, 3072), (5120, 3072), (3072, 8192), (3072, 3072)]


def median_us(fn, reps=3):
    return statistics.median(cuda_tune.bench_us(fn) for _ in range(reps))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--groups", default="128")
    ap.add_argument("--shapes", default=None, help="N x K list, e.g. 4096x4096,32000x3072")
    ap.add_argument("--sweep", action="store_true", help="time a grid of MMA tiles instead of MMA_GEMV_TILES")
    args = ap.parse_args()
    res: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "rows": []}

    def record(**row):
        res["rows"].append(row)
        print(json.dumps(row), flush=True)

    shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")] if args.shapes else SHAPES
    mma_tiles = MMA_GEMV_TILES
    if args.sweep:
        mma_tiles = [(16, bn, g, nw, st) for bn in (32, 64, 128) for g in (1, 2, 4) for st in (4, 6, 8) for nw in ((4, 8) if bn == 128 else (4,))]
    for group in (int(g) for g in args.groups.split(",")):
        s = qexport.schemes.get("int4_weight_only", group_size=group)
        for n, k in shapes:
            torch.manual_seed(0)
            t = {r: v.cuda() for r, v in math_for(s).quantize_weight(s, torch.randn(n, k) * 0.02).items()}
            w = math_for(s).dequantize_weight(s, t, (n, k)).float()
            wb = w.bfloat16()
            nbytes = sum(v.numel() * v.element_size() for v in t.values())
            shape = f"{n}x{k}"
            src = t["weight"].clone()
            dst = torch.empty_like(src)
            dst.copy_(src)
            record(shape=shape, group=group, kernel="copy of the int4 bytes", us=round(median_us(lambda: dst.copy_(src)), 2), bytes=nbytes)
            inner = next(i for i in (8, 4, 2) if k % (16 * i) == 0)
            packed, sz = qk.tinygemm_operands(t["weight"], t["weight_scale"], t["weight_zero_point"], inner)
            for m in (int(r) for r in args.rows.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ w.t()
                cands = {"cuBLAS bf16": lambda: x @ wb.t(),
                         "tinygemm": lambda: torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)}
                for tile in qk.GEMV_TILES:
                    if (tile[0] == 1 and m <= 4) or (tile[0] > 1 and m > 1):
                        cands[f"GEMV {list(tile)}"] = (lambda tile=tile: qk.triton_gemv(x, t, tile, group))
                for tile in mma_tiles:
                    cands[f"MMA {list(tile)}"] = (lambda tile=tile: int4_mma_gemv(x, t, tile, group))
                for name, fn in cands.items():
                    try:
                        err = qk.rel_err(fn(), ref)
                        us = median_us(fn)
                    except Exception as e:  # noqa: BLE001 - a lab: record and go on
                        record(shape=shape, group=group, m=m, kernel=name, error=f"{type(e).__name__}: {str(e)[:300]}")
                        continue
                    record(shape=shape, group=group, m=m, kernel=name, us=round(us, 2), rel_err=float(f"{err:.2e}"),
                           tb_s=round(nbytes / us / 1e6, 2))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "int4_mma.json"), "w") as f:
        json.dump(res, f, indent=1)
    # the best of each family per shape and row count
    best: dict = {}
    for r in res["rows"]:
        if "us" not in r or "m" not in r:
            continue
        fam = r["kernel"].split(" [")[0]
        key = (r["shape"], r["group"], r["m"], fam)
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    for key in sorted(best):
        print("BEST", key, best[key]["kernel"], best[key]["us"], best[key].get("rel_err"))


if __name__ == "__main__":
    main()
