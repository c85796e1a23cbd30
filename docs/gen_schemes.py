"""Generate docs/schemes.md (every built-in scheme, and what each backend makes of it) and the
compact support matrix in README.md.

The matrix is not written by hand: for each (scheme, op) a one-layer model is quantized and exported,
and every backend the contract knows (`qexport.lower.backends()`, one column each) plans the region
with `plan_regions`, the call the lowerings make, so the page cannot drift from the code. tests/test_examples.py fails when the
committed page differs from what this prints.

    .venv/bin/python docs/gen_schemes.py            # rewrite docs/schemes.md
    .venv/bin/python docs/gen_schemes.py --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from unittest import mock

import torch
from torch import nn

import qexport
from qexport.lower.cpu_target import CPUTarget
from qexport.lower.kernels import cpu as cpu_kernels
from qexport.regions import iter_region_nodes, read_region

DOC = Path(__file__).resolve().parent / "schemes.md"
OPS = ("linear", "conv2d", "embedding")
# One layer per op, with shapes every built-in's default parameters divide; batch 1.
LAYERS = {
    "linear": (lambda: nn.Linear(256, 256), lambda: torch.randn(1, 256)),
    "conv2d": (lambda: nn.Conv2d(16, 32, 3, padding=1), lambda: torch.randn(1, 16, 8, 8)),
    "embedding": (lambda: nn.Embedding(512, 256), lambda: torch.randint(0, 512, (1, 8))),
}


def _program(scheme: qexport.Scheme, op: str):
    make, example = LAYERS[op]
    torch.manual_seed(0)
    model = nn.Sequential(make()).eval()
    x = example()
    qexport.quantize(model, scheme, calibration_data=[(x,)] if scheme.activation == "static" else None)
    return qexport.export(model, (x,))


def _cell(ep, backend) -> str:
    """What `backend` makes of the program's one region: its kernel, bold when the backend takes it."""
    from qexport.lower import lowerings_for, plan_regions

    if backend.plans_anywhere:
        (p,) = plan_regions(ep, backend.name)
        return f"**{p.kernel}**" if p.taken else p.kernel
    # Plans made on the target hardware (CUDA tunes on the GPU): the candidates, in the order asked.
    (node,) = iter_region_nodes(ep)
    region = read_region(node, 0)
    fallback = backend.fallback(backend.context(ep, node, region, backend.name, {}), [], True).kernel
    names = [name for name, _ in lowerings_for(region, backend.name)]
    return ", ".join(f"**{n}**" for n in names) + f" (else {fallback})" if names else fallback


#: the CPU the AOTInductor CPU column is planned for, whichever machine runs this: the CPU plans differ
#: by ISA (docs/backends/aoti.md has both), and the page must not change with the machine that checks it
DOC_CPU = CPUTarget("x86_64", "AVX512", "native", ("avx2", "avx512_bf16", "avx512_f", "avx512_vnni"))


def _matrix() -> tuple[list[str], list[tuple[str, ...]]]:
    """Column titles, and (scheme, op, one cell per backend) rows, bold where a dedicated kernel runs."""
    from qexport.lower import backends

    columns = [b.title + (" (AVX-512 VNNI)" if b.name == "aoti-cpu" else "") + ("" if b.plans_anywhere else " (candidates)")
               for b in backends()]
    rows = []
    with mock.patch.object(cpu_kernels, "compile_target", lambda: DOC_CPU):
        for name in qexport.schemes.builtin_names():
            s = qexport.schemes.get(name)
            math = qexport.schemes.math_for(s)
            for op in OPS:
                if math.supports(s, op):
                    ep = _program(s, op)
                    rows.append((s.name, op, *(_cell(ep, b) for b in backends())))
    return columns, rows


README = DOC.parent.parent / "README.md"
README_BEGIN, README_END = "<!-- support-matrix:begin -->", "<!-- support-matrix:end -->"


