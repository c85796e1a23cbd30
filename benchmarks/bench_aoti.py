"""AOTInductor on CPU: every built-in scheme with a CPU kernel vs the fp32 AOTI package, per row count.

Models: 4 x Linear(2048, 2048) (bias on), input [M, 2048]; and all-MiniLM-L6-v2 (every Linear
quantized), input ids [1, M]. M is a dynamic dim, so one package per variant serves every M, with
the kernel table's row buckets (torch.cond) inside. Every package is compiled in this run, then
timed in interleaved rounds (variants in a fresh random order each round); the figure per (variant,
M) is the median CPU time of the calling thread per call (one intra-op thread: on a shared box the
thread's CPU time is what the kernels cost, wall time is what the neighbours cost), and the ratio is
fp32 AOTI / variant, both from this run.

    .venv/bin/python benchmarks/bench_aoti.py [--models linear,minilm] [--rows 1,16,128,512] [--json PATH]
    .venv/bin/python benchmarks/bench_aoti.py --emulate avx2 ...   # compile AND run with the ISA capped
    .venv/bin/python benchmarks/bench_aoti.py --kernels            # per-layer kernel sweep (the crossovers)
    .venv/bin/python benchmarks/bench_aoti.py --floor [--emulate avx2] # one row against the weight-bytes floor

`--emulate avx2` re-runs this script with ATEN_CPU_CAPABILITY=avx2 (torch's kernels, Inductor's vector
ISA and, through qexport's CPU target, -march=x86-64-v3), ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN) and
MKL_ENABLE_INSTRUCTIONS=AVX2 (MKL), i.e. an AVX2 machine without VNNI or AVX512-BF16 emulated by
capping the ISA of the host.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import traceback

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import qexport  # noqa: E402
from qexport.lower.cpu_target import compile_target  # noqa: E402
from _scratch import scratch_dir  # noqa: E402

SCHEMES = [
    ("int8_weight_only", {}),
    ("int4_weight_only", {"group_size": 32}),
    ("int8_dynamic", {}),
    ("int8_static", {}),
    ("fp8_e4m3", {}),
    ("int8_dynamic_int4_weight", {"group_size": 32}),
]
EMULATE = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def machine() -> dict:
    t = compile_target()
    flags = {f: f in t.requires for f in ("avx2", "avx512_f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")}
    return {"cpu": torch.cpu.get_capabilities().get("cpu_name", platform.processor()) if hasattr(torch.cpu, "get_capabilities") else platform.processor(),
            "capability": torch.backends.cpu.get_cpu_capability(), "target": t.describe(), "flags": flags,
            "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ},
            "torch": torch.__version__, "cores": os.cpu_count()}


def read_bandwidth_gbs(mb: int = 256, rounds: int = 5) -> float:
    """One thread's read bandwidth (GB/s): an fp32 sum over a buffer far larger than the caches, the
    bound a batch-1 GEMV approaches (the weight-bytes floor = weight bytes / this)."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(rounds):
        c = time.thread_time()
        x.sum()
        best = min(best, time.thread_time() - c)
    return x.nbytes / best / 1e9


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


