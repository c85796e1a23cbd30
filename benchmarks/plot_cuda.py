"""Plot the speed-up over bf16 AOTI of every variant in one or more runs of bench_cuda.py.

Each variant's ratio is taken against the bf16 package of its own run (same card, same process);
where a variant appears in several runs the last file given wins.

    python benchmarks/plot_cuda.py RUN1/cuda.json [RUN2/cuda.json ...] -o docs/benchmarks/cuda_speedup.png
"""

from __future__ import annotations

import argparse
import json


def plot(runs: list[dict], output: str) -> None:
    """One line per variant of `runs` (bench_cuda.py's cuda.json contents), its speed-up over the bf16
    package of its own run; a variant in several runs takes the last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios: dict[str, dict[int, float]] = {}
    card, dim = "", 4096
    for run in runs:
        card, dim = run["card"].split(" (")[0], run.get("dim", dim)
        bf = next(r for r in run["rows"] if r["variant"] == "bf16")
        ms = sorted(int(k[4:]) for k in bf if k.startswith("us_M"))
        for r in run["rows"]:
            if "error" in r or r["variant"].startswith("bf16"):
                continue
            ratios[r["variant"]] = {m: bf[f"us_M{m}"] / r[f"us_M{m}"] for m in ms}
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    for variant, by_m in ratios.items():
        ms = sorted(by_m)
        # solid: qexport's defaults; dashed: qexport with an option or Inductor's fusion; dotted: torchao
        ls = ":" if variant.startswith("torchao") else "--" if "[" in variant else "-"
        ax.plot(ms, [by_m[m] for m in ms], marker="o", label=variant, ls=ls)
    ax.axhline(1.0, color="k", lw=1, ls=":", label="bf16 AOTI")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.set_xlabel("M (rows of the activation); one package per variant serves every M")
    ax.set_ylabel("speed-up over bf16 AOTI (×)")
    ax.set_title(f"4 x Linear({dim}, {dim}), AOTInductor, {card}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    runs = []
    for path in args.runs:
        with open(path) as f:
            runs.append(json.load(f))
    plot(runs, args.output)


if __name__ == "__main__":
    main()
