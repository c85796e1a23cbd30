"""Artifact sizes: qexport .pt2 files of all-MiniLM-L6-v2 against the same model's fp32 .pt2.

The fp32 baseline is `torch.export.save` of the unquantized model exported the same way
(`torch.export.export(model, (), kwargs=tokenizer output, strict=False)`); rows saved
without stack traces (qexport.save's default) are also compared with the fp32 program saved that way ("saved alike"). Each quantized variant is
written with `qexport.save`, loaded back with `qexport.load` (checked to give the eager quantized
model's output exactly) and read with `qexport.inspect`. Save / load times are medians of --repeat runs.

    .venv/bin/python benchmarks/bench_sizes.py [--repeat 3] [--json benchmarks/results/sizes.json]

Prints a markdown table (pasted into docs/benchmarks/sizes.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import zipfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import qexport  # noqa: E402
from _minilm import SENTENCES, load_model, load_tokenizer, tokenize  # noqa: E402
from _scratch import scratch_dir  # noqa: E402

# (scheme, params, quantize embeddings too, keep stack traces). The acceptance targets are
# int8_weight_only and int4_weight_only g32 with every supported layer quantized; the linear-only
# rows show what the float embedding tables alone cost.
VARIANTS: list[tuple[str, dict, bool, bool]] = [
    ("int8_weight_only", {}, True, False),
    ("int8_weight_only", {}, True, True),
    ("int8_weight_only", {}, False, False),
    ("int4_weight_only", {"group_size": 32}, True, False),
    ("int4_weight_only", {"group_size": 32}, True, True),
    ("int4_weight_only", {"group_size": 32}, False, False),
    ("int4_weight_only", {}, True, False),
    ("nf4", {}, True, False),
    ("fp8_e4m3", {}, True, False),
    ("int8_dynamic", {}, False, False),
]
TARGETS = {("int8_weight_only", 0): 0.27, ("int4_weight_only", 32): 0.16}


def linear_only(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear)


def archive_breakdown(path: str) -> dict[str, int]:
    """Bytes of the archive's members by kind: tensors, graph JSON, everything else."""
    out = {"tensors": 0, "graph": 0, "other": 0}
    with zipfile.ZipFile(path) as z:
        for i in z.infolist():
            name = i.filename.split("/", 1)[1]
            kind = "tensors" if name.startswith(("data/weights/weight_", "data/constants/tensor_")) else \
                "graph" if name.startswith("models/") else "other"
            out[kind] += i.file_size
    return out


def timed(fn, repeat: int) -> tuple[object, float]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times)


def last_hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="save/load repetitions (median reported)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tokens = tokenize(SENTENCES[:4], load_tokenizer())
    fp32 = load_model()
    tmp = scratch_dir("bench_sizes_")
    rows = []

    ep = torch.export.export(fp32, (), kwargs=tokens, strict=False)
    base: dict[bool, int] = {}
    for keep in (True, False):
        path = os.path.join(tmp, f"fp32_{keep}.pt2")
        save = (lambda: torch.export.save(ep, path)) if keep else (lambda: qexport.save(ep, path, keep_stack_traces=False))
        _, t_save = timed(save, args.repeat)
        _, t_load = timed(lambda: torch.export.load(path), args.repeat)
        base[keep] = os.path.getsize(path)
        rows.append({"variant": "fp32, torch.export.save" if keep else "fp32, qexport.save (no stack traces)",
                     "regions": 0, "file_bytes": base[keep], "ratio": base[keep] / base[True], "ratio_same": 1.0,
                     "keep_stack_traces": keep, **archive_breakdown(path), "save_s": t_save, "load_s": t_load})
        os.remove(path)
    print(f"fp32: {base[True] / 1e6:.2f} MB", file=sys.stderr)

    for name, params, with_embeddings, keep in VARIANTS:
        scheme = qexport.schemes.get(name, **params)
        model = qexport.quantize(copy.deepcopy(fp32), scheme, filter_fn=None if with_embeddings else linear_only)
        ep = qexport.export(model, (), kwargs=tokens)
        path = os.path.join(tmp, f"{name}.pt2")
        manifest, t_save = timed(lambda: qexport.save(ep, path, keep_stack_traces=keep), args.repeat)
        loaded, t_load = timed(lambda: qexport.load(path), args.repeat)
        with torch.no_grad():
            exact = torch.equal(last_hidden(loaded.module()(**tokens)), last_hidden(model(**tokens)))
        assert qexport.inspect(path) == manifest
        size = os.path.getsize(path)
        label = f"{scheme.describe()}{'' if with_embeddings else ', linear only'}{', keep_stack_traces=True' if keep else ''}"
        rows.append({
            "variant": label, "scheme": name, "params": params, "embeddings": with_embeddings, "keep_stack_traces": keep,
            "regions": len(manifest.regions), "file_bytes": size, "ratio": size / base[True],
            "ratio_same": size / base[keep], **archive_breakdown(path),
            "quantized_bytes": manifest.quantized_bytes, "float_bytes_replaced": manifest.float_bytes,
            "other_bytes": manifest.other_bytes, "save_s": t_save, "load_s": t_load, "load_exact": exact,
            "target": TARGETS.get((name, params.get("group_size", 0))) if with_embeddings else None,
        })
        print(f"{label}: {size / 1e6:.2f} MB ({size / base[True]:.4f}x), exact={exact}", file=sys.stderr)
        os.remove(path)

    machine = f"{platform.machine()} {os.cpu_count()}-core, torch {torch.__version__}"
    print(f"all-MiniLM-L6-v2 (22.7 M params), .pt2 sizes; {machine}; save/load medians of {args.repeat}\n")
    print("| variant | regions | file MB | × fp32 .pt2 | target | × fp32 saved alike | tensors MB | graph JSON MB | quantized / float replaced MB | save s | load s | load == eager |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        target = r.get("target")
        verdict = "" if target is None else f"≤ {target} {'met' if r['ratio'] <= target else 'MISSED'}"
        qf = f"{r['quantized_bytes'] / 1e6:.2f} / {r['float_bytes_replaced'] / 1e6:.2f}" if r["regions"] else "-"
        print(f"| {r['variant']} | {r['regions']} | {r['file_bytes'] / 1e6:.2f} | {r['ratio']:.4f} | {verdict} | {r['ratio_same']:.4f} | "
              f"{r['tensors'] / 1e6:.2f} | {r['graph'] / 1e6:.2f} | {qf} | {r['save_s']:.2f} | {r['load_s']:.2f} | "
              f"{'yes' if r.get('load_exact', True) else 'NO'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "repeat": args.repeat, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
