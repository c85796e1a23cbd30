"""Eager numerics of every built-in scheme vs fp32 on a real model: all-MiniLM-L6-v2.

For each scheme: quantize a copy of the fp32 model (int8_static calibrated on sentences that are not
evaluated), embed the evaluation sentences, and compare with the fp32 embeddings (cosine similarity
per sentence, and whether each sentence's nearest neighbour among the others is unchanged).

    .venv/bin/python benchmarks/bench_numerics.py [--json benchmarks/results/numerics.json]

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

import qexport  # noqa: E402
from _minilm import CALIBRATION, SENTENCES, cosine, load_model, load_tokenizer, mean_pool, tokenize  # noqa: E402

# Built-in defaults, plus the int4 group size the size targets use, plus int4 / nf4 with the word
# embeddings left in float (to show how much of their error the 30522x384 embedding table causes).
VARIANTS: list[tuple[str, dict, bool]] = [(n, {}, False) for n in qexport.schemes.builtin_names()] + [
    ("int4_weight_only", {"group_size": 32}, False),
    ("int4_weight_only", {}, True),
    ("nf4", {}, True),
]


def linear_only(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear)


def embed(model: torch.nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return mean_pool(model(**tokens).last_hidden_state, tokens["attention_mask"])


def nearest_neighbours(e: torch.Tensor) -> torch.Tensor:
    sim = e @ e.T
    sim.fill_diagonal_(-2)
    return sim.argmax(1)


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of quantized tensors, float bytes they replaced) over the model's quantized modules."""
    from qexport.quantize import quantized_modules

    mods = [m for _, m in quantized_modules(model)]
    return sum(m.quantized_bytes() for m in mods), sum(m.float_bytes() for m in mods)


def quality(model: torch.nn.Module, tokens: dict[str, torch.Tensor], ref: torch.Tensor, ref_nn: torch.Tensor,
            quantize_s: float) -> dict[str, float]:
    """What every MiniLM quality row reports: sentence cosine vs fp32, nearest-neighbour agreement,
    the largest embedding change, the weight-bytes ratio."""
    e = embed(model, tokens)
    cos = cosine(e, ref)
    qb, fb = weight_bytes(model)
    return {"cos_mean": cos.mean().item(), "cos_min": cos.min().item(),
            "nn_agree": (nearest_neighbours(e) == ref_nn).float().mean().item(),
            "max_abs": (e - ref).abs().max().item(), "weight_ratio": qb / fb, "quantize_s": quantize_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = load_tokenizer()
    fp32 = load_model()
    tokens = tokenize(SENTENCES, tok)
    calib = [tokenize(CALIBRATION[i : i + 4], tok) for i in range(0, len(CALIBRATION), 4)]
    ref = embed(fp32, tokens)
    ref_nn = nearest_neighbours(ref)
    rows = []
    for name, params, lin_only in VARIANTS:
        scheme = qexport.schemes.get(name, **params)
        model = copy.deepcopy(fp32)
        t0 = time.perf_counter()
        qexport.quantize(model, scheme, filter_fn=linear_only if lin_only else None,
                         calibration_data=calib if scheme.activation == "static" else None)
        t_quant = time.perf_counter() - t0
        rows.append({"scheme": scheme.describe(), "name": name, "params": params,
                     "modules": "Linear only" if lin_only else "all supported",
                     **quality(model, tokens, ref, ref_nn, t_quant)})
        print(f"{name} {params}: cos mean {rows[-1]['cos_mean']:.5f}", file=sys.stderr)
    print(f"all-MiniLM-L6-v2, {len(SENTENCES)} sentences (padded batch {tuple(tokens['input_ids'].shape)}), "
          f"torch {torch.__version__}, {platform.machine()} {os.cpu_count()} cores\n")
    print("| scheme | quantized modules | cosine mean | cosine min | nearest-neighbour agreement | max abs Δ (unit-norm emb.) | quantized / float weight bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['scheme']}` | {r['modules']} | {r['cos_mean']:.5f} | {r['cos_min']:.5f} | {r['nn_agree'] * 100:.0f} % | "
              f"{r['max_abs']:.4f} | {r['weight_ratio']:.3f} |")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"model": "all-MiniLM-L6-v2", "sentences": len(SENTENCES), "torch": torch.__version__,
                       "machine": "2-core x86 AVX-512 CPU (dev box)", "rows": rows}, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
