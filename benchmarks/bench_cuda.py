"""CUDA speed and memory of quantized AOTInductor packages vs the bf16 package, in ONE run on the lent GPU.

Model: 4 x Linear(4096, 4096, bias=False) in bf16 (an LLM projection stack), input [M, 4096] bf16
with M dynamic (1..4096): ONE package per variant serves every M. Each variant is compiled with
qexport.compile(device="cuda") (default options unless its label says otherwise), loaded with
qexport.load_compiled, checked against the eager quantized model and timed at M in {1, 16, 256, 4096}
with CUDA events (median, L2 flushed by a read before every call; cuda_tune.time_us) two ways: a plain call of the
runner (host overhead included) and a replay of a CUDA graph captured from it (what a server's decode
loop runs); then again in further round-robin rounds over all packages, each figure the median of its
rounds. Ratios are bf16 AOTI latency / variant latency, same card, same run. Also per package: its
bytes, the GPU memory its load took (device-wide, `cudaMemGetInfo`), and the M=1 floor: the bytes of
its weights over the card's measured copy bandwidth. Every package (bf16 and torchao's too) is loaded
with `run_single_threaded=True`, the loader qexport's `load_compiled` uses for CUDA (capturable).
torchao's equivalents (benchmarks/_torchao.py) are built the same way where torchao imports (on the
lent GPU: carry the torchao 0.17 wheel, see docs/benchmarks/cuda.md).

    python benchmarks/bench_cuda.py --out DIR            # the package table: cuda.md, cuda.json, cuda_speedup.png
    python benchmarks/bench_cuda.py --tune --out DIR     # only tune the plans (qexport.compile would), print them

Per-layer kernel candidates (what the tuner chooses among) are timed by benchmarks/cuda_lab.py.

On the lent machine compile with CXX=/usr/bin/g++ (GPU_BASELINE.md: packages built with the image's
newer GCC segfault on load).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import traceback

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import qexport  # noqa: E402
from _scratch import scratch_dir  # noqa: E402

BF16_COPY = {"qexport.large_m": "bf16_weights"}
VARIANTS = [  # (label, scheme, params, compile options); labels without [...] use qexport's defaults
    ("int8_weight_only", "int8_weight_only", {}, None),
    ("int8_weight_only [large_m=bf16_weights]", "int8_weight_only", {}, BF16_COPY),
    ("int4_weight_only g128", "int4_weight_only", {"group_size": 128}, None),
    ("int4_weight_only g128 [large_m=bf16_weights]", "int4_weight_only", {"group_size": 128}, BF16_COPY),
    ("fp8_e4m3", "fp8_e4m3", {}, None),
    ("int8_dynamic", "int8_dynamic", {}, None),
]
# Comparison rows run with --only (not in the default run): upstream's fusion and nf4 (no CUDA kernel).
EXTRA_VARIANTS = [
    ("int8_weight_only [upstream Inductor fusion]", "int8_weight_only", {}, {"qexport.kernels": "inductor"}),
    ("nf4 [Inductor fusion]", "nf4", {}, None),
]
MS = (1, 16, 256, 4096)
DEFAULTS = ("int8_weight_only", "int4_weight_only g128", "fp8_e4m3", "int8_dynamic")
# issue 16, under graph replay at M=1: (variant, minimum speed-up over bf16)
REPLAY_TARGETS_M1 = {"int8_weight_only": 1.8, "int4_weight_only g128": 2.5}
FLOOR_TARGET = 1.6  # M=1 replay within this factor of weight bytes / copy bandwidth
SIZE_TARGETS = {"int8_weight_only": 0.55, "fp8_e4m3": 0.55, "int4_weight_only g128": 0.30}  # of the bf16 package


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref|: the measure the schemes' tolerances are written in."""
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


def bench(fn) -> float:
    from qexport.lower.kernels.cuda_tune import time_us

    # A long warm-up: after seconds of host-side compiling the GPU's clocks have dropped, and 25 ms of
    # work did not bring them back (single 2-8x outliers in the first lab run). The L2 is flushed by a
    # read, not do_bench's write (see time_us).
    return time_us(fn, warmup_ms=300, rep_ms=100)


