"""Tile sweep of the production Triton GEMM (`_weight_only_mm_kernel`, qexport/lower/kernels/cuda.py).

For one layer (N out-features x K in-features) and each row count M it launches the kernel raw with
every tile (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, swap_ab), per operand kind, times
it next to cuBLAS on bf16 weights (and `torch._int_mm` / `torch._scaled_mm` where they apply), and
checks its output against a float64 torch reference on the same codes. Kinds: int8 (bf16 x, per-channel
scale), int4 (packed uint4, group 128, zero points), fp8 (fp8_quantize_rows codes x fp8 weight,
X_SCALE), int8x (int8_quantize_rows codes x int8 weight, X_SCALE + X_ZP + weight row sums), bf16
(Triton's own ceiling against cuBLAS).

The Triton tiles of `PLANS` in cuda.py came from this sweep's scratch precursors (same grid, 4096x4096,
the lent H100): per row bucket the fastest tile, kept where it also beat the other kernels of the
per-layer lab (docs/benchmarks/cuda.md). For another card or shape run it there and paste the tuples
of DIR/cuda_tiles.md into PLANS' buckets. On the lent GPU:

    python3 benchmarks/cuda_tiles.py --out $OUT [--kinds int8,fp8] [--n 4096 --k 4096]

It needs a CUDA device. A kind is ~1,300-1,800 timed (tile, M) pairs at the default --ms, minutes of GPU
time (estimated, not yet measured): sweep fewer kinds per call under a time limit.
`--dry-run` checks the script without a GPU: two tiles per kind, small float32 CPU tensors, Triton's
interpreter (TRITON_INTERPRET=1; it has no bf16 or fp8, so fp8 codes travel as float32 values).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

Tile = tuple[int, int, int, int, int, int, int]
KINDS = ("int8", "int4", "fp8", "int8x", "bf16")
GROUP = 128  # int4 group size along K
MAX_ERR = 2e-2  # tiles above this relative error are recorded but never ranked
SMEM_BUDGET = 200 * 1024  # below the H100's 227 KiB per block, leaving room for Triton's own scratch
OPERAND_BYTES = {"int8": (2, 1), "int4": (2, 0.5), "fp8": (1, 1), "int8x": (1, 1), "bf16": (2, 2)}  # (x, w) per element


@dataclass(frozen=True)
class Operands:
    """The kernel's pointer arguments for one kind; unused ones alias `s`, as `weight_only_mm` passes them."""
    x: torch.Tensor
    w: torch.Tensor
    s: torch.Tensor
    z: torch.Tensor
    xs: Optional[torch.Tensor] = None
    xz: Optional[torch.Tensor] = None
    ws: Optional[torch.Tensor] = None


def tile_space(kind: str, k: int) -> list[Tile]:
    """The tiles worth compiling: the lab scripts' grid, less what cannot fit or cannot win."""
    out, (x_bytes, w_bytes) = [], OPERAND_BYTES[kind]
    for bm, bn, bk, nw, ns, swap in itertools.product((16, 32, 64, 128), (32, 64, 128, 256), (64, 128, 256), (4, 8), (3, 4), (0, 1)):
        if (k % bk or (kind == "int4" and GROUP % bk)  # no K mask in the kernel; an int4 tile reads one group
                or (swap and bn < 64)  # swapped, BLOCK_N is the wgmma's M side: 64 rows at least
                or ns * bk * (bn * w_bytes + bm * x_bytes) > SMEM_BUDGET
                or (bm * bn >= 256 * 128 and nw == 4) or (bm * bn <= 32 * 64 and nw == 8)):  # spills / idle warps
            continue
        out.append((bm, bn, bk, 8, nw, ns, swap))  # GROUP_M only orders row tiles: PLANS' 1s at M <= BLOCK_M equal 8
    return out


def worth_timing(tile: Tile, m: int) -> bool:
    return tile[0] <= max(32, 2 * m)  # taller row tiles only compute padding (none won in the lab)