class _ExactLinear(torch.overrides.TorchFunctionMode):
    """Every F.linear accumulated in float64 and rounded once to its dtype: the reference with
    another (better) fp32 GEMM. How far the eager model moves under it is its own spread: a
    quantized model that rounds activations at every layer (int8_static) turns one-ulp GEMM
    differences into whole quantization steps, so no package can be closer to "eager" than that."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear or func is torch._C._nn.linear:
            x, w, *rest = args
            b = rest[0] if rest else kwargs.get("bias")
            return torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double()).to(x.dtype)
        return func(*args, **kwargs)


# -- models ---------------------------------------------------------------------------------------

def linear_model(dim: int):
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(dim, dim) for _ in range(4))).eval()
    example = torch.randn(2, dim)
    dyn = ({0: torch.export.Dim("m", min=1, max=4096)},)
    calib = [(torch.randn(16, dim),) for _ in range(4)]
    make = lambda m: (torch.randn(m, dim, generator=torch.Generator().manual_seed(m)),)  # noqa: E731
    return model, (example,), {}, dyn, calib, make, None


def minilm_model(dim: int):
    from _minilm import CALIBRATION, load_model, load_tokenizer, tokenize

    model = load_model().eval()
    tok = load_tokenizer()
    example = tokenize(["a short example"], tok, max_length=8)
    example = {k: v[:, :8] for k, v in example.items()}
    seq = torch.export.Dim("seq", min=1, max=512)
    dyn = {k: {1: seq} for k in example}
    calib = [dict(tokenize([s], tok)) for s in CALIBRATION[:4]]

    def make(m: int):
        g = torch.Generator().manual_seed(m)
        ids = torch.randint(1000, 20000, (1, m), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}

    only_linear = lambda mod, fqn: isinstance(mod, nn.Linear)  # noqa: E731
    return model, (), dict(example), dyn, calib, make, only_linear


MODELS = {"linear": linear_model, "minilm": minilm_model}


def _out(y):
    y = y[0] if isinstance(y, (list, tuple)) else y
    return getattr(y, "last_hidden_state", y)


def bench_model(name: str, args, tmp: str) -> dict:
    model, ex_args, ex_kwargs, dyn, calib, make, filter_fn = MODELS[name](args.dim)
    variants: list[tuple[str, object, object]] = []  # (label, path, eager model)
    print(f"== {name}: compiling", flush=True)
    t = time.perf_counter()
    ep = torch.export.export(model, ex_args, ex_kwargs, dynamic_shapes=dyn, strict=False)
    path = qexport.compile(ep, os.path.join(tmp, f"{name}_fp32.pt2"))
    print(f"   fp32 {time.perf_counter() - t:.0f} s", flush=True)
    variants.append(("fp32", path, model))
    rows: dict[str, dict] = {}
    for scheme_name, params in SCHEMES:
        if args.schemes and scheme_name not in args.schemes:
            continue
        scheme = qexport.schemes.get(scheme_name, **params)
        label = scheme_name + (f" g{params['group_size']}" if "group_size" in params else "")
        try:
            kw = {"calibration_data": calib} if scheme.activation == "static" else {}
            qm = qexport.quantize(copy.deepcopy(model), scheme, filter_fn=filter_fn, **kw)
            qep = qexport.export(qm, ex_args, ex_kwargs, dynamic_shapes=dyn)
            t = time.perf_counter()
            path = qexport.compile(qep, os.path.join(tmp, f"{name}_{scheme_name}.pt2"))
            manifest = qexport.inspect(path)
            linear = next({"kernel": r.lowering.kernel, "reason": r.lowering.reason, **r.lowering.details}
                          for r in manifest.regions if r.lowering.details.get("plan"))
            rows[label] = {"compile_s": round(time.perf_counter() - t, 1), "bytes": os.path.getsize(path),
                           "kernel": linear["kernel"], "plan": linear["plan"], "isa": linear["isa"]}
            variants.append((label, path, qm))
            print(f"   {label}: {rows[label]['compile_s']:.0f} s, {linear['reason']}", flush=True)
        except Exception as e:  # a variant that cannot be built is reported, not fatal
            traceback.print_exc()
            rows[label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    rows["fp32"] = {"bytes": os.path.getsize(variants[0][1])}

    inputs = {m: make(m) for m in args.rows}
    runners = []
    with torch.no_grad():
        for label, path, eager in variants:
            runner = qexport.load_compiled(path)
            runners.append((label, runner))
            for m, x in inputs.items():
                a, k = (x, {}) if isinstance(x, tuple) else ((), x)
                ref = _out(eager(*a, **k))
                rows[label][f"err_vs_eager_M{m}"] = rel_err(_out(runner(*a, **k)), ref)
                with _ExactLinear():
                    rows[label][f"eager_spread_M{m}"] = rel_err(_out(eager(*a, **k)), ref)
    samples: dict = {}
    order = random.Random(0)
    with torch.no_grad():
        for _ in range(args.rounds):
            for label, runner in order.sample(runners, len(runners)):
                for m, x in inputs.items():
                    a, k = (x, {}) if isinstance(x, tuple) else ((), x)
                    runner(*a, **k)
                    for _ in range(args.calls if m <= 16 else 1):
                        c = time.thread_time()
                        runner(*a, **k)
                        samples.setdefault((label, m), []).append(time.thread_time() - c)
    for label, _ in runners:
        for m in args.rows:
            rows[label][f"ms_M{m}"] = statistics.median(samples[(label, m)]) * 1e3
    for label, r in rows.items():
        for m in args.rows:
            if f"ms_M{m}" in r:
                r[f"x_fp32_M{m}"] = rows["fp32"][f"ms_M{m}"] / r[f"ms_M{m}"]
    return rows


def table(name: str, rows: dict, ms: list[int]) -> str:
    out = [f"| {name} | MB | " + " | ".join(f"M={m} ms (×fp32)" for m in ms) + " | err vs eager (worst M) | eager's spread | kernel per rows |",
           "|---|---|" + "---|" * len(ms) + "---|---|---|"]
    for label, r in rows.items():
        if "error" in r:
            out.append(f"| {label} | failed: {r['error'][:100]} |")
            continue
        cells = [f"{r[f'ms_M{m}']:.2f} ({r[f'x_fp32_M{m}']:.2f}×)" for m in ms]
        errs = [r.get(f"err_vs_eager_M{m}", 0.0) for m in ms]
        spread = max(r.get(f"eager_spread_M{m}", 0.0) for m in ms)
        plan = "; ".join(f"{'≤' + str(b['max_m']) if b['max_m'] else 'rest'}: {b['kernel']}" for b in r.get("plan", [])) or "fp32 GEMM"
        out.append(f"| {label} | {r['bytes'] / 1e6:.1f} | " + " | ".join(cells) + f" | {max(errs):.1e} | {spread:.1e} | {plan} |")
    return "\n".join(out)


# -- the per-layer sweep the plans' crossovers come from ------------------------------------------

def kernel_sweep(dim: int, rows: list[int], rounds: int) -> None:
    """Eager per-layer timings of every CPU candidate kernel, ratios to the fp32 GEMM."""
    import torch.nn.functional as F

    aten = torch.ops.aten
    torch.manual_seed(0)
    w, b = torch.randn(dim, dim), torch.randn(dim)
    s = w.abs().amax(1) / 127
    w8 = torch.clamp(torch.round(w / s[:, None]), -127, 127).to(torch.int8)
    wdq, w16, s16 = w8.float() * s[:, None], w.bfloat16(), s.bfloat16()
    gs = 32
    wg = w.reshape(dim, dim // gs, gs)
    sc = ((wg.amax(-1) - wg.amin(-1)) / 15).clamp(min=1e-6)
    zp = torch.round(-wg.amin(-1) / sc).clamp(0, 15)
    codes = torch.clamp(torch.round(wg / sc[..., None]) + zp[..., None], 0, 15).to(torch.int32).reshape(dim, dim)
    packed = aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = torch.stack([sc, (8 - zp) * sc], -1).transpose(0, 1).contiguous().bfloat16()
    cs = w8.to(torch.int32).sum(1)
    from qexport.lower.kernels import cpu as cpu_kernels

    torch._inductor.config.cpp.march = compile_target().march  # the C++ of the target's ISA class, as packages get
    words = cpu_kernels._int4_words(codes, sc, zp, gs)
    int4_loop = torch.compile(cpu_kernels._int4_loop, dynamic=False)
    int8_loop = torch.compile(cpu_kernels._int8_loop, dynamic=False)
    ones = torch.ones(dim, dtype=torch.bfloat16)

    def dyn_q(x):
        from qexport.schemes import activation as act

        sx, z = act.dynamic_int8_qparams(x, True)
        return act.quantize_int8(x, sx, z), sx, z

    cands = {
        "fp32 GEMM": lambda x: F.linear(x, w, b),
        "bf16 GEMM": lambda x: F.linear(x.bfloat16(), w16).float() + b,
        "int8pack (bf16 act)": lambda x: aten._weight_int8pack_mm(x.bfloat16(), w8, s16).float() + b,
        "int4pack g32": lambda x: aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, gs, sz).float() + b,
        "int4 loop g32 (Inductor, M=1 only)": lambda x: int4_loop(x.bfloat16().float(), *words) + b,
        "int8 loop (Inductor, M=1 only)": lambda x: int8_loop(x.bfloat16().float(), w8, s) + b,
        "dequant int8 + fp32 GEMM": lambda x: F.linear(x, w8.float() * s[:, None], b),
        "dequant int8 + bf16 GEMM": lambda x: F.linear(x.bfloat16(), w8.bfloat16() * s16[:, None]).float() + b,
        "int_mm (dyn int8 act)": lambda x: (lambda q, sx, z: (aten._int_mm(q.to(torch.int8), w8.t()) - z.to(torch.int32) * cs).float() * (sx * s) + b)(*dyn_q(x)),
        "int8 codes into int8pack": lambda x: (lambda q, sx, z: aten._weight_int8pack_mm((q - z).bfloat16(), w8, ones).float() * (sx * s) + b)(*dyn_q(x)),
        "dyn int8 act + fp32 weights": lambda x: (lambda q, sx, z: F.linear((q - z) * sx, wdq, b))(*dyn_q(x)),
    }
    xs = {m: torch.randn(m, dim) for m in rows}
    res: dict = {}
    with torch.no_grad():
        for _ in range(rounds):
            for name, f in cands.items():
                for m in rows:
                    if "M=1 only" in name and m != 1:
                        continue
                    f(xs[m])
                    for _ in range(6 if m <= 16 else 2):
                        c = time.thread_time()
                        f(xs[m])
                        res.setdefault((name, m), []).append(time.thread_time() - c)
    print(json.dumps(machine()))
    print(f"one {dim}x{dim} layer, eager, 1 thread, median ms (×fp32)")
    print("| kernel | " + " | ".join(f"M={m}" for m in rows) + " |\n|---|" + "---|" * len(rows))
    for name in cands:
        cells = []
        for m in rows:
            if (name, m) not in res:
                cells.append("–")
                continue
            t, fp = statistics.median(res[(name, m)]), statistics.median(res[("fp32 GEMM", m)])
            cells.append(f"{t * 1e3:.3f} ({fp / t:.2f}×)")
        print(f"| {name} | " + " | ".join(cells) + " |")


# -- one row against the weight-bytes floor --------------------------------------------------------

FLOOR_SCHEMES = [("fp32", None, {}), ("int8_weight_only", "int8_weight_only", {}),
                 ("int4 g32", "int4_weight_only", {"group_size": 32}), ("int4 g128", "int4_weight_only", {"group_size": 128})]


def floor_run(dim: int, layers: int, rounds: int, tmp: str) -> dict:
    """Packages of `layers` x Linear(dim) at M = 1 against weight bytes / read bandwidth.

    Why a deep stack: one 4096^2 int4 layer (8.4 MB) sits in a server CPU's L3, and timing it alone
    measures the cache, not memory; `layers` distinct weights stream from DRAM on every call. Each
    package is timed with one thread (thread CPU time) and with every core (wall time, as a user runs
    it), interleaved with the read-bandwidth probe at the same thread count; floor = the scheme's code
    bytes per layer (4, 1 or 0.5 B per weight; scales not counted, as the goal states) / that bandwidth.
    """
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(dim, dim, bias=False) for _ in range(layers))).eval()
    example = torch.randn(1, dim)
    ep = torch.export.export(model, (example,), strict=False)
    runners, info = {}, {}
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)  # Inductor's C++ takes its thread count at compile time: compiled on one, a package never splits
    for label, scheme, params in FLOOR_SCHEMES:
        t = time.perf_counter()
        if scheme is None:
            path = qexport.compile(ep, os.path.join(tmp, "floor_fp32.pt2"))
        else:
            qm = qexport.quantize(copy.deepcopy(model), qexport.schemes.get(scheme, **params))
            path = qexport.compile(qexport.export(qm, (example,)), os.path.join(tmp, f"floor_{label.replace(' ', '_')}.pt2"))
        runners[label] = qexport.load_compiled(path)
        info[label] = {"bytes": os.path.getsize(path), "compile_s": round(time.perf_counter() - t, 1),
                       "code_bytes_per_weight": {"fp32": 4, "int8_weight_only": 1}.get(label, 0.5)}
        print(f"   {label}: {info[label]['compile_s']:.0f} s, {info[label]['bytes'] / 1e6:.1f} MB", flush=True)
    buf = torch.ones(512 * 2**20 // 4)
    samples: dict = {}
    order = random.Random(0)
    with torch.no_grad():
        for _ in range(rounds):
            for threads in sorted({1, cores}):
                torch.set_num_threads(threads)
                clock = time.thread_time if threads == 1 else time.perf_counter
                for label in order.sample(list(runners) + ["read"], len(runners) + 1):
                    f = (lambda: buf.sum()) if label == "read" else (lambda r=runners[label]: r(example))
                    f()
                    for _ in range(1 if label == "read" else 3):
                        c = clock()
                        f()
                        samples.setdefault((label, threads), []).append(clock() - c)
    torch.set_num_threads(1)
    out = {"dim": dim, "layers": layers, "rounds": rounds, "packages": info, "threads": {}}
    for threads in sorted({1, cores}):
        gbs = buf.nbytes / statistics.median(samples[("read", threads)]) / 1e9
        row = {"read_GBs": round(gbs, 1)}
        for label in runners:
            ms = statistics.median(samples[(label, threads)]) * 1e3 / layers
            floor = dim * dim * info[label]["code_bytes_per_weight"] / (gbs * 1e9) * 1e3
            row[label] = {"ms_per_layer": round(ms, 3), "floor_ms": round(floor, 3), "x_floor": round(ms / floor, 2)}
        for label in runners:
            row[label]["x_fp32"] = round(row["fp32"]["ms_per_layer"] / row[label]["ms_per_layer"], 2)
        out["threads"][threads] = row
    return out


def floor_table(res: dict) -> str:
    out = [f"{res['layers']} × Linear({res['dim']}), M = 1, per layer: median ms (× codes floor, × fp32)",
           "| threads | read GB/s | " + " | ".join(l for l, *_ in FLOOR_SCHEMES) + " |", "|---|---|" + "---|" * len(FLOOR_SCHEMES)]
    for threads, row in res["threads"].items():
        cells = [f"{row[l]['ms_per_layer']:.3f} ({row[l]['x_floor']:.2f}×, {row[l]['x_fp32']:.2f}×)" for l, *_ in FLOOR_SCHEMES]
        out.append(f"| {threads} | {row['read_GBs']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="linear,minilm")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--schemes", default="", help="comma-separated subset of the built-in schemes (default: all)")
    ap.add_argument("--rows", default="1,16,128,512")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=3, help="timed calls per round at M <= 16 (one above)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--emulate", choices=sorted(EMULATE), default=None,
                    help="re-run with the host's ISA capped (compile and run)")
    ap.add_argument("--kernels", action="store_true", help="per-layer kernel sweep instead of the packages")
    ap.add_argument("--floor", action="store_true", help="M = 1 against the weight-bytes floor (deep Linear(4096) stack)")
    ap.add_argument("--layers", type=int, default=8, help="--floor: layers in the stack (their codes must exceed the L3)")
    args = ap.parse_args()
    if args.emulate and not all(os.environ.get(k) == v for k, v in EMULATE[args.emulate].items()):
        env = {**os.environ, **EMULATE[args.emulate]}
        sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))
    torch.set_num_threads(1)
    args.rows = [int(m) for m in args.rows.split(",")]
    args.schemes = [s for s in args.schemes.split(",") if s]
    if args.kernels:
        kernel_sweep(args.dim, args.rows, args.rounds)
        return
    info = machine()
    tmp = scratch_dir("bench_aoti.")
    if args.floor:
        print(json.dumps(info), flush=True)
        res = floor_run(4096 if args.dim == 2048 else args.dim, args.layers, args.rounds, tmp)
        print(floor_table(res), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": info, **res}, f, indent=1)
        return
    info["read_gbs_1_thread"] = round(read_bandwidth_gbs(), 1)
    print(json.dumps(info), flush=True)
    results = {}
    for name in args.models.split(","):
        results[name] = bench_model(name, args, tmp)
        print()
        print(table({"linear": f"4 × Linear({args.dim})", "minilm": "all-MiniLM-L6-v2 [1, M]"}[name], results[name], args.rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows_M": args.rows, "rounds": args.rounds, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