def flush_check(dim: int) -> str:
    """One bf16 layer at M=1 timed with do_bench's write flush and with time_us's read flush."""
    from triton.testing import do_bench

    w = torch.randn(dim, dim, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, dim, device="cuda", dtype=torch.bfloat16)
    written = float(do_bench(lambda: x @ w.t(), warmup=100, rep=100, return_mode="median")) * 1e3
    return f"bf16 {dim}x{dim} M=1 per layer: {written:.1f} µs flushing L2 by writes (do_bench), {bench(lambda: x @ w.t()):.1f} by reads"


def card() -> str:
    import triton

    p = torch.cuda.get_device_properties(0)
    return f"{p.name} ({p.multi_processor_count} SMs), torch {torch.__version__}, CUDA {torch.version.cuda}, Triton {triton.__version__}"


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, read + written counted (1 GiB buffers, median)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = bench(lambda: b.copy_(a))
    del a, b
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / (us * 1e-6)


def copy_graph_us(total_bytes: int, layers: int = 4) -> float:
    """µs of one CUDA-graph replay of `layers` device copies that together move `total_bytes` (half read,
    half written): what a package with no arithmetic at all, one kernel per layer, takes under the
    same timer. The M=1 floor below ignores the per-kernel cost this includes (launch, ramp, tail)."""
    half = max(total_bytes // layers // 2, 1)
    bufs = [(torch.empty(half, dtype=torch.uint8, device="cuda").random_(), torch.empty(half, dtype=torch.uint8, device="cuda"))
            for _ in range(layers)]
    copies = lambda: [dst.copy_(src) for src, dst in bufs]  # noqa: E731
    from qexport.lower.kernels.cuda_tune import capture as capture_fn
    graph = capture_fn(copies)
    us = bench(graph.replay)
    del bufs, graph
    torch.cuda.empty_cache()
    return us


def gpu_used() -> int:
    """Bytes in use on the device (every allocator: AOTInductor holds constants outside torch's)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return total - free


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def first(y):
    return y[0] if isinstance(y, (list, tuple)) else y


def capture(runner, x: torch.Tensor):
    """A CUDA graph of one `runner(x)` call, and the output tensor its replays write."""
    from qexport.lower.kernels.cuda_tune import capture as capture_fn
    out: dict = {}
    graph = capture_fn(lambda: out.__setitem__("y", first(runner(x))))
    return graph, out["y"]


# -- the package table ----------------------------------------------------------------------------

def stack(dim: int, layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(dim, dim, bias=False) for _ in range(layers))).to(torch.bfloat16).eval()


def run_table(out: str, dim: int, only: list[str], hint: int = 16, torchao: bool = True, rounds: int = 3) -> None:
    tmp = scratch_dir("bench_cuda.")
    base = stack(dim)
    # The example's row count is the size hint Inductor tunes generated kernels for (dynamic M).
    example = torch.randn(hint, dim, dtype=torch.bfloat16)
    dyn = ({0: torch.export.Dim("m", min=1, max=4096)},)
    inputs = {m: torch.randn(m, dim, dtype=torch.bfloat16, device="cuda") for m in MS}
    rows: list[dict] = []

    timed: list = []
    bandwidth = copy_bandwidth()
    print(f"== copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); {flush_check(dim)}", flush=True)

    def time_once(row: dict, runner, graphs: dict) -> None:
        spin_up(0.3)
        with torch.no_grad():
            for m, x in inputs.items():
                row.setdefault(f"samples_M{m}", []).append(bench(lambda: runner(x)))
                row[f"us_M{m}"] = statistics.median(row[f"samples_M{m}"])
                if m in graphs:
                    row.setdefault(f"replay_samples_M{m}", []).append(bench(graphs[m].replay))
                    row[f"replay_us_M{m}"] = statistics.median(row[f"replay_samples_M{m}"])

    def measure(row: dict, runner, eager) -> None:
        spin_up()
        graphs = {}
        with torch.no_grad():
            for m, x in inputs.items():
                y = first(runner(x))
                if eager is not None:
                    row[f"err_M{m}"] = rel_err(y, eager(x))
                try:
                    graph, y_graph = capture(runner, x)
                    graph.replay()
                    torch.cuda.synchronize()
                    if not torch.equal(y_graph, first(runner(x))):
                        raise RuntimeError("the replay's output differs from a plain call's")
                    graphs[m] = graph
                except Exception as e:  # reported in the table; the per-call figures stand
                    row["replay_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    torch.cuda.synchronize()
                    break
        if row.get("weight_bytes"):
            row["floor_us_M1"] = row["weight_bytes"] / bandwidth * 1e6
            row["copy_graph_us"] = copy_graph_us(row["weight_bytes"])
        time_once(row, runner, graphs)
        print("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        rows.append(row)
        timed.append((row, runner, graphs))
        write_table(out, dim, rows, bandwidth)  # after every variant: a run cut short still leaves its table

    def record(label: str, path: str, eager, compile_s: float, planned: str, wbytes: int):
        row: dict = {"variant": label, "compile_s": compile_s, "bytes": os.path.getsize(path), "kernels": planned,
                     "weight_bytes": wbytes}
        used = gpu_used()
        t = time.perf_counter()
        if label == "bf16":
            runner = torch._inductor.aoti_load_package(path, run_single_threaded=True)
        else:
            runner = qexport.load_compiled(path)
        row["load_s"] = time.perf_counter() - t
        row["gpu_bytes"] = gpu_used() - used
        measure(row, runner, eager)
        return runner

    print(f"== bf16 ({card()})", flush=True)
    ep = torch.export.export(base.cuda(), (example.cuda(),), dynamic_shapes=dyn)
    path = os.path.join(tmp, "bf16.pt2")
    t = time.perf_counter()
    torch._inductor.aoti_compile_and_package(ep, package_path=path)
    record("bf16", path, None, time.perf_counter() - t, "cuBLAS (Inductor default)", weight_bytes(base))
    rows[0]["hint"] = hint
    base = base.cpu()

    for label, name, params, options in VARIANTS + EXTRA_VARIANTS:
        if (only and label not in only) or (not only and (label, name, params, options) in EXTRA_VARIANTS):
            continue
        print(f"== {label}", flush=True)
        try:
            scheme = qexport.schemes.get(name, **params)
            qm = qexport.quantize(copy.deepcopy(base), scheme).cuda()
            ep = qexport.export(qm, (example.cuda(),), dynamic_shapes=dyn)
            from qexport.lower.aoti import plan

            t = time.perf_counter()
            planned = plan(ep, device="cuda", options=options).regions[0]
            tune_s = time.perf_counter() - t
            path = os.path.join(tmp, f"{len(rows)}.pt2")
            t = time.perf_counter()
            qexport.compile(ep, path, device="cuda", options=options)
            runner = record(label, path, qm, time.perf_counter() - t, planned.kernel, weight_bytes(qm))
            rows[-1].update(plan=planned.reason, tune_s=tune_s)
            del runner, qm
        except Exception as e:  # a variant that fails is reported, not fatal
            traceback.print_exc()
            rows.append({"variant": label, "error": f"{type(e).__name__}: {str(e)[:400]}"})
        torch.cuda.empty_cache()
    if torchao:
        run_torchao(tmp, base.cuda(), example.cuda(), dyn, only, measure, rows)
    # More rounds over every loaded package, round-robin, each figure the median of its rounds: a
    # clock or neighbour drift during the run then hits every variant alike instead of the one timed
    # at that moment (one pass per variant once read int4 M=1 at 47 µs, 38 µs in the next run).
    for r in range(1, rounds):
        print(f"== timing round {r + 1}/{rounds}", flush=True)
        for row, runner, graphs in timed:
            time_once(row, runner, graphs)
        write_table(out, dim, rows, bandwidth)


def run_torchao(tmp: str, base: nn.Module, example: torch.Tensor, dyn, only: list[str], measure, rows: list[dict]) -> None:
    """torchao's equivalents (benchmarks/_torchao.py), each one package from the same bf16 model."""
    import _torchao

    why = _torchao.available()
    if why:
        print(f"== torchao rows skipped: {why}", flush=True)
        return
    import torchao

    for label, ours in _torchao.TORCHAO_VARIANTS:
        if only and label not in only:
            continue
        print(f"== {label} (torchao {torchao.__version__}, compares with {ours})", flush=True)
        try:
            path = os.path.join(tmp, f"{len(rows)}.pt2")
            used = gpu_used()
            t = time.perf_counter()
            runner, how = _torchao.build(label, base, example, dyn, path)
            # Memory: quantize_ + export + compile + load in one call, so its delta is an upper bound.
            row = {"variant": f"{label} ({torchao.__version__})", "compile_s": time.perf_counter() - t,
                   "bytes": os.path.getsize(path) if os.path.exists(path) else 0, "kernels": how, "load_s": float("nan"),
                   "gpu_bytes": gpu_used() - used}
            measure(row, runner, None)
        except Exception as e:
            traceback.print_exc()
            rows.append({"variant": label, "error": f"{type(e).__name__}: {str(e)[:400]}"})
        torch.cuda.empty_cache()


def write_table(out: str, dim: int, rows: list[dict], bandwidth: float) -> None:
    bf = next(r for r in rows if r["variant"] == "bf16")
    ok = [r for r in rows if "error" not in r]
    ratio = lambda r, key, m: bf[f"{key}_M{m}"] / r[f"{key}_M{m}"] if f"{key}_M{m}" in r and f"{key}_M{m}" in bf else float("nan")  # noqa: E731
    lines = [
        f"4 x Linear({dim}, {dim}, bias=False), bf16 activations, one AOTInductor package per variant (dynamic M 1..4096, "
        f"example rows {rows[0].get('hint', 16)}), {card()}; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write). "
        f"Median µs (CUDA events, L2 flushed by a read before each call; the median of {len(bf['samples_M1'])} round(s) over all packages); "
        "×bf16 = bf16 µs / variant µs.",
        "",
        "Per call (`runner(x)`, host overhead included):",
        "",
        "| variant | kernels | " + " | ".join(f"M={m} µs | ×bf16" for m in MS) + " | max rel err vs eager |",
        "|" + "---|" * (3 + 2 * len(MS)),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:200]} |")
            continue
        cells = [r["variant"], r["kernels"]]
        for m in MS:
            cells += [f"{r[f'us_M{m}']:.1f}", f"{ratio(r, 'us', m):.2f}×"]
        errs = [r[k] for k in r if k.startswith("err_M")]
        cells.append(f"{max(errs):.1e}" if errs else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "CUDA-graph replay (one captured `runner(x)` per M, `graph.replay()` timed); floor = weight bytes / copy bandwidth; "
              "copy graph = one replay of 4 device copies moving the weight bytes (`copy_graph_us`):",
              "", "| variant | " + " | ".join(f"M={m} µs | ×bf16" for m in MS) + " | M=1 floor µs | M=1 ÷ floor | copy graph µs |",
              "|" + "---|" * (4 + 2 * len(MS))]
    for r in ok:
        if "replay_us_M1" not in r:
            lines.append(f"| {r['variant']} | not capturable: {r.get('replay_error', '?')} |")
            continue
        cells = [r["variant"]]
        for m in MS:
            cells += [f"{r.get(f'replay_us_M{m}', float('nan')):.1f}", f"{ratio(r, 'replay_us', m):.2f}×"]
        floor = r.get("floor_us_M1")
        cells += [f"{floor:.1f}" if floor else "-", f"{r['replay_us_M1'] / floor:.2f}×" if floor else "-",
                  f"{r['copy_graph_us']:.1f}" if r.get("copy_graph_us") else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Size and memory (GPU memory: device-wide bytes in use after the load minus before):", "",
              "| variant | package MB | ×bf16 | GPU MB after load | ×bf16 | weights MB | compile s | (of it tuning s) | load s | plan |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        gpu = r.get("gpu_bytes")
        cells = [r["variant"], f"{r['bytes'] / 1e6:.0f}" if r["bytes"] else "-", f"{r['bytes'] / bf['bytes']:.2f}×" if r["bytes"] else "-",
                 f"{gpu / 1e6:.0f}" if gpu is not None else "-", f"{gpu / bf['gpu_bytes']:.2f}×" if gpu is not None and bf.get("gpu_bytes") else "-",
                 f"{r['weight_bytes'] / 1e6:.0f}" if r.get("weight_bytes") else "-", f"{r['compile_s']:.0f}",
                 f"{r['tune_s']:.0f}" if "tune_s" in r else "-", "-" if r["load_s"] != r["load_s"] else f"{r['load_s']:.1f}",
                 r.get("plan", "").replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")

    # The targets are about qexport's defaults. "Slower" means by more than 2 %: the medians of the same
    # package moved by up to ~1 % between runs, while single samples had 1.6x outliers.
    lines += ["", "Targets (issue 16; qexport's defaults):"]
    noise = 0.02
    judged = [r for r in ok if r["variant"] in DEFAULTS]
    for key, how in (("us", "per call"), ("replay_us", "graph replay")):
        slower = [f"{r['variant']} M={m} ({ratio(r, key, m):.2f}×)" for r in judged for m in MS if not ratio(r, key, m) >= 1 - noise]
        lines.append(f"- {how}, slower than bf16 by more than {noise:.0%}: {', '.join(slower) if slower else 'none'}")
    for v, goal in REPLAY_TARGETS_M1.items():
        r = next((r for r in judged if r["variant"] == v), None)
        if r is not None:
            got = ratio(r, "replay_us", 1)
            lines.append(f"- {v}, M=1 graph replay: {got:.2f}× bf16 (target ≥ {goal}×) {'met' if got >= goal else 'NOT met'}")
    r4 = next((r for r in judged if r["variant"] == "int4_weight_only g128"), None)
    ao4 = next((r for r in ok if r["variant"].startswith("torchao int4")), None)
    if r4 and ao4 and "replay_us_M1" in ao4 and "replay_us_M1" in r4:
        lines.append(f"- int4 g128 vs torchao int4, M=1 graph replay: {r4['replay_us_M1']:.1f} vs {ao4['replay_us_M1']:.1f} µs "
                     f"{'met' if r4['replay_us_M1'] <= ao4['replay_us_M1'] else 'NOT met'}")
    for r in judged:
        if r.get("floor_us_M1") and "replay_us_M1" in r:
            got = r["replay_us_M1"] / r["floor_us_M1"]
            lines.append(f"- {r['variant']}, M=1 replay ÷ floor: {got:.2f}× (target ≤ {FLOOR_TARGET}×) {'met' if got <= FLOOR_TARGET else 'NOT met'}")
    for v, goal in SIZE_TARGETS.items():
        r = next((r for r in judged if r["variant"] == v), None)
        if r is not None:
            size = r["bytes"] / bf["bytes"]
            gpu = r["gpu_bytes"] / bf["gpu_bytes"] if bf.get("gpu_bytes") and r.get("gpu_bytes") is not None else float("nan")
            lines.append(f"- {v}: package {size:.2f}×, GPU memory {gpu:.2f}× bf16 (target ≤ {goal}×) "
                         f"{'met' if size <= goal and gpu <= goal else 'NOT met'}")
    run = {"card": card(), "dim": dim, "bandwidth": bandwidth, "rows": rows}
    write_report(out, "cuda", lines, run)
    import plot_cuda

    plot_cuda.plot([run], os.path.join(out, "cuda_speedup.png"))


def write_report(out: str, stem: str, lines: list[str], data: dict) -> None:
    """Print the markdown and write it and the raw data as OUT/STEM.md and OUT/STEM.json."""
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(data, f, indent=1)


def spin_up(seconds: float = 1.0) -> None:
    """Busy the GPU before timing: after host-side compiling its clocks are down (first run: the
    first bf16 M=1 timing read 230 µs, the same package 78 µs at the end of the run)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def run_tune(out: str, dim: int, only: list[str]) -> None:
    """Tune every variant's plan as `qexport.compile` would (cuda_tune), and print what each probe
    measured: the candidates' times behind the chosen buckets. Fills the plan cache."""
    from qexport.lower.aoti import plan
    from qexport.lower.kernels import cuda_tune

    base = stack(dim, layers=1)
    example = torch.randn(16, dim, dtype=torch.bfloat16, device="cuda")
    dyn = ({0: torch.export.Dim("m", min=1, max=4096)},)
    lines = [f"Plans tuned on {card()}, one {dim}x{dim} layer; per probe the fastest candidates (µs).", ""]
    shown: set[str] = set()
    for label, name, params, options in VARIANTS:
        if only and label not in only:
            continue
        qm = qexport.quantize(copy.deepcopy(base), qexport.schemes.get(name, **params)).cuda()
        ep = qexport.export(qm, (example,), dynamic_shapes=dyn)
        t = time.perf_counter()
        region = plan(ep, device="cuda", options=options).regions[0]
        lines += [f"### {label}: {time.perf_counter() - t:.0f} s", "", f"{region.kernel}: {region.reason}", ""]
        for key in [k for k in cuda_tune._MEMORY if k not in shown]:  # the plans this variant tuned
            shown.add(key)
            for m, best in cuda_tune._MEMORY[key]["best_us"].items():
                lines.append(f"- M={m}: " + ", ".join(f"{k} {v}" for k, v in best.items()))
        lines.append("")
        print("\n".join(lines[-12:]), flush=True)
    write_report(out, "tune", lines, {"card": card(), "plans": cuda_tune._MEMORY})


def run_profile(out: str, dim: int, label: str, ms: list[int]) -> None:
    """Which kernels a variant's package runs, and for how long, at the given row counts."""
    from torch.profiler import ProfilerActivity, profile

    _, name, params, options = next(v for v in VARIANTS if v[0] == label)
    base = stack(dim)
    for static in (False, True):
        example = torch.randn(ms[-1] if static else 16, dim, dtype=torch.bfloat16, device="cuda")
        qm = qexport.quantize(copy.deepcopy(base), qexport.schemes.get(name, **params)).cuda()
        dyn = None if static else ({0: torch.export.Dim("m", min=1, max=4096)},)
        ep = qexport.export(qm, (example,), dynamic_shapes=dyn)
        path = os.path.join(scratch_dir("bench_cuda_profile."), "p.pt2")
        qexport.compile(ep, path, device="cuda", options=options)
        runner = qexport.load_compiled(path)
        for m in ([ms[-1]] if static else ms):
            x = torch.randn(m, dim, dtype=torch.bfloat16, device="cuda")
            spin_up(0.5)
            print(f"== {label} M={m} ({'static' if static else 'dynamic'} M): {bench(lambda: runner(x)):.1f} µs", flush=True)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    runner(x)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=90), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--only", default="", help="comma list of variant labels (debugging)")
    ap.add_argument("--hint", type=int, default=16, help="rows of the example input (Inductor's size hint)")
    ap.add_argument("--no-torchao", action="store_true", help="leave out torchao's rows (benchmarks/_torchao.py)")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds over all packages; figures are medians")
    ap.add_argument("--profile", default="", help="a variant label: list the kernels its package runs")
    ap.add_argument("--profile-m", default="256,4096")
    ap.add_argument("--tune", action="store_true", help="only tune the default variants' plans on this GPU and print them")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py needs a CUDA device")
    os.makedirs(args.out, exist_ok=True)
    if args.profile:
        run_profile(args.out, args.dim, args.profile, [int(m) for m in args.profile_m.split(",")])
    elif args.tune:
        run_tune(args.out, args.dim, [s for s in args.only.split(",") if s])
    else:
        run_table(args.out, args.dim, [s for s in args.only.split(",") if s], args.hint, not args.no_torchao, args.rounds)


if __name__ == "__main__":
    main()