def make_operands(kind: str, m: int, n: int, k: int, device: str, act: torch.dtype) -> Operands:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=g).to(act)
    s = torch.rand(n, device=device, generator=g) * 0.01
    if kind == "int4":
        w = torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8, generator=g)
        sg = (torch.rand(n, k // GROUP, device=device, generator=g) * 0.01).to(act)
        return Operands(x, w, sg, torch.randint(0, 16, sg.shape, device=device, dtype=torch.uint8, generator=g))
    if kind == "bf16":
        return Operands(x, torch.randn(n, k, device=device, generator=g).to(act), torch.ones_like(s), s)
    if kind == "fp8":
        w = torch.randn(n, k, device=device, generator=g).to(torch.float8_e4m3fn)
        q, xs = quantize_rows(x, int8=False)
        # Triton's interpreter has no fp8 dtype: on CPU the codes travel as the float32 values they hold.
        return Operands(q, w, s, s, xs) if q.is_cuda else Operands(q.float(), w.float(), s, s, xs)
    w = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8, generator=g)
    if kind == "int8":
        return Operands(x, w, s, s)
    q, xs, xz = quantize_rows(x, int8=True)
    return Operands(q, w, s, s, xs, xz, w.to(torch.int32).sum(1).float())


def quantize_rows(x: torch.Tensor, int8: bool) -> tuple[torch.Tensor, ...]:
    """The production row quantizers on the GPU; the scheme's own math on CPU, where the interpreter
    has neither fp8 nor `libdevice.rint`."""
    if x.is_cuda:
        return (kernels().int8_quantize_rows if int8 else kernels().fp8_quantize_rows)(x)
    from qexport.schemes import activation as act
    if not int8:
        return act.quantize_fp8(x.float(), True)
    sx, zp = act.dynamic_int8_qparams(x.float(), True)
    return act.quantize_int8(x.float(), sx, zp).to(torch.int8), sx, zp


def kernels() -> Any:
    """cuda.py, imported late: TRITON_INTERPRET must be set before its `triton.jit` decorators run."""
    from qexport.lower.kernels import cuda
    return cuda


def unpack_int4(w: torch.Tensor) -> torch.Tensor:
    return torch.stack([(w >> 4) & 0xF, w & 0xF], -1).reshape(w.shape[0], -1)  # the even element is the high nibble


def reference(kind: str, op: Operands) -> torch.Tensor:
    """y in float64 from the same operands (codes included): the error measures the GEMM alone."""
    x, w = op.x.double(), op.w.double()
    if kind == "int4":
        q = unpack_int4(op.w).double().unflatten(1, (-1, GROUP))
        wd = ((q - op.z.double()[..., None]) * op.s.double()[..., None]).flatten(1)
        return x @ wd.to(op.x.dtype).double().t()  # the kernel rounds each weight to x's dtype before the dot
    y = x @ w.t()
    if kind == "int8x":
        y = y - op.xz.double() * op.ws.double()
    if kind in ("fp8", "int8x"):
        y = y * op.xs.double()
    return y * op.s.double()


def launch(op: Operands, tile: Tile, y: torch.Tensor) -> None:
    bm, bn, bk, gm, nw, ns, swap = tile
    (m, k), n, int4 = op.x.shape, op.w.shape[0], op.w.dtype == torch.uint8
    grid = ((m + bm - 1) // bm * ((n + bn - 1) // bn),)
    kernels()._weight_only_mm_kernel[grid](
        op.x, op.w, op.s, op.z, *(op.s if t is None else t for t in (op.xs, op.xz, op.ws)), y,
        m, n, k, op.x.stride(0), op.w.stride(0), op.s.stride(0), y.stride(0),
        INT4=int4, GROUP_K=GROUP if int4 else 0, SWAP_AB=bool(swap), X_SCALE=op.xs is not None, X_ZP=op.xz is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=nw, num_stages=ns,
    )


def compile_tiles(job: tuple[str, list[Tile], dict[str, Any]]) -> list[tuple[Tile, str]]:
    """Worker: one launch per tile fills Triton's disk cache; returns the tiles that failed, with why."""
    kind, tiles, cfg = job
    op = make_operands(kind, 16, cfg["n"], cfg["k"], cfg["device"], cfg["act"])
    y = op.x.new_empty((16, cfg["n"]), dtype=cfg["act"])
    bad = []
    for tile in tiles:
        try:
            launch(op, tile, y)
        except Exception as e:  # noqa: BLE001 - a tile the card cannot run is a result, not a crash
            bad.append((tile, repr(e)[:200]))
    if cfg["device"] == "cuda":
        torch.cuda.synchronize()
    return bad


def compile_all(space: dict[str, list[Tile]], cfg: dict[str, Any], workers: int) -> list[tuple[str, tuple[Tile, str]]]:
    """(kind, (tile, why)) for each tile that failed to compile, compiled across `workers` processes."""
    jobs = [(kind, tiles[i::workers], cfg) for kind, tiles in space.items() for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:  # spawn: a forked child cannot re-initialise CUDA
        return [(kind, bad) for (kind, _, _), bads in zip(jobs, pool.map(compile_tiles, jobs)) for bad in bads]


def bench_us(fn: Callable[[], Any], on_gpu: bool) -> float:
    if on_gpu:
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=50, return_mode="median") * 1e3
    t0 = time.perf_counter()  # interpreter: one call, only to exercise the path
    fn()
    return (time.perf_counter() - t0) * 1e6


def baselines(kind: str, op: Operands, on_gpu: bool) -> dict[str, float]:
    m, k = op.x.shape
    dtype = torch.bfloat16 if on_gpu else torch.float32
    xb, wb = (torch.randn(rows, k, device=op.x.device, dtype=dtype) for rows in (m, op.w.shape[0]))
    out = {"cublas_bf16": bench_us(lambda: xb @ wb.t(), on_gpu)}
    if on_gpu and kind == "int8x" and m > 16:  # aten._int_mm on CUDA needs more than 16 rows
        out["int_mm"] = bench_us(lambda: torch._int_mm(op.x, op.w.t()), on_gpu)
    if on_gpu and kind == "fp8":
        sb = op.s.reshape(1, -1)
        out["scaled_mm"] = bench_us(lambda: torch._scaled_mm(op.x, op.w.t(), op.xs, sb, None, None, torch.bfloat16, True), on_gpu)
    return out


def sweep_m(kind: str, m: int, tiles: list[Tile], cfg: dict[str, Any]) -> dict[str, Any]:
    op = make_operands(kind, m, cfg["n"], cfg["k"], cfg["device"], cfg["act"])
    y = op.x.new_empty((m, cfg["n"]), dtype=cfg["act"])
    ref, on_gpu = reference(kind, op), cfg["device"] == "cuda"
    timed, failed = [], []
    for tile in (t for t in tiles if worth_timing(t, m)):
        try:
            launch(op, tile, y)
            err = float((y.double() - ref).abs().max() / ref.abs().max())
            timed.append((bench_us(lambda: launch(op, tile, y), on_gpu), list(tile), err))
        except Exception as e:  # noqa: BLE001
            failed.append((list(tile), repr(e)[:200]))
    out = {**baselines(kind, op, on_gpu), "tiles": sorted(timed), "run_failed": failed}
    print(f"{kind} M={m}: cuBLAS bf16 {out['cublas_bf16']:.1f} | " + "; ".join(f"{t[0]:.1f} {tuple(t[1])} e={t[2]:.0e}" for t in out["tiles"][:3]), flush=True)
    return out


def write_markdown(res: dict[str, Any], path: str) -> None:
    lines = [f"# Triton GEMM tiles, N={res['n']} K={res['k']}, {res['card']} (torch {res['torch']}, Triton {res['triton']})", "",
             "Tiles as `PLANS` writes them: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, swap_ab); µs are",
             f"medians; err = max |y - ref| / max |ref| against float64, tiles above {MAX_ERR} are not ranked."]
    for kind, by_m in res["kinds"].items():
        extra = sorted({b for r in by_m.values() for b in r if b not in ("cublas_bf16", "tiles", "run_failed")})
        lines += ["", f"## {kind} ({res['failed'][kind]} of {res['tiles'][kind]} tiles failed to compile)", "",
                  "| M | cuBLAS bf16 | " + "".join(f"{b} | " for b in extra) + "best | 2nd | 3rd |",
                  "|---" * (4 + len(extra)) + "|---|"]
        for m, r in by_m.items():
            best = [f"`{tuple(t)}` {us:.1f} µs, err {e:.0e}" for us, t, e in r["tiles"] if e <= MAX_ERR][:3]
            cells = [f"{r['cublas_bf16']:.1f}", *(f"{r[b]:.1f}" if b in r else "" for b in extra), *best, *[""] * (3 - len(best))]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def spin_up() -> None:
    """A second of GEMMs first, so that the first kind is not timed at idle clocks."""
    a, t0 = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16), time.time()
    while time.time() - t0 < 1.0:
        a @ a
    torch.cuda.synchronize()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for cuda_tiles.json and cuda_tiles.md")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {','.join(KINDS)}")
    ap.add_argument("--n", type=int, default=4096, help="out-features of the layer")
    ap.add_argument("--k", type=int, default=4096, help="in-features of the layer (a multiple of 128 for int4)")
    ap.add_argument("--ms", default="1,16,32,64,128,256,512,1024,4096", help="row counts to time")
    ap.add_argument("--workers", type=int, default=14, help="processes compiling tiles in parallel")
    ap.add_argument("--dry-run", action="store_true", help="2 tiles per kind, small CPU tensors, Triton's interpreter")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    kinds, ms = a.kinds.split(","), [int(v) for v in a.ms.split(",")]
    if set(kinds) - set(KINDS):
        sys.exit(f"unknown kinds {sorted(set(kinds) - set(KINDS))}; choose from {','.join(KINDS)}")
    if a.dry_run:  # before the kernel module is imported: triton.jit reads it at decoration time
        os.environ["TRITON_INTERPRET"] = "1"
        a.n, a.k, ms, a.workers = 64, 256, [1, 5, 33], 2
    elif not torch.cuda.is_available():
        sys.exit("cuda_tiles.py times GPU kernels and needs a CUDA device (or --dry-run to check it on CPU)")
    cuda = kernels()
    if cuda.triton is None:
        sys.exit("cuda_tiles.py needs Triton (it ships with CUDA builds of torch)")
    cfg = {"n": a.n, "k": a.k, "device": "cpu" if a.dry_run else "cuda", "act": torch.float32 if a.dry_run else torch.bfloat16}
    space = {kind: tile_space(kind, a.k) for kind in kinds}
    if a.dry_run:  # the two smallest tiles, one of each orientation: the interpreter runs every program in Python
        space = {kind: [min(t for t in ts if t[6] == swap) for swap in (0, 1)] for kind, ts in space.items()}
    t0 = time.time()
    failed = compile_all(space, cfg, a.workers)
    print(f"compiled {sum(map(len, space.values()))} tiles in {time.time() - t0:.0f} s, {len(failed)} failed", flush=True)
    res: dict[str, Any] = {
        "card": "CPU (Triton interpreter)" if a.dry_run else torch.cuda.get_device_name(0),
        "torch": torch.__version__, "triton": cuda.triton.__version__, "n": a.n, "k": a.k,
        "tiles": {kind: len(space[kind]) for kind in kinds}, "failed": {kind: sum(k == kind for k, _ in failed) for kind in kinds},
        "compile_failures": [[kind, list(tile), why] for kind, (tile, why) in failed], "kinds": {},
    }
    if not a.dry_run:
        spin_up()
    for kind in kinds:
        bad = {tile for k, (tile, _) in failed if k == kind}
        res["kinds"][kind] = {str(m): sweep_m(kind, m, [t for t in space[kind] if t not in bad], cfg) for m in ms}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "cuda_tiles.json"), "w") as f:
        json.dump(res, f, indent=1)
    write_markdown(res, os.path.join(a.out, "cuda_tiles.md"))
    print(f"done in {time.time() - t0:.0f} s: {a.out}/cuda_tiles.md")


if __name__ == "__main__":
    main()
