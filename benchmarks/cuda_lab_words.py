"""Kernel lab on the lent GPU (issue 16, session 8): word-wise weight decoding. Measured, not adopted:
neither the GEMVs nor the GEMMs below beat the package's kernels (docs/benchmarks/cuda.md, session 8).

Candidates against the current kernels and cuBLAS, one 4096x4096 layer, CUDA-graph replay with the L2
flushed (`cuda_tune.bench_us`):
- GEMV (few rows): the packed weights read as 32-bit words; each code is moved by at most one shift
  into the mantissa of 1.0 (int8: bits 15..22; int4: bits 12..15 or 16..19), so a code costs one or
  two integer ops and one fma, and every product is exact in fp32 (few significant bits on each side);
  the 1.0's contribution is subtracted once per group from the activations' sums.
- GEMM (many rows): the same word decoding into bf16 right before the dot, and int4's scale and zero
  point applied to the accumulator once per group (BLOCK_K = group size) instead of to every weight.

    python benchmarks/cuda_lab_words.py --out DIR    # lab2.json (H200 results: benchmarks/results/cuda_lab_words_h200.json)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from qexport.lower.kernels import cuda as qk  # noqa: E402

MAGIC = 0x3F800000  # 1.0f


@triton.jit
def _nib(w, SHL: tl.constexpr, SHR: tl.constexpr, MASK: tl.constexpr):
    """The bits of `w` selected by MASK after a shift, or-ed into 1.0: 1 + code * 2**(pos - 23)."""
    if SHL > 0:
        w = w << SHL
    if SHR > 0:
        w = w >> SHR  # int32 arithmetic shift: the mask drops the sign's copies
    return ((w & MASK) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _gemv4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                  GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  STAGES: tl.constexpr):
    # int4 packed two per byte, even code in the high nibble: word j holds codes 8j..8j+7 at bit
    # positions c -> [4, 0, 12, 8, 20, 16, 28, 24]; each lands at bit 12 (x * 2**11) or 16 (x * 2**7).
    BW: tl.constexpr = BLOCK_K // 8
    G: tl.constexpr = BLOCK_K // GROUP
    WG: tl.constexpr = GROUP // 8
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m0 = tl.program_id(1) * BLOCK_M
    mask_n = offs_n < N
    wp = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    rows = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_w = tl.arange(0, BW)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        w = tl.load(wp + offs_n[:, None] * stride_wn + (k0 // 8 + offs_w)[None, :], mask=mask_n[:, None], other=0)
        offs_g = k0 // GROUP + tl.arange(0, G)
        sg = tl.load(s_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
        zg = tl.load(z_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
        b0 = _nib(w, 8, 0, 0xF000)    # c=0, bits 4..7   -> 12
        b1 = _nib(w, 16, 0, 0xF0000)  # c=1, bits 0..3   -> 16
        b2 = _nib(w, 0, 0, 0xF000)    # c=2, bits 12..15 -> 12
        b3 = _nib(w, 8, 0, 0xF0000)   # c=3, bits 8..11  -> 16
        b4 = _nib(w, 0, 8, 0xF000)    # c=4, bits 20..23 -> 12
        b5 = _nib(w, 0, 0, 0xF0000)   # c=5, bits 16..19 -> 16
        b6 = _nib(w, 0, 16, 0xF000)   # c=6, bits 28..31 -> 12
        b7 = _nib(w, 0, 8, 0xF0000)   # c=7, bits 24..27 -> 16
        for i in tl.static_range(BLOCK_M):
            xrow = x_ptr + (m0 + i) * stride_xm + k0 + offs_w * 8
            live = m0 + i < M
            x0 = tl.load(xrow + 0, mask=live, other=0.0).to(tl.float32)
            x1 = tl.load(xrow + 1, mask=live, other=0.0).to(tl.float32)
            x2 = tl.load(xrow + 2, mask=live, other=0.0).to(tl.float32)
            x3 = tl.load(xrow + 3, mask=live, other=0.0).to(tl.float32)
            x4 = tl.load(xrow + 4, mask=live, other=0.0).to(tl.float32)
            x5 = tl.load(xrow + 5, mask=live, other=0.0).to(tl.float32)
            x6 = tl.load(xrow + 6, mask=live, other=0.0).to(tl.float32)
            x7 = tl.load(xrow + 7, mask=live, other=0.0).to(tl.float32)
            lo = 2048.0  # 2**11: codes at bit 12
            hi = 128.0   # 2**7: codes at bit 16
            p = b0 * (x0 * lo)[None, :] + b1 * (x1 * hi)[None, :] + b2 * (x2 * lo)[None, :] + b3 * (x3 * hi)[None, :]
            p += b4 * (x4 * lo)[None, :] + b5 * (x5 * hi)[None, :] + b6 * (x6 * lo)[None, :] + b7 * (x7 * hi)[None, :]
            part = tl.sum(tl.reshape(p, (BLOCK_N, G, WG)), axis=2)
            xs = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7
            xw = (x0 + x2 + x4 + x6) * lo + (x1 + x3 + x5 + x7) * hi
            xg = tl.sum(tl.reshape(xs, (G, WG)), axis=1)
            xwg = tl.sum(tl.reshape(xw, (G, WG)), axis=1)
            row = tl.sum(sg * (part - xwg[None, :] - zg * xg[None, :]), axis=1)
            acc += tl.where(rows[:, None] == i, row[None, :], 0.0)
    offs_m = m0 + rows
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & mask_n[None, :])


def gemv4(x, w, s, z, group, tile):
    bm, bn, bk, nw, st = tile
    m, k = x.shape
    n = w.shape[0]
    y = x.new_empty((m, n))
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    _gemv4_kernel[grid](x, w, s, z, y, m, n, k, x.stride(0), w.stride(0) // 4, s.stride(0), y.stride(0),
                        GROUP=group, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=st, num_warps=nw)
    return y


@triton.jit
def _gemv8_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    # int8 codes + 128 (sign bit flipped) moved to bits 15..22: 1 + u / 256, exact products with x.
    BW: tl.constexpr = BLOCK_K // 4
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m0 = tl.program_id(1) * BLOCK_M
    mask_n = offs_n < N
    wp = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    rows = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_M, 1), dtype=tl.float32)
    offs_w = tl.arange(0, BW)
    scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        w = tl.load(wp + offs_n[:, None] * stride_wn + (k0 // 4 + offs_w)[None, :], mask=mask_n[:, None], other=0) ^ -2139062144  # 0x80808080: the sign bit of each byte flipped
        b0 = _nib(w, 15, 0, 0x7F8000)
        b1 = _nib(w, 7, 0, 0x7F8000)
        b2 = _nib(w, 0, 1, 0x7F8000)
        b3 = _nib(w, 0, 9, 0x7F8000)
        for i in tl.static_range(BLOCK_M):
            xrow = x_ptr + (m0 + i) * stride_xm + k0 + offs_w * 4
            live = m0 + i < M
            x0 = tl.load(xrow + 0, mask=live, other=0.0).to(tl.float32) * 256.0
            x1 = tl.load(xrow + 1, mask=live, other=0.0).to(tl.float32) * 256.0
            x2 = tl.load(xrow + 2, mask=live, other=0.0).to(tl.float32) * 256.0
            x3 = tl.load(xrow + 3, mask=live, other=0.0).to(tl.float32) * 256.0
            p = b0 * x0[None, :] + b1 * x1[None, :] + b2 * x2[None, :] + b3 * x3[None, :]
            # sum (1 + u/256) * 256 x = 256 sum x + sum (c + 128) x
            row = tl.sum(p, axis=1) - tl.sum(x0 + x1 + x2 + x3, axis=0) * (1.0 + 0.5)
            acc += tl.where(rows[:, None] == i, row[None, :], 0.0)
    acc = acc * scale[None, :]
    offs_m = m0 + rows
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & mask_n[None, :])


def gemv8(x, w, s, tile):
    bm, bn, bk, nw, st = tile
    m, k = x.shape
    n = w.shape[0]
    y = x.new_empty((m, n))
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    _gemv8_kernel[grid](x, w, s, y, m, n, k, x.stride(0), w.stride(0) // 4, y.stride(0),
                        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=st, num_warps=nw)
    return y


@triton.jit
def _mm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
               INT4: tl.constexpr, GROUP: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
               DOT_F32: tl.constexpr):
    # y^T[N, M] = dequant(w)[N, K] @ x^T: the decoded weight is wgmma's register operand. int8: exact
    # codes c in bf16 (2**23 + 128 + c read as fp32, minus 2**23 + 128), the per-channel scale in the
    # epilogue. int4 (BLOCK_K == GROUP): 1 + q/16 in bf16; per group, acc += s * (16 d - (16 + z) X).
    offs_m, offs_n, mask_m, mask_n = qk._grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    wp = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=mask_m[:, None], other=0.0)
        if DOT_F32:  # Triton's interpreter multiplies bf16 tensors wrongly: checks run in fp32
            a = a.to(tl.float32)
        if INT4:
            BW: tl.constexpr = BLOCK_K // 8
            w = tl.load(wp + offs_n[:, None] * stride_wn + (k0 // 8 + tl.arange(0, BW))[None, :], mask=mask_n[:, None], other=0)
            # 1 + q/16: the code at bits 19..22
            f0 = _nib(w, 15, 0, 0x780000)
            f1 = _nib(w, 19, 0, 0x780000)
            f2 = _nib(w, 7, 0, 0x780000)
            f3 = _nib(w, 11, 0, 0x780000)
            f4 = _nib(w, 0, 1, 0x780000)
            f5 = _nib(w, 3, 0, 0x780000)
            f6 = _nib(w, 0, 9, 0x780000)
            f7 = _nib(w, 0, 5, 0x780000)
            q = tl.join(tl.join(tl.join(f0, f4), tl.join(f2, f6)), tl.join(tl.join(f1, f5), tl.join(f3, f7)))
            wd = tl.reshape(q, (BLOCK_N, BLOCK_K)).to(a.dtype)
            d = tl.dot(wd, tl.trans(a))
            g = k0 // GROUP
            s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + offs_n * stride_sn + g, mask=mask_n, other=0).to(tl.float32)
            xs = tl.sum(a.to(tl.float32), axis=1)
            acc += s[:, None] * (16.0 * d - (16.0 + z)[:, None] * xs[None, :])
        else:
            BW: tl.constexpr = BLOCK_K // 4
            w = tl.load(wp + offs_n[:, None] * stride_wn + (k0 // 4 + tl.arange(0, BW))[None, :], mask=mask_n[:, None], other=0) ^ -2139062144  # 0x80808080: the sign bit of each byte flipped
            c0 = (((w & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0)
            c1 = ((((w >> 8) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0)
            c2 = ((((w >> 16) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0)
            c3 = ((((w >> 24) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0)
            q = tl.join(tl.join(c0, c2), tl.join(c1, c3))
            wd = tl.reshape(q, (BLOCK_N, BLOCK_K)).to(a.dtype)
            acc = tl.dot(wd, tl.trans(a), acc)
    if not INT4:
        acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[None, :] & mask_n[:, None])


def mm(x, w, s, z, group, tile):
    bm, bn, bk, gm, nw, ns = tile
    m, k = x.shape
    n = w.shape[0]
    int4 = group is not None
    if int4:
        bk = group
    y = x.new_empty((m, n))
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _mm_kernel[grid](x, w, s, z if int4 else s, y, m, n, k, x.stride(0), w.stride(0) // 4, s.stride(0), y.stride(0),
                     INT4=int4, GROUP=group or 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
                     DOT_F32=os.environ.get("TRITON_INTERPRET") == "1", num_warps=nw, num_stages=ns)
    return y


# -- the lab --------------------------------------------------------------------------------------

GEMV4_TILES = [(1, 8, 1024, 2, 3), (1, 8, 512, 2, 3), (1, 16, 512, 4, 3), (1, 16, 1024, 4, 3), (1, 4, 1024, 2, 3),
               (1, 8, 1024, 4, 3), (1, 32, 256, 4, 3), (1, 16, 256, 2, 4), (1, 8, 2048, 4, 2), (1, 4, 2048, 2, 2),
               (1, 2, 4096, 2, 1), (1, 16, 512, 2, 4), (1, 32, 512, 8, 3), (1, 8, 256, 1, 4)]
GEMV8_TILES = [(1, 2, 4096, 4, 1), (1, 4, 2048, 4, 2), (1, 8, 1024, 4, 3), (1, 8, 512, 2, 3), (1, 16, 512, 4, 3),
               (1, 4, 1024, 2, 3), (1, 16, 1024, 8, 3), (1, 8, 2048, 4, 2), (1, 32, 256, 4, 3), (1, 4, 4096, 4, 1)]
MM_TILES = [(64, 128, 128, 8, 4, 4), (128, 128, 128, 8, 8, 3), (128, 128, 64, 8, 4, 4), (64, 256, 128, 8, 8, 3),
            (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 128, 128, 8, 4, 3), (64, 128, 64, 8, 4, 5)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--ms", default="1,2,4,16,256,1024,4096")
    ap.add_argument("--quick", action="store_true", help="interpreter check: few tiles, small shapes, no timing")
    args = ap.parse_args()
    import qexport
    from qexport.lower.kernels import cuda as C
    from qexport.schemes import math_for

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    n, k = args.n, args.k
    w = torch.randn(n, k, device=dev) * 0.02
    s8 = qexport.schemes.get("int8_weight_only")
    s4 = qexport.schemes.get("int4_weight_only", group_size=128)
    t8 = {r: v.to(dev) for r, v in math_for(s8).quantize_weight(s8, w.cpu()).items()}
    t4 = {r: v.to(dev) for r, v in math_for(s4).quantize_weight(s4, w.cpu()).items()}
    sc8 = t8["weight_scale"].float().reshape(-1).contiguous()
    w8 = math_for(s8).dequantize_weight(s8, t8, (n, k)).bfloat16()
    w4 = math_for(s4).dequantize_weight(s4, t4, (n, k)).bfloat16()
    wb = w.bfloat16()
    t8d = {"weight": t8["weight"], "weight_scale_per_channel": sc8}
    res: dict = {}
    errs: dict = {}
    fails: list = []
    if dev == "cuda":
        from qexport.lower.kernels import cuda_tune
        bench = cuda_tune.bench_us
    else:
        def bench(fn):
            return float("nan")

    def put(name, m, fn, ref, tol=2e-2):
        try:
            with torch.no_grad():
                y = fn()
                if ref is not None:
                    e = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
                    errs[f"{name} M={m}"] = e
                    if not e <= tol:
                        fails.append(f"{name} M={m}: err {e:.2e}")
                        return
                res.setdefault(name, {})[m] = bench(fn)
        except Exception as ex:
            fails.append(f"{name} M={m}: {type(ex).__name__}: {str(ex)[:300]}")
            if dev == "cuda":
                torch.cuda.synchronize()

    ms = [int(v) for v in args.ms.split(",")]
    g4t, g8t, mmt = (GEMV4_TILES[:2], GEMV8_TILES[:2], MM_TILES[:1]) if args.quick else (GEMV4_TILES, GEMV8_TILES, MM_TILES)
    for m in ms:
        print(f"== M={m}", flush=True)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        r8, r4 = (x.float() @ w8.float().t()), (x.float() @ w4.float().t())
        put("bf16 cuBLAS", m, lambda: x @ wb.t(), None)
        if m <= 16:
            for t in g4t:
                tt = (1 if m == 1 else (2 if m == 2 else 4), *t[1:])
                put(f"new int4 GEMV {tt}", m, lambda tt=tt: gemv4(x, t4["weight"], t4["weight_scale"], t4["weight_zero_point"], 128, tt), r4)
            for t in g8t:
                tt = (1 if m == 1 else (2 if m == 2 else 4), *t[1:])
                put(f"new int8 GEMV {tt}", m, lambda tt=tt: gemv8(x, t8["weight"], sc8, tt), r8)
            if dev == "cuda":
                for t in C.GEMV_TILES:
                    if t[0] == min(m, 4) or (m == 1 and t[0] == 1):
                        put(f"cur int4 GEMV {t}", m, lambda t=t: C.triton_gemv(x, t4, t, 128), r4)
                        put(f"cur int8 GEMV {t}", m, lambda t=t: C.triton_gemv(x, t8d, t), r8)
                if m == 1:
                    packed, sz = C.tinygemm_operands(t4["weight"], t4["weight_scale"], t4["weight_zero_point"], 8)
                    put("tinygemm", m, lambda: torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz), r4)
                    put("copy int4 bytes", m, lambda: t4["weight"].clone(), None)
                    put("copy int8 bytes", m, lambda: t8["weight"].clone(), None)
        if m >= 16:
            for t in mmt:
                put(f"new int8 GEMM {t}", m, lambda t=t: mm(x, t8["weight"], sc8, None, None, t), r8)
                put(f"new int4 GEMM {t}", m, lambda t=t: mm(x, t4["weight"], t4["weight_scale"], t4["weight_zero_point"], 128, t), r4)
            if dev == "cuda":
                for t in ((128, 128, 128, 8, 8, 3, 1), (64, 128, 128, 8, 4, 4, 1), (256, 128, 64, 8, 8, 3, 1), (16, 64, 256, 1, 4, 4, 1)):
                    put(f"cur int8 GEMM {t}", m, lambda t=t: C.triton_weight_mm(x, t8["weight"], sc8, t), r8)
                    put(f"cur int4 GEMM {t}", m, lambda t=t: C.triton_int4_mm(x, t4["weight"], t4["weight_scale"], t4["weight_zero_point"], 128, t), r4)
                put("dequant int8 + cuBLAS", m, lambda: x @ math_for(s8).dequantize_weight(s8, t8, (n, k)).to(x.dtype).t(), r8)
        for name, v in res.items():
            if m in v:
                print(f"  {name:48s} {v[m]:9.2f} µs  err {errs.get(f'{name} M={m}', float('nan')):.1e}", flush=True)
    for f in fails:
        print("FAIL", f)
    card = torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lab2.json"), "w") as fh:
        json.dump({"card": card, "torch": torch.__version__, "triton": triton.__version__, "res": res, "errs": errs, "fails": fails}, fh, indent=1)


if __name__ == "__main__":
    main()
