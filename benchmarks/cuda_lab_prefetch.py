"""Kernel lab on the lent GPU (issue 16/17, session 13): the NEXT layer's weights prefetched into L2.

At M=1 a 4096x4096 int4 layer's 8.4 MB take ~2 µs at the H200's bandwidth, yet every one-kernel-per-layer
structure tried reads them in >= 6.9 µs (sessions 10-11): the kernels are bound by DRAM latency and
their own ramp, not by bandwidth. A layer's weights do not depend on the layer before, so the GEMV of
layer i can ask for layer i+1's weights (`cp.async.bulk.prefetch.L2`, fire and forget) while it
streams its own: the bandwidth it leaves idle fills L2, and the next GEMV reads L2. Session 9's
PDL lab prefetched a kernel's OWN rows after an early launch (no gain: little overlap); this is the
other way round and needs no launch attributes.

Times chains of layers in one CUDA graph, L2 flushed by a read before each replay (as bench_cuda):
- cuBLAS bf16; the package GEMV; the same with the L2 left warm (the upper bound of any prefetch);
- the GEMV with the next layer's codes, scales and zero points prefetched at its start or its end;
- the same with a plain elementwise kernel between layers (as norms sit between GEMVs in a model).

    python benchmarks/cuda_lab_prefetch.py --out DIR     # prefetch.json

Result (H200, session 13, docs/benchmarks/cuda.md): prefetching costs 13-30 µs per chain, and even a warm
L2 holding every weight leaves four int4 layers at 25.8 µs (2.14x bf16); not adopted.
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
from qexport.lower.kernels import cuda as qk  # noqa: E402
from qexport.lower.kernels import cuda_tune  # noqa: E402

from cuda_lab_pdl import TILES, bf16_chain, layer_tensors  # noqa: E402  (the PDL lab's tiles and random layers)

PIECE = 4096  # bytes per prefetch instruction


@triton.jit
def _prefetch_share(ptr, nbytes, PIECES: tl.constexpr):
    # This program's PIECE-byte (4096) pieces of [ptr, ptr + nbytes): piece j goes to program j % P.
    # Lanes past the end repeat the last piece (a prefetch cannot be masked without a predicate;
    # repeating one is harmless).
    if PIECES > 0:
        pid = tl.program_id(0)
        npr = tl.num_programs(0)
        last = tl.cdiv(nbytes, 4096) - 1
        j = tl.minimum(pid + npr * tl.arange(0, PIECES), last).to(tl.int64)
        size = (tl.minimum(4096, nbytes - j * 4096) // 16 * 16).to(tl.int32)
        addr = (ptr.to(tl.pointer_type(tl.uint8), bitcast=True) + j * 4096).to(tl.int64)
        tl.inline_asm_elementwise(
            "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
            [addr, size], dtype=tl.int32, is_pure=False, pack=1,
        )


@triton.jit
def _prefetch_next(pw_ptr, pw_bytes, ps_ptr, ps_bytes, pz_ptr, pz_bytes, PW: tl.constexpr, PS: tl.constexpr, PZ: tl.constexpr):
    # the next layer's codes, scales and zero points, once per row of programs
    if tl.program_id(1) == 0:
        _prefetch_share(pw_ptr, pw_bytes, PW)
        _prefetch_share(ps_ptr, ps_bytes, PS)
        _prefetch_share(pz_ptr, pz_bytes, PZ)


@triton.jit(do_not_specialize=["M"])
def _gemv_pf_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
    pw_ptr, pw_bytes, ps_ptr, ps_bytes, pz_ptr, pz_bytes,
    INT4: tl.constexpr, INT8: tl.constexpr, GROUP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    PF_AT: tl.constexpr, PW: tl.constexpr, PS: tl.constexpr, PZ: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m0 = tl.program_id(1) * BLOCK_M
    mask_n = offs_n < N
    rows = tl.arange(0, BLOCK_M)
    if PF_AT == 1:
        _prefetch_next(pw_ptr, pw_bytes, ps_ptr, ps_bytes, pz_ptr, pz_bytes, PW, PS, PZ)
    if not INT4:
        scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc = qk._gemv_k_loop(x_ptr, w_ptr, s_ptr, z_ptr, offs_n, mask_n, m0, M, K, stride_xm, stride_wn, stride_sn,
                          INT4, INT8, GROUP_K, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)
    if PF_AT == 2:
        _prefetch_next(pw_ptr, pw_bytes, ps_ptr, ps_bytes, pz_ptr, pz_bytes, PW, PS, PZ)
    if not INT4:
        acc = acc * scale[None, :]
    offs_m = m0 + rows
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & mask_n[None, :])


def _pieces(t: torch.Tensor | None, programs: int) -> tuple[torch.Tensor | None, int, int]:
    if t is None:
        return None, 0, 0
    nbytes = t.numel() * t.element_size()
    return t, nbytes, triton.next_power_of_2(triton.cdiv(triton.cdiv(nbytes, PIECE), programs))


def gemv_pf(x, t, tile, group, nxt, pf_at):
    m, k = x.shape
    w = t["weight"]
    n = w.shape[0]
    bm, bn, bk, nw, st = tile
    y = x.new_empty((m, n))
    int4 = group is not None
    s = t["scale"]
    z = t.get("zero", s)
    programs = triton.cdiv(n, bn)
    pw, pwb, pwn = _pieces(nxt.get("weight") if nxt else None, programs)
    ps, psb, psn = _pieces(nxt.get("scale") if nxt else None, programs)
    pz, pzb, pzn = _pieces(nxt.get("zero") if nxt else None, programs)
    _gemv_pf_kernel[(programs, triton.cdiv(m, bm))](
        x, w, s, z, y, m, n, k, x.stride(0), w.stride(0), s.stride(0), y.stride(0),
        pw if pw is not None else w, pwb, ps if ps is not None else w, psb, pz if pz is not None else w, pzb,
        INT4=int4, INT8=not int4, GROUP_K=group or 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=st,
        PF_AT=pf_at if nxt else 0, PW=pwn, PS=psn, PZ=pzn, num_warps=nw,
    )
    return y


_FLUSH: list = []


def replay_us(fn, flush: bool = True, reps: int = 400) -> float:
    """Median µs of one CUDA-graph replay of fn, the L2 flushed by a read before each (or left warm)."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.int8, device="cuda"))
    fn()
    graph = cuda_tune.capture(fn)
    for _ in range(50):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in events:
        if flush:
            _FLUSH[0].sum()
        a.record()
        graph.replay()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    res: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "rows": []}

    def record(name, us, **kw):
        row = {"name": name, "us": round(us, 2), **kw}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)

    def med(fn, flush=True):
        return statistics.median(replay_us(fn, flush) for _ in range(3))

    shapes = {"4x4096^2": [(4096, 4096)] * 4,
              "llama3072 (q, up, down, o)": [(3072, 3072), (8192, 3072), (3072, 8192), (3072, 3072)],
              "8x4096^2": [(4096, 4096)] * 8}
    for sname, dims in shapes.items():
        x0 = torch.randn(1, dims[0][1], device="cuda", dtype=torch.bfloat16)
        chain_bf16 = bf16_chain(x0, dims)
        record("cuBLAS bf16", med(chain_bf16), shape=sname)
        del chain_bf16  # its bf16 weights
        for kind in ("int4", "int8"):
            group = 128 if kind == "int4" else None
            ts = [layer_tensors(n, k, kind, group, gen) for n, k in dims]
            nbytes = sum(sum(v.numel() * v.element_size() for v in t.values()) for t in ts)
            for tile in TILES[kind]:
                if any(k % tile[2] for _, k in dims):
                    continue

                def make(pf_at, between):
                    def chain():
                        h = x0
                        for i, t in enumerate(ts):
                            nxt = ts[i + 1] if i + 1 < len(ts) else None
                            h = gemv_pf(h, t, tile, group, nxt, pf_at)
                            if between:
                                h = h * 1.0  # a plain kernel between layers
                        return h
                    return chain

                want = make(0, False)().float()
                for pf_at, between, flush in ((0, False, True), (0, False, False), (1, False, True), (2, False, True),
                                              (0, True, True), (1, True, True)):
                    chain = make(pf_at, between)
                    try:
                        got = chain().float()
                        err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
                        us = med(chain, flush)
                    except Exception as e:  # noqa: BLE001 - a lab: record and go on
                        record("error", float("nan"), shape=sname, kind=kind, tile=tile, pf_at=pf_at,
                               error=f"{type(e).__name__}: {str(e)[:300]}")
                        continue
                    record("GEMV", us, shape=sname, kind=kind, tile=tile, prefetch={0: "none", 1: "start", 2: "end"}[pf_at],
                           elementwise_between=between, l2="flushed" if flush else "warm", rel_err=err, bytes=nbytes)
            del ts
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prefetch.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
