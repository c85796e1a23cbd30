"""Kernel lab on the lent GPU (issue 16/17, session 10): the one-row int4 GEMV with its inner product in PTX.

`cuda_lab_read.py` showed the package's GEMV spends about as long computing as reading: on the LM head
(32000 x 3072 int4) a kernel with the GEMV's grid and pipelined loads but no arithmetic reads the
weights in 16-18 µs, the GEMV takes 31 (Nsight Compute: 71 % of the SMs' issue rate). Its PTX issues ~7
instructions per code. Here each 32-bit word of codes (8 of them) meets its 8 activations in one
inline-PTX block: two prmt spread the bytes, four lop3 (and two shifts) make bf16 pairs 128 + q, a shift
or an and widens each to fp32 exactly, eight fma chain into one fp32 partial: 3 instructions per code.
Each group's partials are summed once; sum (q - z) x = sum (128 + q) x - (128 + z) sum x, times the scale.
One activation row (M = 1). Timed against the package's GEMV tiles: CUDA-graph replay, L2 flushed
(`cuda_tune.bench_us`), medians of 3; outputs checked against the fp32 product.

    python benchmarks/cuda_lab_gemv_asm.py --out DIR     # gemv_asm.json
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
def _dot8(w, x0, x1, x2, x3, x4, x5, x6, x7):
    """sum_i (128 + code_i) * x_i over the 8 codes of each int32 word (byte j: code 2j in the high
    nibble, 2j+1 in the low one), exactly in fp32 products, one fp32 per word."""
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
def _gemv_asm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_wn, stride_sn,
                     GROUP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    BW: tl.constexpr = BLOCK_K // 8
    G: tl.constexpr = BLOCK_K // GROUP_K
    WG: tl.constexpr = GROUP_K // 8
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    wp = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for step in tl.range(0, K // BLOCK_K, num_stages=STAGES):
        k0 = step * BLOCK_K
        w = tl.load(wp + offs_n[:, None] * (stride_wn // 4) + (k0 // 8 + tl.arange(0, BW))[None, :], mask=mask_n[:, None], other=0)
        x = tl.load(x_ptr + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
        # x[8w + 4a + 2b + c] -> eight [BW] tensors
        xc0, xc1 = tl.split(tl.reshape(x, (BW, 2, 2, 2)))
        xb00, xb01 = tl.split(xc0)
        xb10, xb11 = tl.split(xc1)
        x0, x4 = tl.split(xb00)
        x2, x6 = tl.split(xb01)
        x1, x5 = tl.split(xb10)
        x3, x7 = tl.split(xb11)
        part = _dot8(w, x0[None, :], x1[None, :], x2[None, :], x3[None, :], x4[None, :], x5[None, :], x6[None, :], x7[None, :])
        part = tl.sum(tl.reshape(part, (BLOCK_N, G, WG)), axis=2)
        xsum = tl.sum(tl.reshape(x, (G, GROUP_K)), axis=1)
        offs_g = k0 // GROUP_K + tl.arange(0, G)
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
        acc += tl.sum(s * (part - (128.0 + z) * xsum[None, :]), axis=1)
    tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


def gemv_asm(x, t, tile, group):
    bn, bk, nw, st = tile
    k = x.shape[1]
    while k % bk:
        bk //= 2
    bk = max(bk, group)
    w, s, z = t["weight"], t["weight_scale"], t["weight_zero_point"]
    n = w.shape[0]
    y = x.new_empty((1, n))
    _gemv_asm_kernel[(triton.cdiv(n, bn),)](x, w, s, z, y, n, k, w.stride(0), s.stride(0),
                                            GROUP_K=group, BLOCK_N=bn, BLOCK_K=bk, STAGES=st, num_warps=nw)
    return y


TILES = [(4, 1024, 2, 3), (8, 1024, 2, 3), (8, 1024, 4, 3), (16, 1024, 4, 3), (8, 2048, 4, 3), (16, 2048, 4, 3),
         (16, 512, 4, 4), (32, 1024, 8, 3), (8, 512, 2, 4), (4, 2048, 4, 3)]
SHAPES = [(32000, 3072), (16384, 3072), (5120, 3072), (3072, 8192), (4096, 4096), (3072, 3072)]


def median_us(fn, reps=3):
    return statistics.median(cuda_tune.bench_us(fn) for _ in range(reps))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args()
    res: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "rows": []}
    s = qexport.schemes.get("int4_weight_only", group_size=args.group)
    for n, k in SHAPES:
        torch.manual_seed(0)
        t = {r: v.cuda() for r, v in math_for(s).quantize_weight(s, torch.randn(n, k) * 0.02).items()}
        w = math_for(s).dequantize_weight(s, t, (n, k)).float()
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w.t()
        nbytes = sum(v.numel() * v.element_size() for v in t.values())
        cands = {f"GEMV {list(tl_)}": (lambda tl_=tl_: qk.triton_gemv(x, t, tl_, args.group)) for tl_ in qk.GEMV_TILES if tl_[0] == 1}
        cands.update({f"asm {list(tl_)}": (lambda tl_=tl_: gemv_asm(x, t, tl_, args.group)) for tl_ in TILES})
        for name, fn in cands.items():
            try:
                err = qk.rel_err(fn(), ref)
                us = median_us(fn)
            except Exception as e:  # noqa: BLE001 - a lab: record and go on
                row = {"shape": f"{n}x{k}", "kernel": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            else:
                row = {"shape": f"{n}x{k}", "kernel": name, "us": round(us, 2), "rel_err": float(f"{err:.2e}"), "tb_s": round(nbytes / us / 1e6, 2)}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    for n, k in SHAPES:
        rs = [r for r in res["rows"] if r["shape"] == f"{n}x{k}" and "us" in r and r["rel_err"] <= 1e-2]
        for fam in ("GEMV", "asm"):
            f = sorted((r for r in rs if r["kernel"].startswith(fam)), key=lambda r: r["us"])
            if f:
                print("BEST", f"{n}x{k}", f[0]["kernel"], f[0]["us"], f[0]["rel_err"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gemv_asm.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
