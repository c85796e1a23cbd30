"""all-MiniLM-L6-v2 (real weights, offline) quantized int8 and int4, exported once and run on every
backend; sentence embeddings compared with the fp32 model by cosine similarity.

    .venv/bin/python examples/minilm.py [--out DIR] [--schemes int8_dynamic,int4_weight_only]
                                        [--backends pt2,aoti,pte,onnx] [--sentences N] [--no-bench]
                                        [--json benchmarks/results/minilm.json]

For each scheme: quantize -> qexport.export(model, (), kwargs=tokens, strict=False) -> .pt2 ->
AOTInductor package / ExecuTorch .pte / ONNX; each artifact embeds the same sentences, and the table
shows its cosine similarity to the fp32 embeddings (mean and worst sentence), its agreement with the
quantized .pt2 (cosine, and max-abs error relative to the output range next to the scheme family's
tolerance or its own spread, as `qexport verify` judges), size and latency. The word-embedding table (47 MB of the 90 MB fp32 model) is quantized
by int4_weight_only but not by int8_dynamic, which quantizes Linear layers only.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qexport  # noqa: E402
from qexport import runners  # noqa: E402
from qexport.table import format_table  # noqa: E402
from serializers import kinds  # noqa: E402
from _minilm import SENTENCES, SentenceEncoder, cosine, load_model, load_tokenizer, tokenize  # noqa: E402

SCHEMES = {"int8_dynamic": {}, "int4_weight_only": {"group_size": 32}}
#: the .pt2 program and every kind a backend lowers it into, in the kind table's order
BACKENDS = ("pt2", *(k.name for k in kinds.lowered()))
#: how the example writes a kind (writer options); a kind not listed gets its writer's defaults
WRITE_OPTIONS = {"aoti": {"device": "cpu"}, "pte": {"backend": "xnnpack"}}
INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")  # SentenceEncoder.forward's order


def build_artifacts(encoder: torch.nn.Module, tokens: dict[str, torch.Tensor], scheme: Any, out: Path,
                    backends: tuple[str, ...], log=print) -> dict[str, Path]:
    """Quantize a copy of `encoder`, export it on `tokens` and write one artifact per backend."""
    model = qexport.quantize(copy.deepcopy(encoder), scheme)
    t0 = time.perf_counter()
    ep = qexport.export(model, (), kwargs=tokens, strict=False)
    log(f"  exported {len(qexport.regions(ep))} regions in {time.perf_counter() - t0:.1f} s")
    stem = f"minilm_{scheme.name}"
    paths = {"pt2": out / kinds.get("pt2").file_name(stem)}
    qexport.save(ep, paths["pt2"])
    for kind in kinds.lowered():
        if kind.name not in backends:
            continue
        p = out / kind.file_name(stem)
        t0 = time.perf_counter()
        runners.stage(kind.writer.split(":")[1])(paths["pt2"], p, **WRITE_OPTIONS.get(kind.name, {}))
        log(f"  {kind.name}: wrote {p.name} in {time.perf_counter() - t0:.1f} s")
        paths[kind.name] = p
    return paths


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="minilm-artifacts", help="directory for the artifacts")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated, from {', '.join(SCHEMES)}")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {','.join(BACKENDS)}")
    ap.add_argument("--sentences", type=int, default=len(SENTENCES),
                    help=f"how many of the {len(SENTENCES)} built-in sentences (default: all)")
    ap.add_argument("--no-bench", action="store_true", help="skip latency measurement")
    ap.add_argument("--json", default=None, help="also write the rows as JSON (benchmarks/make_plots.py reads it)")
    args = ap.parse_args(argv)
    schemes = [s for s in args.schemes.split(",") if s]
    backends = tuple(b for b in BACKENDS if b in args.backends.split(","))
    unknown = [s for s in schemes if s not in SCHEMES] + [b for b in args.backends.split(",") if b not in BACKENDS]
    if unknown:
        ap.error(f"unknown scheme/backend {unknown}")
    if not 1 <= args.sentences <= len(SENTENCES):  # 0 reached the tokenizer as an empty batch: an IndexError there
        ap.error(f"--sentences must be from 1 to {len(SENTENCES)}, got {args.sentences}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tok = load_tokenizer()
    encoder = SentenceEncoder(load_model()).eval()
    tokens = tokenize(SENTENCES[: args.sentences], tok)
    tokens = {k: tokens[k] for k in INPUT_NAMES}
    flat = [tokens[k] for k in INPUT_NAMES]
    with torch.no_grad():
        fp32 = encoder(**tokens)
    print(f"all-MiniLM-L6-v2: {len(flat[0])} sentences, padded to {flat[0].shape[1]} tokens")
    if not args.no_bench:
        with torch.no_grad():
            times = runners.time_call(lambda: encoder(**tokens), warmup=1, min_iters=3, min_time_s=0.5)
        print(f"fp32 eager (transformers): {sorted(times)[len(times) // 2] * 1e3:.1f} ms per batch")

    rows: list[dict[str, Any]] = []
    for name in schemes:
        scheme = qexport.schemes.get(name, **SCHEMES[name])
        print(f"{scheme.describe()}:")
        paths = build_artifacts(encoder, tokens, scheme, out, backends)
        ref = runners.load(paths["pt2"])
        expected = ref(flat)
        tol, _ = runners.tolerance_for(ref.program)
        # the bar `qexport verify` holds artifacts to: the tolerance, or the reference's own spread
        bar = max(tol, runners.SPREAD_FACTOR * (runners.reference_spread(ref.program, flat, expected) or 0.0))
        for b in backends:
            r = ref if b == "pt2" else runners.load(paths[b])
            got = r(flat)
            _, rel = runners.compare(expected, got)
            cos = cosine(got[0], fp32)
            agree = cosine(got[0], expected[0]).min().item()
            latency = None
            if not args.no_bench:
                times = runners.time_call(lambda: r(flat), warmup=1, min_iters=3, min_time_s=0.5)
                latency = sorted(times)[len(times) // 2]
            rows.append({"scheme": scheme.describe(), "backend": b, "artifact": paths[b].name, "bytes": paths[b].stat().st_size,
                         "cos_mean": cos.mean().item(), "cos_min": cos.min().item(), "rel_vs_pt2": rel, "tolerance": tol,
                         "cos_vs_pt2_min": agree, "bar": bar, "within_tolerance": rel <= bar, "latency_s": latency})

    from qexport.cli._common import fmt_bytes, fmt_seconds

    print(format_table(
        ["scheme", "backend", "artifact", "size", "cosine vs fp32 (mean)", "(worst)", "cosine vs .pt2 (worst)",
         "rel err vs .pt2 (bar)", "latency"],
        [[r["scheme"], r["backend"], r["artifact"], fmt_bytes(r["bytes"]), f"{r['cos_mean']:.5f}", f"{r['cos_min']:.5f}",
          f"{r['cos_vs_pt2_min']:.5f}", f"{r['rel_vs_pt2']:.2e} ({r['bar']:.2g}){'' if r['within_tolerance'] else ' over'}",
          fmt_seconds(r["latency_s"])] for r in rows]))
    print("bar: the scheme's tolerance, or twice the .pt2's own spread (its float64-GEMM run) where activations are "
          "rounded, as `qexport verify` judges; latency: the whole batch, median, torch's default threads; .pt2 runs the "
          "eager reference math")
    if args.json:
        import json
        import platform

        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"model": "all-MiniLM-L6-v2", "sentences": len(flat[0]), "torch": torch.__version__,
                       "machine": f"{platform.machine()} {os.cpu_count()} cores", "rows": rows}, f, indent=1)
        os.replace(tmp, args.json)
    return rows


if __name__ == "__main__":
    main()
