"""Per-layer kernel lab on the lent GPU (issue 16): every candidate of the CUDA plans on one 4096x4096
layer, timed as a CUDA-graph replay with the L2 flushed by a read (`cuda_tune.bench_us`, the tuner's
own timer), beside cuBLAS on bf16 weights. Numbers place the tuner's candidate lists; the tuner
itself picks per card at compile time.

    python benchmarks/cuda_lab.py --out DIR [--fbgemm]    # lab.md, lab.json
    python benchmarks/cuda_lab.py --m1 --out DIR          # one-row GEMV tiles over the GPU Llama's shapes: m1.md, m1.json (~60 s)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import qexport  # noqa: E402
from qexport.lower.kernels import cuda as C, cuda_tune  # noqa: E402
from qexport.schemes import math_for  # noqa: E402

MS = (1, 4, 16, 64, 256, 1024, 4096)
GEMV_M1 = [(1, 2, 2048, 4), (1, 4, 1024, 4), (1, 1, 4096, 4), (1, 2, 4096, 8), (1, 4, 4096, 8), (1, 1, 4096, 2),
           (1, 2, 4096, 4), (1, 2, 2048, 4, 1), (1, 2, 2048, 4, 4), (1, 4, 1024, 4, 1), (1, 8, 512, 4), (1, 8, 128, 4),
           (1, 16, 128, 4), (1, 32, 128, 8), (1, 16, 128, 4, 4), (1, 32, 128, 4, 4), (1, 8, 128, 2), (1, 64, 128, 8, 4),
           (1, 4, 256, 4), (1, 16, 256, 4, 4)]
GEMV_M4 = [(2, 8, 512, 4), (4, 8, 512, 8), (4, 16, 128, 4), (2, 16, 128, 4), (4, 32, 128, 8), (4, 4, 1024, 4), (4, 2, 4096, 8)]
SMALL = [(16, 64, 256, 1, 4, 4, 1), (16, 32, 256, 1, 4, 4, 1), (32, 64, 256, 1, 4, 4, 1), (64, 64, 128, 8, 4, 4, 1),
         (16, 128, 128, 1, 4, 4, 1), (32, 128, 128, 1, 4, 4, 1), (16, 64, 128, 1, 4, 5, 1)]
LARGE = [(64, 128, 128, 8, 4, 4, 1), (128, 128, 64, 8, 4, 4, 1), (128, 128, 64, 8, 8, 3, 1), (128, 256, 64, 8, 8, 3, 1),
         (256, 128, 64, 8, 8, 3, 1), (128, 128, 128, 8, 8, 3, 1), (64, 256, 64, 8, 8, 4, 1), (128, 64, 128, 8, 4, 4, 1),
         (128, 256, 64, 8, 8, 4, 1), (256, 128, 64, 8, 8, 4, 1)]
Q8 = [(16, 64, 256, 8, 4, 4, 1), (32, 64, 256, 8, 4, 4, 1), (64, 64, 256, 8, 4, 4, 1), (128, 64, 256, 8, 4, 4, 1),
      (128, 64, 128, 8, 8, 4, 1), (128, 128, 128, 8, 4, 3, 0), (128, 256, 128, 8, 8, 3, 0), (128, 128, 128, 8, 8, 3, 1),
      (64, 128, 256, 8, 4, 3, 1), (256, 128, 128, 8, 8, 3, 1), (64, 64, 128, 8, 4, 5, 1)]


def rel(y, r):
    return float((y.float() - r.float()).abs().max() / r.float().abs().max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--fbgemm", action="store_true", help="also time fbgemm-gpu-genai's bf16i4bf16_rowwise (pip-installed)")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--gemv", action="store_true", help="only the few-row kernels")
    ap.add_argument("--few", action="store_true", help="three large tiles of the weight-only GEMMs (and on bf16 weights) and cuBLAS only")
    ap.add_argument("--large", action="store_true", help="only the large tiles and the row quantizers (M >= 64)")
    ap.add_argument("--ir", action="store_true", help="write the Triton IR of the int8 / int4 GEMMs' first large tile to ir.txt")
    ap.add_argument("--m1", action="store_true", help="only the one-row GEMV sweep over the Llama's layer shapes (m1.md, m1.json)")
    ap.add_argument("--m1-dtypes", default="int8,int4", help="the weight kinds --m1 sweeps")
    args = ap.parse_args()
    if args.m1:
        return m1_lab(args.out, args.m1_dtypes.split(","))
    ms = [int(m) for m in args.ms.split(",")]
    torch.manual_seed(0)
    n = k = 4096
    w = torch.randn(n, k, device="cuda") * 0.02
    s8 = qexport.schemes.get("int8_weight_only")
    s4 = qexport.schemes.get("int4_weight_only", group_size=128)
    t8 = math_for(s8).quantize_weight(s8, w)
    t4 = math_for(s4).quantize_weight(s4, w)
    sc8 = t8["weight_scale"].float().reshape(-1).contiguous()
    w8 = math_for(s8).dequantize_weight(s8, t8, (n, k)).bfloat16()
    w4 = math_for(s4).dequantize_weight(s4, t4, (n, k)).bfloat16()
    wb = w.bfloat16()
    ws8 = t8["weight"].to(torch.int32).sum(1).float()
    packed, sz = C.tinygemm_operands(t4["weight"], t4["weight_scale"], t4["weight_zero_point"], 8)
    t8d = {"weight": t8["weight"], "weight_scale_per_channel": sc8}
    res: dict[str, dict[int, float]] = {}
    errs: dict[str, float] = {}
    fails: list[str] = []

    def put(name, m, fn, ref=None, tol=2e-2):
        try:
            with torch.no_grad():
                y = fn()
                if ref is not None:
                    e = rel(y, ref)
                    errs[name] = max(errs.get(name, 0.0), e)
                    if not e <= tol:
                        fails.append(f"{name} M={m}: err {e:.2e}")
                        return
                res.setdefault(name, {})[m] = cuda_tune.bench_us(fn)
        except Exception as e:
            fails.append(f"{name} M={m}: {type(e).__name__}: {str(e)[:200]}")
            torch.cuda.synchronize()

    fb = None
    if args.fbgemm:
        try:
            import glob
            import importlib.util

            # The library alone: fbgemm_gpu's package __init__ also wants its non-genai wheel.
            root = os.path.dirname(importlib.util.find_spec("fbgemm_gpu").origin)
            torch.ops.load_library(glob.glob(os.path.join(root, "experimental", "gen_ai", "*.so"))[0])
            fb = torch.ops.fbgemm
            print("fbgemm loaded:", str(fb.bf16i4bf16_rowwise.default._schema), flush=True)
        except Exception as e:
            fails.append(f"fbgemm load: {type(e).__name__}: {str(e)[:300]}")
    if fb is not None:
        # Timing only: random codes (not zeros), fbgemm's own layouts.
        wq_fb = torch.randint(-128, 127, (n, k // 2), device="cuda", dtype=torch.int8)
        sg_fb = (torch.rand(k // 128, n, device="cuda") * 0.01).bfloat16()
        zg_fb = (torch.rand(k // 128, n, device="cuda") * 0.01).bfloat16()

    for m in ms:
        print(f"== M={m}", flush=True)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        r8, r4 = x @ w8.t(), x @ w4.t()
        put("bf16 cuBLAS", m, lambda: x @ wb.t())
        if m == 1:
            torch._dynamo.reset()
            f = torch.compile(C.int8_gemv, dynamic=False, options=C.INDUCTOR_OPTIONS)
            put("int8 Inductor GEMV", m, lambda: f(x, t8["weight"], sc8), r8)
        if m <= 16:
            put("int4 tinygemm", m, lambda: torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz), r4, 5e-2)
        for tile in (GEMV_M1 if m == 1 else GEMV_M4 if m <= 16 else []):
            put(f"int8 GEMV {tile}", m, lambda: C.triton_gemv(x, t8d, tile), r8)
            put(f"int4 GEMV {tile}", m, lambda: C.triton_gemv(x, t4, tile, 128), r4, 5e-2)
        if m == 1:  # four layers' worth in one graph: the fixed cost per kernel that a package pays
            bufs = [(torch.empty(8 << 20, dtype=torch.uint8, device="cuda").random_(), torch.empty(8 << 20, dtype=torch.uint8, device="cuda"))
                    for _ in range(4)]
            put("4 x copy 8 MB -> 8 MB, one graph", m, lambda: [d.copy_(c) for c, d in bufs])
            wbs = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
            put("4 x bf16 cuBLAS (4 weights), one graph", m, lambda: [x @ wq.t() for wq in wbs])
            w8s = [{"weight": torch.randint(-128, 127, (n, k), device="cuda", dtype=torch.int8), "weight_scale_per_channel": sc8} for _ in range(4)]
            best8 = (1, 2, 4096, 4)
            put(f"4 x int8 GEMV {best8} (4 weights), one graph", m, lambda: [C.triton_gemv(x, tq, best8) for tq in w8s])
            del bufs, wbs, w8s
        if m == 1:  # what a kernel of the same bytes moved and no arithmetic takes under this timer
            for mb in (4, 8):
                src = torch.empty(mb << 20, dtype=torch.uint8, device="cuda").random_()
                dst = torch.empty_like(src)
                put(f"copy {mb} MB -> {mb} MB", m, lambda: dst.copy_(src))
        tiles = [] if args.gemv else (SMALL if m <= 256 and not args.large else []) + (LARGE if m >= 64 else [])
        if args.few:
            tiles = [(128, 64, 128, 8, 4, 4, 1), (256, 128, 64, 8, 8, 3, 1), (128, 256, 64, 8, 8, 3, 1)]
        ones = torch.ones(n, device="cuda")
        for tile in tiles:
            put(f"int8 GEMM {tile}", m, lambda: C.triton_weight_mm(x, t8["weight"], sc8, tile), r8)
            put(f"int4 GEMM {tile}", m, lambda: C.triton_int4_mm(x, t4["weight"], t4["weight_scale"], t4["weight_zero_point"], 128, tile), r4, 5e-2)
            if m >= 256:  # the same GEMM on bf16 weights: its ceiling without any decode
                put(f"bf16-weight GEMM {tile}", m, lambda: C.triton_weight_mm(x, wb, ones, tile), x @ wb.t())
        if m in (256, 4096) and not args.gemv and not args.few:
            for label, sch, tt, ref in (("int8", s8, t8, r8), ("int4", s4, t4, r4)):
                torch._dynamo.reset()
                f = torch.compile(lambda x, sch=sch, tt=tt: x @ math_for(sch).dequantize_weight(sch, tt, (n, k)).to(x.dtype).t(),
                                  dynamic=False, options=C.INDUCTOR_OPTIONS)
                put(f"{label} dequant+cuBLAS", m, lambda: f(x), ref, 5e-2)
        if fb is not None and m >= 16:
            put("fbgemm bf16i4bf16_rowwise (random codes)", m, lambda: fb.bf16i4bf16_rowwise(x, wq_fb, sg_fb, zg_fb))
        if m in (1, 16, 256, 1024, 4096) and not args.gemv and not args.few:
            xq, sx, zp = torch.ops.qexport.int8_quantize_rows(x)
            rq = ((xq.float() - zp) * sx).bfloat16() @ w8.t()
            put("int8 row quantizer", m, lambda: torch.ops.qexport.int8_quantize_rows(x))
            put("fp8 row quantizer", m, lambda: torch.ops.qexport.fp8_quantize_rows(x))
            for tile in Q8:
                put(f"int8xint8 GEMM {tile}", m, lambda: torch.ops.qexport.weight_only_mm(
                    xq, t8["weight"], sc8, sc8, False, 0, C._fit_tile(xq, tile), sx, torch.bfloat16, zp, ws8), rq)
        write(args.out, res, errs, fails)
    write(args.out, res, errs, fails)
    if args.ir:
        dump_ir(args.out, t8, sc8, t4)


#: (N, K) of the M=1 sweep: the bench's 4096x4096 layer, then bench_llm's GPU Llama (q/o, gate/up, down, lm_head)
M1_SHAPES = ((4096, 4096), (3072, 3072), (8192, 3072), (3072, 8192), (32000, 3072))


def m1_tiles(int4: bool) -> list[tuple]:
    """GEMV tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, pipeline stages) whose weight step is 16-128 bytes a thread."""
    out = []
    for bn in ((4, 8, 16, 32) if int4 else (2, 4, 8, 16)):
        for bk in ((512, 1024, 2048) if int4 else (512, 1024, 2048, 4096)):
            for nw in (2, 4, 8):
                per_thread = bn * bk // (2 if int4 else 1) // (32 * nw)
                if 16 <= per_thread <= 128:
                    out += [(1, bn, bk, nw, stages) for stages in (3, 4)]
    return out


def m1_lab(out: str, dtypes: list[str]) -> None:
    """One activation row: every GEMV tile on the 4096x4096 layer, the best ones on the Llama's shapes, and
    graphs of 4 layers (what a package replays) for the best, tinygemm and cuBLAS bf16."""
    res: dict[str, dict[str, float]] = {}
    errs: dict[str, float] = {}
    fails: list[str] = []
    s8 = qexport.schemes.get("int8_weight_only")
    s4 = qexport.schemes.get("int4_weight_only", group_size=128)

    def layer(n, k, seed):
        torch.manual_seed(seed)
        w = torch.randn(n, k, device="cuda") * 0.02
        t8 = math_for(s8).quantize_weight(s8, w)
        t8["weight_scale_per_channel"] = t8["weight_scale"].float().reshape(-1).expand(n).contiguous()
        t4 = math_for(s4).quantize_weight(s4, w)
        packed, sz = C.tinygemm_operands(t4["weight"], t4["weight_scale"], t4["weight_zero_point"], 8)
        return {"bf16": w.bfloat16(), "int8": t8, "int4": t4, "tg": (packed, sz),
                "r8": math_for(s8).dequantize_weight(s8, t8, (n, k)).bfloat16(), "r4": math_for(s4).dequantize_weight(s4, t4, (n, k)).bfloat16()}

    def put(shape, name, fn, ref=None, tol=2e-2):
        key = f"{shape[0]}x{shape[1]}"
        try:
            with torch.no_grad():
                if ref is not None:
                    e = rel(fn(), ref)
                    errs[f"{key} {name}"] = e
                    if not e <= tol:
                        fails.append(f"{key} {name}: err {e:.2e}")
                        return None
                us = cuda_tune.bench_us(fn)
                res.setdefault(name, {})[key] = us
                return us
        except Exception as ex:
            fails.append(f"{key} {name}: {type(ex).__name__}: {str(ex)[:160]}")
            torch.cuda.synchronize()
            return None

    def gemv(dtype, L, x, tile):
        return C.triton_gemv(x, L["int4"], tile, 128) if dtype == "int4" else C.triton_gemv(x, L["int8"], tile)

    best: dict[str, list[tuple]] = {}
    for si, (n, k) in enumerate(M1_SHAPES):
        print(f"== {n}x{k}", flush=True)
        L = layer(n, k, si)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        put((n, k), "bf16 cuBLAS", lambda: x @ L["bf16"].t())
        put((n, k), "int4 tinygemm", lambda: torch.ops.aten._weight_int4pack_mm(x, *L["tg"][:1], 128, L["tg"][1]), x @ L["r4"].t(), 5e-2)
        for mb in (n * k // 2, n * k):  # a kernel moving the same bytes and doing no arithmetic: int4's, int8's
            src = torch.empty(mb // 2, dtype=torch.uint8, device="cuda").random_()
            dst = torch.empty_like(src)
            put((n, k), f"copy {'int4' if mb == n * k // 2 else 'int8'} bytes", lambda: dst.copy_(src))
        for dtype in dtypes:
            ref, tol = (x @ L["r4"].t(), 5e-2) if dtype == "int4" else (x @ L["r8"].t(), 2e-2)
            old = (1, 8, 512, 4, 1) if dtype == "int4" else (1, 2, 4096, 4, 1)
            put((n, k), f"{dtype} GEMV {old} [session 5 tile]", lambda: gemv(dtype, L, x, old), ref, tol)
            tiles = m1_tiles(dtype == "int4") if si == 0 else best[dtype]
            for tile in tiles:
                put((n, k), f"{dtype} GEMV {tile}", lambda: gemv(dtype, L, x, tile), ref, tol)
            if si == 0:
                key0 = f"{n}x{k}"
                ranked = sorted((v[key0], name) for name, v in res.items() if name.startswith(f"{dtype} GEMV (") and "session" not in name and key0 in v)
                best[dtype] = [eval(name.split("GEMV ")[1]) for _, name in ranked[:8]]
                print(dtype, "best:", [(round(t, 1), nm) for t, nm in ranked[:8]], flush=True)
        write_m1(out, res, errs, fails)
        del L
    # 16 rows on the first shape: the best one-row tiles over 4 and 8 rows per program, beside the
    # 16-row Triton GEMM tile and cuBLAS (the bucket where int4 was 0.98x bf16).
    n, k = M1_SHAPES[0]
    L = layer(n, k, 0)
    x16 = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
    put((n, k), "M=16 bf16 cuBLAS", lambda: x16 @ L["bf16"].t())
    put((n, k), "M=16 int4 tinygemm", lambda: torch.ops.aten._weight_int4pack_mm(x16, L["tg"][0], 128, L["tg"][1]), x16 @ L["r4"].t(), 5e-2)
    for dtype in dtypes:
        ref, tol = (x16 @ L["r4"].t(), 5e-2) if dtype == "int4" else (x16 @ L["r8"].t(), 2e-2)
        t = L[dtype]
        put((n, k), f"M=16 {dtype} GEMM {C.TILE_M16_K256}", lambda: C.triton_int4_mm(x16, t["weight"], t["weight_scale"], t["weight_zero_point"], 128, C.TILE_M16_K256)
            if dtype == "int4" else C.triton_weight_mm(x16, t["weight"], t["weight_scale_per_channel"], C.TILE_M16_K256), ref, tol)
        for bm in (4, 8):
            for tile in best[dtype][:3]:
                tm = (bm, *tile[1:])
                put((n, k), f"M=16 {dtype} GEMV {tm}", lambda: gemv(dtype, L, x16, tm), ref, tol)
    del L
    write_m1(out, res, errs, fails)
    # Four layers in one graph, each its own weights: what a package of 4 such layers replays.
    Ls = [layer(n, k, 10 + i) for i in range(4)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    put((n, k), "4 layers: bf16 cuBLAS", lambda: [x @ L["bf16"].t() for L in Ls])
    put((n, k), "4 layers: int4 tinygemm", lambda: [torch.ops.aten._weight_int4pack_mm(x, L["tg"][0], 128, L["tg"][1]) for L in Ls])
    for dtype in dtypes:
        for tile in [(1, 8, 512, 4, 1) if dtype == "int4" else (1, 2, 4096, 4, 1), *best[dtype][:4]]:
            put((n, k), f"4 layers: {dtype} GEMV {tile}", lambda: [gemv(dtype, L, x, tile) for L in Ls])
    write_m1(out, res, errs, fails)


def write_m1(out, res, errs, fails):
    shapes = [f"{n}x{k}" for n, k in M1_SHAPES]
    p = torch.cuda.get_device_properties(0)
    lines = [f"M=1, median µs of CUDA-graph replays (L2 flushed by a read), {p.name}, torch {torch.__version__}.", "",
             "| kernel | " + " | ".join(shapes) + " |", "|" + "---|" * (1 + len(shapes))]
    for name, by in sorted(res.items(), key=lambda kv: kv[1].get("4096x4096", 1e9)):
        lines.append(f"| {name} | " + " | ".join(f"{by[s]:.1f}" if s in by else "" for s in shapes) + " |")
    lines += ["", "Failures:"] + [f"- {f}" for f in fails]
    with open(os.path.join(out, "m1.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "m1.json"), "w") as f:
        json.dump({"res": res, "errs": errs, "fails": fails}, f, indent=1)
    print("\n".join(lines[:60]), flush=True)


def dump_ir(out, t8, sc8, t4):
    """Where the decoded weight tile goes on its way to wgmma (registers or shared memory): the TTGIR
    and a census of the PTX instructions that matter, per decode mode."""
    from triton.compiler import ASTSource  # noqa: F401  (the kernel cache holds what ran above)

    lines = []
    for fn in (C._weight_only_mm_kernel,):
        for dev_cache in fn.device_caches.values():
            for key, kern in list(dev_cache[0].items()):
                ttgir, ptx = kern.asm.get("ttgir", ""), kern.asm.get("ptx", "")
                census = {op: ptx.count(op) for op in ("cvt.rn.bf16", "cvt.rn.f32.s32", "cvt.f32.s8", "prmt.b32", "wgmma.mma_async", "ld.shared", "st.shared", "ldmatrix", "cp.async")}
                lines.append(f"== {str(key)[:300]}\n{census}\nshared={kern.metadata.shared} regs={getattr(kern, 'n_regs', '?')} spills={getattr(kern, 'n_spills', '?')}")
                lines += [ln for ln in ttgir.splitlines() if any(t in ln for t in ("local_alloc", "warp_group_dot ", "local_load", "convert_layout", "inline_asm"))][:40]
    with open(os.path.join(out, "ir.txt"), "w") as f:
        f.write("\n".join(lines))


def write(out, res, errs, fails):
    ms = sorted({m for v in res.values() for m in v})
    p = torch.cuda.get_device_properties(0)
    lines = [f"One 4096x4096 layer, median µs of CUDA-graph replays (L2 flushed by a read), {p.name}, torch {torch.__version__}.", "",
             "| kernel | rel err | " + " | ".join(f"M={m}" for m in ms) + " |", "|" + "---|" * (2 + len(ms))]
    for name, by_m in res.items():
        e = errs.get(name)
        lines.append(f"| {name} | {'-' if e is None else f'{e:.1e}'} | " + " | ".join(f"{by_m[m]:.1f}" if m in by_m else "" for m in ms) + " |")
    lines += ["", "Best per M:"]
    for m in ms:
        cands = sorted((v[m], kname) for kname, v in res.items() if m in v)
        bf = res.get("bf16 cuBLAS", {}).get(m)
        for fam in ("copy", "int8 GEMV", "int4 GEMV", "int8 GEMM", "int4 GEMM", "bf16-weight", "int8xint8", "int4 tinygemm", "int8 dequant", "int4 dequant", "int8 Inductor", "fbgemm"):
            best = [(t, kname) for t, kname in cands if kname.startswith(fam)][:2]
            if best:
                lines.append(f"- M={m} {fam}: " + ", ".join(f"{kname} {t:.1f}" for t, kname in best) + (f" (bf16 {bf:.1f})" if bf else ""))
    lines += ["", "Failures:"] + [f"- {f}" for f in fails]
    text = "\n".join(lines)
    with open(os.path.join(out, "lab.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "lab.json"), "w") as f:
        json.dump({"res": {kk: {str(m): t for m, t in v.items()} for kk, v in res.items()}, "errs": errs, "fails": fails}, f, indent=1)
    print(text[-6000:] if len(text) > 6000 else text, flush=True)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"lab took {time.time() - t0:.0f} s")
