"""PNG plots for docs/benchmarks.md from the result files the benchmark scripts write.

    .venv/bin/python benchmarks/make_plots.py [--results benchmarks/results] [--out docs/img]

One plotter per result file; a result file that is missing, or written by an older version of its
script without the fields a plot needs, is reported and skipped (the other plots are still made).
Each plot names the machine recorded in its result file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # files only; no display on build machines
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _machine(data: dict[str, Any]) -> str:
    m = data.get("machine") or data.get("meta", {}).get("machine") or "unknown machine"
    return str(m)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _hbar(labels: list[str], values: list[float], title: str, xlabel: str, path: Path, ref: float | None = None,
          xlim: tuple[float, float] | None = None, fmt: str = "{:.3f}") -> None:
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.4))
    y = range(len(labels))
    ax.barh(list(y), values, color="#4472c4")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, " " + fmt.format(v), va="center", fontsize=8)
    if ref is not None:
        ax.axvline(ref, color="grey", linestyle="--", linewidth=1)
    if xlim:
        ax.set_xlim(*xlim)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def plot_numerics(data: dict[str, Any], out: Path) -> list[Path]:
    rows = data["rows"]
    labels = [f"{r['scheme']}" + (" [Linear only]" if r.get("modules") == "Linear only" else "") for r in rows]
    path = out / "numerics_minilm.png"
    lo = min(r["cos_min"] for r in rows)
    _hbar(labels, [r["cos_mean"] for r in rows], f"all-MiniLM-L6-v2: sentence-embedding cosine vs fp32 (mean)\n{_machine(data)}",
          "cosine similarity", path, ref=1.0, xlim=(min(0.9, lo - 0.01), 1.005), fmt="{:.4f}")
    return [path]


def plot_sizes(data: dict[str, Any], out: Path) -> list[Path]:
    rows = [r for r in data["rows"] if "ratio" in r]
    path = out / "sizes_minilm.png"
    _hbar([r["variant"] for r in rows], [r["ratio"] for r in rows],
          f"all-MiniLM-L6-v2 .pt2 size relative to fp32\n{_machine(data)}", "file size / fp32 file size", path, ref=1.0)
    return [path]


def plot_executorch(data: dict[str, Any], out: Path) -> list[Path]:
    cases = data["cases"]
    labels = [f"{c['model']} {c['scheme']}" for c in cases]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(cases) + 1.6))
    h = 0.27
    for k, (key, name, color) in enumerate((("fp32_us", "fp32 XNNPACK", "#a5a5a5"), ("pt2e_us", "PT2E + XNNPACK", "#ed7d31"),
                                            ("qexport_us", "qexport .pte", "#4472c4"))):
        ax.barh([i + (k - 1) * h for i in range(len(cases))], [c[key] for c in cases], height=h, label=name, color=color)
    ax.set_yticks(range(len(cases)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median latency (µs), lower is better")
    ax.set_title(f"ExecuTorch .pte latency, batch {data.get('batch', '?')}\n{_machine(data)}", fontsize=10)
    ax.legend(fontsize=8)
    path = out / "executorch_latency.png"
    _save(fig, path)
    return [path]


def plot_aoti(data: dict[str, Any], out: Path) -> list[Path]:
    rows = [r for r in data["rows"] if "error" not in r]
    batches = sorted({int(k[len("ms_b"):]) for r in rows for k in r if k.startswith("ms_b")})
    fp = next(r for r in rows if r["variant"] == "fp32")
    paths = []
    for b in batches:
        have = [r for r in rows if f"ms_b{b}" in r]
        path = out / f"aoti_speedup_b{b}.png"
        _hbar([r["variant"] for r in have], [fp[f"ms_b{b}"] / r[f"ms_b{b}"] for r in have],
              f"AOTInductor CPU, 4 x Linear({data.get('dim', '?')}), M={b}: speed vs fp32 AOTI\n{_machine(data)}",
              "× fp32 (higher is better)", path, ref=1.0, fmt="{:.2f}×")
        paths.append(path)
    return paths


def plot_onnx(data: dict[str, Any], out: Path) -> list[Path]:
    paths = []
    for model in sorted({r["model"] for r in data["rows"]}):
        rows = [r for r in data["rows"] if r["model"] == model and "ratio" in r]
        path = out / f"onnx_speedup_{model}.png"
        _hbar([r["variant"] for r in rows], [r["ratio"] for r in rows],
              f"onnxruntime, {model}: speed vs fp32 ONNX\n{_machine(data)}", "× fp32 (higher is better)", path, ref=1.0,
              fmt="{:.2f}×")
        paths.append(path)
    return paths


def plot_minilm(data: dict[str, Any], out: Path) -> list[Path]:
    rows = data["rows"]
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 1.2 * len(schemes) + 1.6))
    h = 0.8 / len(backends)
    colors = ("#a5a5a5", "#4472c4", "#ed7d31", "#70ad47", "#7030a0")
    for k, b in enumerate(backends):
        vals = [next((r["cos_mean"] for r in rows if r["scheme"] == s and r["backend"] == b), 0) for s in schemes]
        ax.barh([i + (k - (len(backends) - 1) / 2) * h for i in range(len(schemes))], vals, height=h, label=b,
                color=colors[k % len(colors)])
    ax.set_yticks(range(len(schemes)), [s.split("(")[0] for s in schemes], fontsize=8)
    ax.invert_yaxis()
    lo = min(r["cos_mean"] for r in rows)
    ax.set_xlim(max(0.0, lo - 0.02), 1.002)
    ax.set_xlabel("sentence-embedding cosine vs fp32 (mean), higher is better")
    ax.set_title(f"all-MiniLM-L6-v2 on every backend ({data.get('sentences', '?')} sentences)\n{_machine(data)}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    path = out / "minilm_backends.png"
    _save(fig, path)
    return [path]


def plot_serve(data: dict[str, Any], out: Path) -> list[Path]:
    """qexport serve: throughput vs concurrent clients, per (replicas, batching), from bench_serve.py."""
    rows = [r for r in data["rows"] if r.get("run") == "throughput"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for replicas in sorted({r["replicas"] for r in rows}):
        for max_batch in sorted({r["max_batch"] for r in rows}):
            pts = sorted((r["clients"], r["rps"]) for r in rows if r["replicas"] == replicas and r["max_batch"] == max_batch)
            label = f"{replicas} replica{'s' if replicas > 1 else ''}, " + ("no batching" if max_batch == 1 else f"max batch {max_batch}")
            ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", linestyle="-" if max_batch > 1 else "--", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("answered requests / s")
    ax.set_title(f"qexport serve, MLP {'-'.join(map(str, data.get('model', [])))} int8_dynamic\n{_machine(data)}", fontsize=9)
    ax.legend(fontsize=8)
    path = out / "serve_throughput.png"
    _save(fig, path)
    return [path]


def plot_llm(data: dict[str, Any], out: Path) -> list[Path]:
    """bench_llm.py: decode tokens/s and prefill speed of each artifact, relative to fp32 AOTI."""
    rows = data["rows"]
    meta = data["meta"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.8), sharey=True)
    labels = [r["variant"] for r in rows]
    for ax, key, title in ((axes[0], "decode_vs_fp32_aoti", "decode tokens/s"), (axes[1], "prefill_speedup_vs_fp32_aoti",
                                                                                 f"prefill ({meta['prompt']} tokens)")):
        values = [r[key] for r in rows]
        colors = ["#a5a5a5" if r["kind"] == "aoti" and "fp32" in r["variant"] else "#ed7d31" if r["kind"] == "peer"
                  else "#4472c4" for r in rows]
        ax.barh(range(len(rows)), values, color=colors)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}×", va="center", fontsize=8)
        ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(f"{title}: × fp32 AOTI (higher is better)", fontsize=9)
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"Llama {meta['params'] / 1e6:.0f} M, batch 1, {meta['threads']} thread, greedy: speed vs fp32 AOTI "
                 f"(ratios of one interleaved run)\n{_machine(data)}", fontsize=9)
    path = out / "llm_speed.png"
    _save(fig, path)
    return [path]


PLOTTERS: dict[str, Callable[[dict[str, Any], Path], list[Path]]] = {
    "serve.json": plot_serve,
    "minilm.json": plot_minilm,
    "numerics.json": plot_numerics,
    "sizes.json": plot_sizes,
    "executorch.json": plot_executorch,
    "aoti.json": plot_aoti,
    "onnx.json": plot_onnx,
    "llm.json": plot_llm,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="directory of result JSON files")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"), help="where the PNGs go")
    args = ap.parse_args(argv)
    results, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    made, skipped = [], []
    for name, plot in PLOTTERS.items():
        f = results / name
        if not f.is_file():
            skipped.append(f"{name}: no such result file")
            continue
        try:
            made += plot(json.loads(f.read_text()), out)
        except (KeyError, TypeError, ValueError, StopIteration) as e:
            skipped.append(f"{name}: does not have the fields this plot needs ({type(e).__name__}: {e})")
    for p in made:
        print(f"wrote {p}")
    for s in skipped:
        print(f"skipped {s}", file=sys.stderr)
    return 0 if made else 1


if __name__ == "__main__":
    sys.exit(main())
