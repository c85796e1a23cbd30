"""AOTInductor on CPU: fp32 vs qexport (every built-in scheme) vs torchao, in ONE run.

Model: a stack of 4 x Linear(4096, 4096) (bias on), inputs [M, 4096] with M dynamic; every variant is
one AOTI package, compiled here, loaded with aoti_load_package and timed at each batch (median of
repeated calls after warm-up). Ratios are fp32 AOTI latency / variant latency, measured in this run.
qexport schemes are compiled twice where a scheme kernel takes the regions: with the kernel table
("auto") and with every region left to Inductor's fusion ("inductor"), which is what upstream does.

    .venv/bin/python benchmarks/bench_aoti.py [--dim 4096] [--batches 1,32] [--json PATH] [--minilm]

Also (--minilm): compile time of all-MiniLM-L6-v2 quantized int8_weight_only (target < 120 s).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import qexport  # noqa: E402
from qexport.lower.aoti import plan  # noqa: E402

SCHEMES = [
    ("int8_weight_only", {}),
    ("int4_weight_only", {"group_size": 32}),
    ("int4_weight_only", {}),
    ("int8_dynamic", {}),
    ("int8_static", {}),
    ("fp8_e4m3", {}),
    ("nf4", {}),
]


def stack(dim: int, layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(dim, dim) for _ in range(layers))).eval()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


def compile_ep(ep, path: str, options=None) -> float:
    t = time.perf_counter()
    qexport.compile(ep, path, options=options)
    return time.perf_counter() - t


def aoti_plain(ep, path: str) -> float:
    t = time.perf_counter()
    torch._inductor.aoti_compile_and_package(ep, package_path=path)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--json", default=None)
    ap.add_argument("--minilm", action="store_true")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (default 1: on a shared box a 2-thread OpenMP barrier waits for a "
                    "descheduled thread, and that, not the kernel, decides the time)")
    ap.add_argument("--only", default="", help="comma list; run only variants whose name contains one of them")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    dim = args.dim
    tmp = tempfile.mkdtemp(prefix="bench_aoti.")
    base = stack(dim)
    example = torch.randn(2, dim)
    dyn = ({0: torch.export.Dim("m", min=1, max=4096)},)
    inputs = {b: torch.randn(b, dim) for b in batches}
    with torch.no_grad():
        ref = {b: base(x) for b, x in inputs.items()}
    rows: list[dict] = []

    built: list[tuple[dict, str, torch.dtype, object]] = []

    def measure(name: str, build) -> None:
        """Compile one variant now; it is timed later, interleaved with all the others."""
        if args.only and not any(k in name for k in args.only.split(",")):
            return
        path = os.path.join(tmp, f"v{len(rows)}.pt2")
        print(f"== {name}", flush=True)
        row: dict = {"variant": name}
        rows.append(row)
        try:
            compile_s, cast, eager = build(path)
            row.update(compile_s=round(compile_s, 1), bytes=os.path.getsize(path))
            built.append((row, path, cast, eager))
            print(f"   compiled in {compile_s:.1f} s, {os.path.getsize(path) / 1e6:.1f} MB", flush=True)
        except Exception as e:  # a variant that cannot be built is reported, not fatal
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"

    def time_all() -> None:
        """Median latency per (variant, batch). The dev box is shared, so variants are timed in
        interleaved rounds: a busy spell slows every variant a little instead of one a lot."""
        runners = []
        for row, path, cast, eager in built:
            runner = torch._inductor.aoti_load_package(path)
            runners.append((row, runner, cast))
            with torch.no_grad():
                for b, x in inputs.items():
                    y = runner(x.to(cast))
                    row[f"err_vs_fp32_b{b}"] = rel_err(y, ref[b])
                    if eager is not None:
                        row[f"err_vs_eager_b{b}"] = rel_err(y, eager(x.to(cast)))
        samples: dict = {}
        order = random.Random(0)
        with torch.no_grad():
            for _ in range(args.rounds):
                # a fresh order each round, so no variant always runs right after the fp32 one
                for row, runner, cast in order.sample(runners, len(runners)):
                    for b, x in inputs.items():
                        xi = x.to(cast)
                        runner(xi)
                        for _ in range(5 if b == 1 else 2):
                            t, c = time.perf_counter(), time.thread_time()
                            runner(xi)
                            c, t = time.thread_time() - c, time.perf_counter() - t
                            samples.setdefault((row["variant"], b), []).append((t, c))
        for row, _, _ in runners:
            for b in inputs:
                wall, cpu = zip(*samples[(row["variant"], b)])
                row[f"wall_ms_b{b}"] = statistics.median(wall) * 1e3
                # CPU time of the calling thread: with one intra-op thread the kernels run on it, and
                # time other processes take from the core is not counted.
                row[f"ms_b{b}"] = statistics.median(cpu) * 1e3 if args.threads == 1 else row[f"wall_ms_b{b}"]
            print("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    def fp32(path):
        ep = torch.export.export(base, (example,), dynamic_shapes=dyn)
        return aoti_plain(ep, path), torch.float32, None

    def bf16(path):
        m = copy.deepcopy(base).to(torch.bfloat16)
        ep = torch.export.export(m, (example.bfloat16(),), dynamic_shapes=dyn)
        return aoti_plain(ep, path), torch.bfloat16, None

    measure("fp32", fp32)
    measure("bf16", bf16)

    for scheme_name, params in SCHEMES:
        scheme = qexport.schemes.get(scheme_name, **params)
        kw = {"calibration_data": [example]} if scheme.activation == "static" else {}
        qm = qexport.quantize(copy.deepcopy(base), scheme, **kw)
        ep = qexport.export(qm, (example,), dynamic_shapes=dyn)
        label = scheme_name + (f" g{params['group_size']}" if "group_size" in params else (f" g{scheme.group_size}" if scheme.group_size else ""))
        planned = plan(ep)
        kernel = planned.regions[0].kernel
        measure(f"qexport {label} [{kernel}]", lambda p: (compile_ep(ep, p), torch.float32, qm))
        if kernel != "inductor":
            measure(f"qexport {label} [inductor fusion]", lambda p: (compile_ep(ep, p, {"qexport.kernels": "inductor"}), torch.float32, qm))

    # torchao: its CPU paths for the same formats, then AOTI (as its docs do: quantize_, export, compile).
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        for dtype in (torch.float32, torch.bfloat16):
            def ao_int8(path, dtype=dtype):
                m = copy.deepcopy(base).to(dtype)
                quantize_(m, Int8WeightOnlyConfig())
                ep = torch.export.export(m, (example.to(dtype),), dynamic_shapes=dyn)
                return aoti_plain(ep, path), dtype, None

            measure(f"torchao int8_weight_only {str(dtype).removeprefix('torch.')}", ao_int8)
    except ImportError as e:
        rows.append({"variant": "torchao int8_weight_only", "error": str(e)})
    try:
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_

        for gs in (32, 128):
            def ao_int4(path, gs=gs):
                m = copy.deepcopy(base).to(torch.bfloat16)
                quantize_(m, PrototypeInt4WeightOnlyConfig(group_size=gs))
                ep = torch.export.export(m, (example.bfloat16(),), dynamic_shapes=dyn)
                return aoti_plain(ep, path), torch.bfloat16, None

            measure(f"torchao int4_weight_only g{gs} bf16 (Int4OpaqueTensor)", ao_int4)
    except ImportError as e:
        rows.append({"variant": "torchao int4_weight_only", "error": str(e)})

    time_all()
    minilm = None
    if args.minilm:
        minilm = bench_minilm(tmp)

    fp = next((r for r in rows if r["variant"] == "fp32" and "error" not in r), None)
    print()
    what = "median thread CPU time" if args.threads == 1 else "median wall time"
    print(f"4 x Linear({dim}, {dim}), AOTInductor CPU, torch {torch.__version__}, {torch.get_num_threads()} thread(s), {what}")
    head = "| variant | compile s | size MB | " + " | ".join(f"M={b} ms | ×fp32 M={b} | wall M={b} ms" for b in batches) + " | rel err vs eager (M=1) |"
    print(head)
    print("|" + "---|" * (3 + 3 * len(batches) + 1))
    for r in rows:
        if "error" in r or "ms_b" + str(batches[0]) not in r:
            print(f"| {r['variant']} | failed: {r.get('error', '?')[:120]} |")
            continue
        cells = [r["variant"], f"{r['compile_s']:.0f}", f"{r['bytes'] / 1e6:.1f}"]
        for b in batches:
            cells.append(f"{r[f'ms_b{b}']:.2f}")
            cells.append(f"{fp[f'ms_b{b}'] / r[f'ms_b{b}']:.2f}×" if fp else "-")
            cells.append(f"{r[f'wall_ms_b{b}']:.2f}")
        e = r.get(f"err_vs_eager_b{batches[0]}")
        cells.append(f"{e:.1e}" if e is not None else "-")
        print("| " + " | ".join(cells) + " |")
    if minilm:
        print(f"\nall-MiniLM-L6-v2 int8_weight_only: compile {minilm['compile_s']:.1f} s, rel err vs eager {minilm['err']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "timing": what, "dim": dim, "rows": rows, "minilm": minilm}, f, indent=1)


def bench_minilm(tmp: str) -> dict:
    from _minilm import SENTENCES, load_model, load_tokenizer, tokenize

    model = load_model()
    tokens = tokenize(SENTENCES[:4], load_tokenizer())
    qm = qexport.quantize(model, "int8_weight_only", filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    seq = torch.export.Dim("seq", min=2, max=512)
    batch = torch.export.Dim("batch", min=1, max=64)
    dyn = {k: {0: batch, 1: seq} for k in tokens}
    ep = qexport.export(qm, (), dict(tokens), dynamic_shapes=dyn)
    path = os.path.join(tmp, "minilm.pt2")
    t = time.perf_counter()
    qexport.compile(ep, path)
    compile_s = time.perf_counter() - t
    runner = qexport.load_compiled(path)
    with torch.no_grad():
        ref = qm(**tokens).last_hidden_state
        out = runner(**tokens)
    out = out[0] if isinstance(out, (list, tuple)) else out
    out = getattr(out, "last_hidden_state", out)
    return {"compile_s": compile_s, "bytes": os.path.getsize(path), "err": rel_err(out, ref)}


if __name__ == "__main__":
    main()
