"""Kernel lab on the lent GPU (issue 16, session 12): the dequantize step of the M >= 256 buckets.

Where many rows share a weight, the packages dequantize the weight to bf16 and hand it to cuBLAS
("dequant+cuBLAS", written as the scheme's math and fused by Inductor). Session 11's profile of int4 g128
at M=4096 put Inductor's fused unpack at 28.7 µs per 4096² layer, where its bytes (8.4 MB read, 33.5 MB
written) take ~10 µs at the copy bandwidth. This lab times, per 4096² layer, L2 flushed (as bench_cuda):

- Inductor's kernel for the scheme's dequantize (torch.compile of `math_for(scheme).dequantize_weight`),
- a Triton kernel writing the same bf16 values (int4: codes from 32-bit words, (q - zp) * s in fp32),
- dequant + cuBLAS at M = 256 / 1024 / 4096 with each, against cuBLAS on bf16 weights,

checking that the Triton kernel's output equals Inductor's bit for bit.

    python benchmarks/cuda_lab_dequant.py --out DIR     # dequant.json
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
from qexport.lower.kernels.cuda_tune import capture, time_us  # noqa: E402
from qexport.schemes import math_for  # noqa: E402


@triton.jit
def _int4_dequant_kernel(w_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_wn, stride_sn, stride_yn,
                         GROUP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Byte j of a little-endian word holds code 2j in its high nibble and 2j + 1 in its low one.
    BW: tl.constexpr = BLOCK_K // 8
    G: tl.constexpr = BLOCK_K // GROUP_K
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    mask_n = offs_n < N
    wp = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    words = tl.load(wp + offs_n[:, None] * (stride_wn // 4) + k0 // 8 + tl.arange(0, BW)[None, :], mask=mask_n[:, None], other=0)
    i = tl.arange(0, 8)
    shift = 8 * (i // 2) + 4 * (1 - i % 2)
    codes = (words[:, :, None] >> shift[None, None, :]) & 0xF
    codes = tl.reshape(codes, (BLOCK_N, G, GROUP_K)).to(tl.float32)
    offs_g = k0 // GROUP_K + tl.arange(0, G)
    s = tl.load(s_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
    w = tl.reshape((codes - z[:, :, None]) * s[:, :, None], (BLOCK_N, BLOCK_K))
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(y_ptr + offs_n[:, None] * stride_yn + offs_k[None, :], w.to(tl.bfloat16), mask=mask_n[:, None])


@triton.jit
def _int8_dequant_kernel(w_ptr, s_ptr, y_ptr, N, K, stride_wn, stride_yn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    q = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
    s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n[:, None] * stride_yn + offs_k[None, :], (q * s[:, None]).to(tl.bfloat16), mask=mask_n[:, None])


def triton_int4(t, group, n, k, bn, bk, nw):
    y = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
    _int4_dequant_kernel[(triton.cdiv(n, bn), k // bk)](t["weight"], t["weight_scale"], t["weight_zero_point"], y, n, k,
                                                         t["weight"].stride(0), t["weight_scale"].stride(0), y.stride(0),
                                                         GROUP_K=group, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
    return y


def triton_int8(t, n, k, bn, bk, nw):
    y = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
    _int8_dequant_kernel[(triton.cdiv(n, bn), k // bk)](t["weight"], t["weight_scale"], y, n, k, t["weight"].stride(0), y.stride(0),
                                                        BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
    return y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    n = k = a.dim
    p = torch.cuda.get_device_properties(0)
    result: dict = {"card": f"{p.name}, torch {torch.__version__}, Triton {triton.__version__}", "rows": {}, "checks": {}}
    torch.manual_seed(0)
    w = torch.randn(n, k) / k ** 0.5
    timed: dict = {}
    xs = {m: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in (256, 1024, 4096)}
    wb = w.to(torch.bfloat16).cuda()
    for m, x in xs.items():
        timed[f"cuBLAS bf16 M={m}"] = lambda x=x: x @ wb.t()
    for name in ("int4_weight_only", "int8_weight_only"):
        s = qexport.schemes.get(name)
        t = {r: v.cuda() for r, v in math_for(s).quantize_weight(s, w).items()}
        if name.startswith("int8"):
            t["weight_scale"] = t["weight_scale"].float().reshape(-1).expand(n).contiguous()
        inductor = torch.compile(lambda t=t, s=s: math_for(s).dequantize_weight(s, t, (n, k)).to(torch.bfloat16))
        ref = inductor()
        timed[f"{name} dequant Inductor"] = inductor
        tiles = [(32, 256, 4), (16, 512, 4), (64, 256, 8), (32, 512, 8), (8, 1024, 4)] if "int4" in name else \
                [(32, 256, 4), (16, 512, 4), (64, 128, 4), (32, 512, 8)]
        for tile in tiles:
            fn = (lambda t=t, tile=tile, g=s.group_size: triton_int4(t, g, n, k, *tile)) if "int4" in name else \
                 (lambda t=t, tile=tile: triton_int8(t, n, k, *tile))
            result["checks"][f"{name} {tile}"] = bool(torch.equal(fn(), ref))
            timed[f"{name} dequant Triton {tile}"] = fn
        best = tiles[0]
        for m, x in xs.items():
            timed[f"{name} Inductor+cuBLAS M={m}"] = lambda x=x, f=inductor: x @ f().t()
            tri = (lambda t=t, g=s.group_size: triton_int4(t, g, n, k, *best)) if "int4" in name else (lambda t=t: triton_int8(t, n, k, *best))
            timed[f"{name} Triton+cuBLAS M={m}"] = lambda x=x, f=tri: x @ f().t()
    graphs = {}
    for label, fn in timed.items():
        fn()
        graphs[label] = capture(fn)
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(200):
        big @ big
    samples: dict = {label: [] for label in graphs}
    for _ in range(a.rounds):
        for label, g in graphs.items():
            samples[label].append(time_us(g.replay, warmup_ms=30, rep_ms=40))
    for label, ss in samples.items():
        result["rows"][label] = {"us": statistics.median(ss), "samples": ss}
        print(f"{label:45s} {statistics.median(ss):8.1f} µs", flush=True)
    print(result["checks"], flush=True)
    json.dump(result, open(os.path.join(a.out, "dequant.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
