"""int4 quality by weight algorithm (rtn, hqq, gptq) on all-MiniLM-L6-v2, eager, vs fp32.

For int4_weight_only (every layer it takes, the 30522x384 word embeddings included) and
int8_dynamic_int4_weight (the Linear layers) at each group size: quantize a copy of the fp32 model with
each algorithm (gptq calibrated on the CALIBRATION sentences, which are not evaluated), embed the
evaluation sentences and compare with fp32 (per-sentence cosine, nearest-neighbour agreement), as
bench_numerics.py does.

    .venv/bin/python benchmarks/bench_int4_quality.py [--json benchmarks/results/int4_quality.json]

Prints a markdown table (pasted into docs/numerics.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qexport  # noqa: E402
from _minilm import CALIBRATION, SENTENCES, load_model, load_tokenizer, tokenize  # noqa: E402
from bench_numerics import embed, nearest_neighbours, quality  # noqa: E402
from qexport.quantize import quantized_modules  # noqa: E402

ALGORITHMS = ("rtn", "hqq", "gptq")
VARIANTS = [("int4_weight_only", 32), ("int4_weight_only", 128), ("int8_dynamic_int4_weight", 32),
            ("int8_dynamic_int4_weight", 128)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--only", default=None, help="run only schemes whose name contains this")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = load_tokenizer()
    fp32 = load_model()
    tokens = tokenize(SENTENCES, tok)
    calib = [tokenize(CALIBRATION[i : i + 4], tok) for i in range(0, len(CALIBRATION), 4)]
    ref = embed(fp32, tokens)
    ref_nn = nearest_neighbours(ref)
    rows = []
    for name, group in VARIANTS:
        if args.only and args.only not in name:
            continue
        for algorithm in ALGORITHMS:
            model = copy.deepcopy(fp32)
            t0 = time.perf_counter()
            qexport.quantize(model, qexport.schemes.get(name, group_size=group), algorithm=algorithm,
                             calibration_data=calib if algorithm == "gptq" else None)
            t_quant = time.perf_counter() - t0
            algs = sorted({m.scheme.algorithm for _, m in quantized_modules(model)})
            rows.append({
                "scheme": name, "group_size": group, "algorithm": algorithm, "region_algorithms": algs,
                "modules": "all supported" if name == "int4_weight_only" else "Linear (embeddings take no activation scheme)",
                **quality(model, tokens, ref, ref_nn, t_quant),
            })
            print(f"{name} g{group} {algorithm}: cos mean {rows[-1]['cos_mean']:.5f} ({t_quant:.0f} s)", file=sys.stderr)
    print(f"all-MiniLM-L6-v2, {len(SENTENCES)} sentences, gptq calibrated on {len(CALIBRATION)} others; "
          f"torch {torch.__version__}, {platform.machine()} {os.cpu_count()} cores\n")
    print("| scheme | group | algorithm | cosine mean | cosine min | nearest-neighbour agreement | max abs Δ | quantize time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['scheme']}` | {r['group_size']} | {r['algorithm']} | {r['cos_mean']:.5f} | {r['cos_min']:.5f} | "
              f"{r['nn_agree'] * 100:.0f} % | {r['max_abs']:.4f} | {r['quantize_s']:.1f} |")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"model": "all-MiniLM-L6-v2", "sentences": len(SENTENCES), "calibration_sentences": len(CALIBRATION),
                       "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                       "machine": "2-core x86 AVX-512 CPU (dev box, shared: quantize times are indicative)",
                       "rows": rows}, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
