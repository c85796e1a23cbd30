"""CPU decode with sibling regions fused (q/k/v and gate/up as one kernel each) vs apart
(`qexport.fuse_siblings="off"`): bench_llm's Llama (125 M parameters, 12 layers), int4_weight_only and
int8_dynamic_int4_weight AOTI CPU packages, one thread, 32 tokens after a 32-token prompt; rounds
interleaved and rotated, medians; the ratio fused / apart per scheme and whether the tokens agree.

    .venv/bin/python benchmarks/bench_llm_siblings.py [--rounds 5] [--work /tmp/bench_siblings] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_llm as B  # noqa: E402
import qexport  # noqa: E402
from qexport import runners  # noqa: E402
from qexport.generation import GenerationSpec, generate  # noqa: E402

SCHEMES = ("int4_weight_only", "int8_dynamic_int4_weight")
MODES = {"fused": None, "apart": {"qexport.fuse_siblings": "off"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", default="/tmp/bench_siblings")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = {}
    for scheme in SCHEMES:
        for mode, options in MODES.items():
            path = work / f"{scheme}_{mode}.pt2"
            if not path.exists():
                model = B.llama(12)
                qexport.quantize(model, B.scheme(scheme))
                t = time.perf_counter()
                qexport.compile(qexport.export_lm(model, max_cache_len=B.CACHE), path, options=options)
                print(f"{path.name}: compiled in {time.perf_counter() - t:.0f} s", flush=True)
            paths[(scheme, mode)] = path
    spec = GenerationSpec(max_cache_len=B.CACHE, vocab_size=32000)
    prompt = torch.randint(0, 32000, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    loaded = {key: runners.load(p) for key, p in paths.items()}
    tokens = {key: generate(r, prompt, 32, stop_at_eos=False, spec=spec).tokens for key, r in loaded.items()}
    samples = {key: [] for key in loaded}
    keys = list(loaded)
    for rnd in range(args.rounds):
        for key in keys[rnd % len(keys):] + keys[:rnd % len(keys)]:
            samples[key].append(generate(loaded[key], prompt, 32, stop_at_eos=False, spec=spec).decode_tokens_per_s)
    out = {"machine": f"CPU {torch.backends.cpu.get_cpu_capability()}, 1 thread", "rounds": args.rounds, "rows": []}
    for scheme in SCHEMES:
        fused, apart = (statistics.median(samples[(scheme, m)]) for m in MODES)
        row = {"scheme": scheme, "fused_tok_s": round(fused, 2), "apart_tok_s": round(apart, 2), "fused_vs_apart": round(fused / apart, 3),
               "same_tokens": sum(a == b for a, b in zip(tokens[(scheme, "fused")], tokens[(scheme, "apart")]))}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
