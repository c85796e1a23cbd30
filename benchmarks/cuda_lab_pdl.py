"""Kernel lab on the lent GPU (issue 16, session 9): programmatic dependent launch (PDL) for the M=1 GEMV.

At M=1 a 4096x4096 int4 layer's bytes take ~1 µs at the H200's bandwidth, yet one kernel per layer
costs 8-10 µs: launch, the first DRAM round trips, the last wave (docs/benchmarks/cuda.md, session 8).
A layer's weights do not depend on the previous layer, only its activations do. With PDL the next
kernel is launched while the previous one runs; before `griddepcontrol.wait` it may only touch data
the previous kernel does not write, so it bulk-prefetches its own weight rows into L2, then waits,
then runs the usual pipelined K loop against L2. This lab times chains of layers, as a package runs
them, in one CUDA graph with the L2 flushed before each replay (`cuda_tune.bench_us`):

- the package's GEMV (no PDL), cuBLAS bf16, and copies of the same bytes (the one-kernel-per-layer floor);
- the same GEMV body with `griddepcontrol` (wait; trigger early or late), launched with and without
  PDL, with and without the L2 prefetch;
- the same with a plain (non-PDL) elementwise kernel between layers, as in a real model.

    python benchmarks/cuda_lab_pdl.py --out DIR     # pdl.json
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
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from qexport.lower.kernels import cuda as qk  # noqa: E402
from qexport.lower.kernels import cuda_tune  # noqa: E402


@triton.jit
def _prefetch_rows(ptr, offs_n, N, stride_n, NBYTES: tl.constexpr):
    # One `cp.async.bulk.prefetch.L2` per weight row (contiguous, 16-byte aligned): the whole slice
    # this program will stream is requested from DRAM before the previous kernel has finished.
    rows = tl.minimum(offs_n, N - 1)
    addr = (ptr.to(tl.pointer_type(tl.uint8), bitcast=True) + rows * stride_n).to(tl.int64)
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
        [addr, tl.full(rows.shape, NBYTES, tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
    )


@triton.jit(do_not_specialize=["M"])
def _gemv_pdl_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
    INT4: tl.constexpr, INT8: tl.constexpr, GROUP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    W_BYTES: tl.constexpr, S_BYTES: tl.constexpr, PREFETCH: tl.constexpr, EARLY: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m0 = tl.program_id(1) * BLOCK_M
    mask_n = offs_n < N
    rows = tl.arange(0, BLOCK_M)
    if PREFETCH:
        _prefetch_rows(w_ptr, offs_n, N, stride_wn, W_BYTES)
        if INT4:
            _prefetch_rows(s_ptr, offs_n, N, stride_sn * 2, S_BYTES)
            _prefetch_rows(z_ptr, offs_n, N, stride_sn * 2, S_BYTES)
    if EARLY:
        gdc_launch_dependents()
    if not INT4:
        scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    gdc_wait()
    if not EARLY:
        gdc_launch_dependents()
    acc = qk._gemv_k_loop(x_ptr, w_ptr, s_ptr, z_ptr, offs_n, mask_n, m0, M, K, stride_xm, stride_wn, stride_sn,
                          INT4, INT8, GROUP_K, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)
    if not INT4:
        acc = acc * scale[None, :]
    offs_m = m0 + rows
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & mask_n[None, :])


def gemv_pdl(x, t, tile, group, pdl, prefetch, early, y=None):
    m, k = x.shape
    w = t["weight"]
    n = w.shape[0]
    bm, bn, bk, nw, st = tile
    y = x.new_empty((m, n)) if y is None else y
    int4 = group is not None
    s = t["scale"]
    z = t.get("zero", s)
    _gemv_pdl_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
        x, w, s, z, y, m, n, k, x.stride(0), w.stride(0), s.stride(0), y.stride(0),
        INT4=int4, INT8=not int4, GROUP_K=group or 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=st,
        W_BYTES=w.shape[1] * w.element_size(), S_BYTES=(s.shape[1] * s.element_size()) if int4 else 16,
        PREFETCH=prefetch, EARLY=early, num_warps=nw, launch_pdl=pdl,
    )
    return y


#: each chain's GEMV tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the package's picks at M=1 and neighbours
TILES = {"int4": [(1, 16, 1024, 4, 3), (1, 8, 1024, 2, 3), (1, 32, 1024, 4, 3)],
         "int8": [(1, 4, 1024, 2, 4), (1, 8, 512, 2, 3), (1, 16, 512, 4, 3)]}


def bf16_chain(x0, dims):
    """cuBLAS bf16 over random layers of these (N, K) shapes, from x0: the baseline chain."""
    bf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in dims]

    def chain():
        h = x0
        for w in bf:
            h = h @ w.t()
        return h

    return chain


def layer_tensors(n, k, kind, group, gen):
    if kind == "int4":
        return {
            "weight": torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8).cuda(),
            "scale": (torch.rand(n, k // group, generator=gen) * 0.01 + 0.001).bfloat16().cuda(),
            "zero": torch.randint(0, 16, (n, k // group), generator=gen, dtype=torch.uint8).cuda(),
        }
    return {
        "weight": torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8).cuda(),
        "scale": (torch.rand(n, generator=gen) * 0.01 + 0.001).float().cuda(),
    }


def reference(x, t, kind, group):
    if kind == "int4":
        return qk.weight_only_gemv(x, t["weight"], t["scale"], t["zero"], True, group, [1, 16, 1024, 4, 3])
    return qk.weight_only_gemv(x, t["weight"], t["scale"], t["scale"], False, 1, [1, 4, 1024, 2, 4])


def median_us(fn, reps=3):
    return statistics.median(cuda_tune.bench_us(fn) for _ in range(reps))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    res: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                 "layers": args.layers, "rows": []}

    def record(name, us, **kw):
        row = {"name": name, "us": round(us, 2), **kw}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)

    shapes = {"4096x4096": [(4096, 4096)] * args.layers,
              "llama3072 (qkv-ish, up, down)": [(3072, 3072), (8192, 3072), (3072, 8192), (3072, 3072)]}
    for sname, dims in shapes.items():
        x0 = torch.randn(1, dims[0][1], device="cuda", dtype=torch.bfloat16)
        chain_bf16 = bf16_chain(x0, dims)
        chain_bf16()
        record("cuBLAS bf16", median_us(chain_bf16), shape=sname)
        for kind in ("int4", "int8"):
            group = 128 if kind == "int4" else None
            ts = [layer_tensors(n, k, kind, group, gen) for n, k in dims]
            nbytes = sum(sum(v.numel() * v.element_size() for v in t.values()) for t in ts)
            srcs = [t["weight"].clone() for t in ts]
            dsts = [torch.empty_like(s) for s in srcs]

            def copies():
                for s, d in zip(srcs, dsts):
                    d.copy_(s)

            copies()
            record("copy of the weight bytes", median_us(copies), shape=sname, kind=kind, bytes=nbytes)

            def chain_ref():
                h = x0
                for t in ts:
                    h = reference(h, t, kind, group)
                return h

            want = chain_ref().float()
            record("package GEMV (no PDL)", median_us(chain_ref), shape=sname, kind=kind)
            for tile in TILES[kind]:
                if any(k % tile[2] for _, k in dims):
                    continue
                for pdl, prefetch, early, between in ((False, False, False, False), (True, False, False, False),
                                                      (True, False, True, False), (True, True, False, False),
                                                      (True, True, True, False), (True, True, True, True),
                                                      (False, False, False, True)):
                    def chain():
                        h = x0
                        for t in ts:
                            h = gemv_pdl(h, t, tile, group, pdl, prefetch, early)
                            if between:
                                h = h * 1.0  # a plain kernel launched without PDL between layers
                        return h

                    try:
                        got = chain().float()
                        err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
                        us = median_us(chain)
                    except Exception as e:  # noqa: BLE001 - a lab: record and go on
                        record("pdl", float("nan"), shape=sname, kind=kind, tile=tile, error=f"{type(e).__name__}: {str(e)[:300]}")
                        continue
                    record("GEMV+gdc", us, shape=sname, kind=kind, tile=tile, pdl=pdl, prefetch=prefetch, early=early,
                           elementwise_between=between, rel_err=err)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pdl.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