def render_readme(readme: str, matrix: tuple[list[str], list[tuple[str, ...]]] | None = None) -> str:
    """README.md with its compact support matrix (between the markers) regenerated."""
    columns, rows = _matrix() if matrix is None else matrix
    cell = lambda c: "**kernel**" if c.startswith("**") else "fallback"  # noqa: E731
    table = [
        README_BEGIN,
        "| scheme | op | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
        *(f"| `{r[0]}` | {r[1]} | " + " | ".join(cell(c) for c in r[2:]) + " |" for r in rows),
        README_END,
    ]
    head, _, rest = readme.partition(README_BEGIN)
    _, _, tail = rest.partition(README_END)
    return head + "\n".join(table) + tail


def _bits_per_weight(scheme: qexport.Scheme) -> str:
    math = qexport.schemes.math_for(scheme)
    w = torch.randn(256, 256)
    t = math.quantize_weight(scheme, w)
    return f"{sum(v.nbytes for v in t.values()) * 8 / w.numel():.2f}"


def render(matrix: tuple[list[str], list[tuple[str, ...]]] | None = None) -> str:
    columns, rows = _matrix() if matrix is None else matrix
    schemes = [qexport.schemes.get(n) for n in qexport.schemes.builtin_names()]
    out = [
        "<!-- GENERATED by docs/gen_schemes.py from the scheme registry and the backend contract's registry; do not edit. -->",
        "# Schemes and what each backend does with them",
        "",
        "## Built-in schemes",
        "",
        "| scheme | family | weights | activations | compute | bits / weight | tolerance | ops |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in schemes:
        math = qexport.schemes.math_for(s)
        gran = f"per group of {s.group_size}" if s.granularity == "per_group" else s.granularity.replace("_", "-")
        act = "float" if s.activation == "none" else f"{s.activation} {s.act_granularity.replace('_', '-')} {s.act_dtype}"
        ops = ", ".join(o for o in OPS if math.supports(s, o))
        out.append(f"| `{s.name}` | {s.family} | {s.weight_dtype} {gran}, {'symmetric' if s.symmetric else 'asymmetric'} "
                   f"| {act} | {s.compute_dtype} | {_bits_per_weight(s)} | {math.tolerance:g} | {ops} |")
    out += [
        "",
        "*bits / weight* counts every stored tensor of a 256×256 weight (codes, scales, zero points, codebook);",
        "*tolerance* is the family's documented error bound of a backend against the reference math, relative",
        "to the output's max-abs (what `qexport verify` checks). Parameters are overridden with",
        "`qexport.schemes.get(name, group_size=64)` or `--scheme-arg group_size=64`.",
        "",
        "## Support matrix",
        "",
        "What each backend plans (`qexport.plan_regions`) for a one-layer model at batch 1 (a linear 256→256, a 3×3 conv",
        "16→32, an embedding 512×256). **Bold**: a dedicated kernel for the scheme; otherwise the region still",
        "runs, correctly, through the named fallback (`qexport compile` / `qexport partition` print the reason",
        "per region). The CUDA column lists the kernels the table tries, in order; which one runs depends on",
        "the number of rows and is decided at compile time on a GPU. Numerics of every cell are covered by the",
        "backends' own tests; a `.pt2` runs the reference math everywhere.",
        "",
        "| scheme | op | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    out += [f"| `{r[0]}` | " + " | ".join(r[1:]) + " |" for r in rows]
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate docs/schemes.md")
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/schemes.md is out of date")
    args = ap.parse_args(argv)
    matrix = _matrix()
    pages = {DOC: render(matrix), README: render_readme(README.read_text(), matrix)}
    stale = [p for p, text in pages.items() if (p.read_text() if p.exists() else "") != text]
    if args.check:
        for p in stale:
            print(f"{p} is out of date: run .venv/bin/python docs/gen_schemes.py", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        tmp = p.with_suffix(".md.tmp")
        tmp.write_text(pages[p])
        os.replace(tmp, p)
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
