"""Kernel lab on the lent GPU (issue 16/17, session 10): how fast can a one-row kernel READ int4 weights?

Every int4 M=1 kernel tried (the package's GEMV, tinygemm, the tensor-core GEMV of cuda_lab_int4_mma.py)
reads the LM head's 49 MB at ~1.8 TB/s (Nsight Compute: 38 % of DRAM bandwidth), while cuBLAS reads
the bf16 weights at ~3.7 TB/s. This lab separates reading from computing: the GEMV's own grid, tiles
and pipelined K loop with the arithmetic replaced by an xor (no decode, no multiply, no reduction
across threads until the end), against the GEMV itself, cuBLAS on bf16 weights and a copy of the
bytes. If the read-only kernel is much faster than the GEMV, the GEMV is bound by its instructions;
if not, by how it reads. CUDA-graph replay, L2 flushed (`cuda_tune.bench_us`), medians of 3.

    python benchmarks/cuda_lab_read.py --out DIR     # read.json
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
def _read_kernel(w_ptr, y_ptr, N, KB, stride_wn, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, STAGES: tl.constexpr,
                 WIDE: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if WIDE:  # 32-bit words: four bytes per element, as a decoder reading words would
        wp = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        acc = tl.zeros((BLOCK_N, BLOCK_KB // 4), dtype=tl.int32)
        for step in tl.range(0, KB // BLOCK_KB, num_stages=STAGES):
            offs = step * (BLOCK_KB // 4) + tl.arange(0, BLOCK_KB // 4)
            acc ^= tl.load(wp + offs_n[:, None] * (stride_wn // 4) + offs[None, :], mask=mask_n[:, None], other=0)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_KB), dtype=tl.int32)
        for step in tl.range(0, KB // BLOCK_KB, num_stages=STAGES):
            offs = step * BLOCK_KB + tl.arange(0, BLOCK_KB)
            acc ^= tl.load(w_ptr + offs_n[:, None] * stride_wn + offs[None, :], mask=mask_n[:, None], other=0).to(tl.int32)
    tl.store(y_ptr + offs_n, tl.xor_sum(acc, axis=1), mask=mask_n)


def read_only(w, y, tile, wide):
    bn, bkb, nw, st = tile
    n, kb = w.shape
    while kb % bkb:
        bkb //= 2
    _read_kernel[(triton.cdiv(n, bn),)](w, y, n, kb, w.stride(0), BLOCK_N=bn, BLOCK_KB=bkb, STAGES=st, WIDE=wide, num_warps=nw)
    return y


def median_us(fn, reps=3):
    return statistics.median(cuda_tune.bench_us(fn) for _ in range(reps))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    res: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "rows": []}

    def record(**row):
        res["rows"].append(row)
        print(json.dumps(row), flush=True)

    s = qexport.schemes.get("int4_weight_only", group_size=128)
    # (BLOCK_N rows, BLOCK_KB bytes per row per step, warps, stages): the GEMV's int4 tiles in bytes, then deeper ones
    tiles = [(8, 512, 2, 3), (16, 512, 4, 3), (16, 1024, 4, 3), (4, 1024, 2, 3), (8, 1024, 4, 4), (16, 1024, 8, 4),
             (32, 512, 4, 4), (32, 1024, 8, 3), (2, 1536, 1, 1), (4, 1536, 4, 1), (8, 1536, 4, 1), (64, 256, 4, 6)]
    for n, k in ((32000, 3072), (16384, 3072), (4096, 4096)):
        torch.manual_seed(0)
        t = {r: v.cuda() for r, v in math_for(s).quantize_weight(s, torch.randn(n, k) * 0.02).items()}
        w = t["weight"]
        nbytes = w.numel()
        shape = f"{n}x{k}"
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(w)
        y = torch.empty(n, device="cuda", dtype=torch.int32)
        cands = {"copy of the int4 bytes": lambda: dst.copy_(w), "cuBLAS bf16 (4x the bytes)": lambda: x @ wb.t(),
                 "sum of the int4 bytes (torch)": lambda: w.sum(dtype=torch.int32),
                 "package GEMV (1,8,1024,2,3)": lambda: qk.triton_gemv(x, t, (1, 8, 1024, 2, 3), 128),
                 "package GEMV (1,16,2048,4,3)": lambda: qk.triton_gemv(x, t, (1, 16, 2048, 4, 3), 128)}
        for tile in tiles:
            for wide in (False, True):
                cands[f"read-only {list(tile)}{' words' if wide else ''}"] = (lambda tile=tile, wide=wide: read_only(w, y, tile, wide))
        for name, fn in cands.items():
            try:
                fn()
                us = median_us(fn)
            except Exception as e:  # noqa: BLE001 - a lab: record and go on
                record(shape=shape, kernel=name, error=f"{type(e).__name__}: {str(e)[:200]}")
                continue
            moved = nbytes * (4 if name.startswith("cuBLAS") else 2 if name.startswith("copy") else 1)
            record(shape=shape, kernel=name, us=round(us, 2), tb_s=round(moved / us / 1e6, 2))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "read.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
