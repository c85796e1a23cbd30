"""The demo pipeline: one built-in model through every stage, checked and timed.

quantize -> export -> save .pt2 -> compile (AOTInductor, CPU; the fp32 model too) -> ExecuTorch .pte
-> ONNX -> verify every artifact against the .pt2 and the fp32 model -> bench them all, each
relative to the fp32 AOTI package -> one table.
`qexport demo` calls `run_demo`; examples and tests can call it too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

import torch

from .cli._common import Progress, fmt_bytes, fmt_err, fmt_seconds, import_target
from .runners import stage
from .errors import UsageError

BACKENDS = ("aoti", "pte", "onnx")
DEFAULT_MODEL = "qexport.models:TinyNet"
DEFAULT_SCHEME = "int8_dynamic"
# Stages each backend needs, checked before any work so a missing backend fails loudly and first.
_NEEDS = {"aoti": ("compile", "load_compiled"), "pte": ("to_executorch",), "onnx": ("to_onnx",)}
_FILES = {"pt2": "model.pt2", "aoti": "model_aoti.pt2", "pte": "model.pte", "onnx": "model.onnx", "fp32": "model_fp32.pt2",
          "fp32_aoti": "model_fp32_aoti.pt2"}


@dataclass
class DemoRow:
    artifact: Path
    kind: str
    size: int
    latency_s: float | None
    max_abs: float | None
    rel: float | None
    passed: bool | None  # None: the fp32 baselines, which are not held to the scheme's tolerance
    note: str = ""
    #: fp32 AOTI latency / this row's latency (None without an fp32 AOTI package)
    speedup: float | None = None
    #: relative error against the unquantized model's outputs
    rel_vs_fp32: float | None = None


@dataclass
class DemoResult:
    out_dir: Path
    scheme: Any
    tolerance: float
    rows: list[DemoRow] = field(default_factory=list)
    reports: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(r.passed is not False for r in self.rows)

    def table(self) -> str:
        from .cli._table import format_table

        # Speed relative to the fp32 model compiled the same way (AOTI), not to eager fp32: a ratio
        # against eager would credit the compilers' overhead savings to quantization.
        rows = [
            [r.artifact.name, r.kind, fmt_bytes(r.size), fmt_seconds(r.latency_s), fmt_err(r.max_abs), fmt_err(r.rel),
             {True: "pass", False: "FAIL", None: "-"}[r.passed], f"{r.speedup:.2f}x" if r.speedup else "-",
             fmt_err(r.rel_vs_fp32), r.note]
            for r in self.rows
        ]
        head = format_table(["artifact", "kind", "size", "latency", "max abs err", "rel err", "verify", "vs fp32 AOTI",
                             "rel err vs fp32", "note"], rows)
        return (f"{head}\nscheme {self.scheme.describe()}, tolerance {self.tolerance:g} (relative to the .pt2's "
                f"max-abs output); artifacts in {self.out_dir}")


def _parse_backends(backends: Sequence[str]) -> tuple[str, ...]:
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise UsageError(f"unknown backend(s) {bad}; choose from {', '.join(BACKENDS)}")
    return tuple(b for b in BACKENDS if b in backends)


def run_demo(
    out_dir: "str | PathLike[str]" = "qexport-demo",
    *,
    scheme: Any = DEFAULT_SCHEME,
    model: str = DEFAULT_MODEL,
    input_shape: Sequence[int] | None = None,
    backends: Sequence[str] = BACKENDS,
    bench_time_s: float = 0.5,
    threads: int | None = 1,
    progress: Progress | None = None,
) -> DemoResult:
    """Run the whole pipeline on `model` (a TARGET string, default the built-in TinyNet) and return the
    table's rows. Artifacts are left in `out_dir` (created if needed).

    Timing uses `threads` intra-op threads for torch and onnxruntime (default 1: batch-1 latency of
    a small model, and numbers that stay readable on a shared machine); None keeps torch's default."""
    from . import schemes
    from .runners import bench, verify

    resolved = schemes.get(scheme)
    backends = _parse_backends(backends)
    save = stage("save")
    fns = {name: stage(name) for b in backends for name in _NEEDS[b]}
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / v for k, v in _FILES.items()}
    steps = 5 + len(backends) + ("aoti" in backends)
    progress = progress or Progress(total=steps)

    with progress.step(f"quantizing {model} with {resolved.describe()}"):
        factory = import_target(model)
        fp32 = factory() if not isinstance(factory, torch.nn.Module) else factory
        fp32.eval()
        shape = tuple(input_shape) if input_shape else _spec_shape(fp32)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g)
        from .quantize import quantize

        calib = [(torch.randn(shape, generator=g),) for _ in range(8)] if resolved.activation == "static" else None
        qmodel = quantize(copy.deepcopy(fp32), resolved, calibration_data=calib)
    with progress.step("exporting the fp32 baseline and the quantized model"):
        from .export import export

        fp32_ep = export(fp32, (x,))
        ep = export(qmodel, (x,))
    with progress.step(f"saving {paths['pt2']} (and the fp32 baseline)"):
        save(fp32_ep, paths["fp32"])
        save(ep, paths["pt2"])
    result = DemoResult(out, resolved, 0.0)
    if "aoti" in backends:
        with progress.step("compiling with AOTInductor for CPU (tens of seconds)"):
            fns["compile"](paths["pt2"], paths["aoti"], device="cpu")
        # The row every speed is measured against: is the quantized package faster than fp32 here?
        with progress.step("compiling the fp32 baseline with AOTInductor for CPU"):
            fns["compile"](paths["fp32"], paths["fp32_aoti"], device="cpu")
    if "pte" in backends:
        with progress.step("lowering to ExecuTorch (XNNPACK)"):
            result.reports["pte"] = fns["to_executorch"](paths["pt2"], paths["pte"], backend="xnnpack", progress=False)
    if "onnx" in backends:
        with progress.step("lowering to ONNX"):
            result.reports["onnx"] = fns["to_onnx"](paths["pt2"], paths["onnx"])

    artifacts = [paths["pt2"]] + [paths[b] for b in backends]
    baselines = [paths["fp32"]] + ([paths["fp32_aoti"]] if "aoti" in backends else [])
    with progress.step("verifying every artifact against the .pt2 (and the fp32 model)"):
        checks = {r.path: r for r in verify(paths["pt2"], artifacts + baselines, per_region=False, baseline=paths["fp32"])}
    with progress.step("benchmarking"):
        saved_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            timings = {r.path: r for r in bench(artifacts + baselines, min_time_s=bench_time_s, min_iters=5)}
        finally:
            torch.set_num_threads(saved_threads)
    result.tolerance = next(iter(checks.values())).tolerance
    fp32_aoti = timings[paths["fp32_aoti"]].median_s if "aoti" in backends else None
    for p in baselines + artifacts:
        c, t = checks[p], timings[p]
        fp32_row = p in baselines
        note = c.error or t.error or ""
        if p == paths["fp32"] and not note:
            note = "baseline; its error vs the .pt2 is what quantization costs"
        elif p == paths.get("fp32_aoti") and not note:
            note = "baseline for speed: the unquantized model, compiled the same way"
        elif p.suffix in (".pte", ".onnx") and not note:
            rep = result.reports.get(p.suffix[1:])
            if rep is not None and rep.regions:
                note = f"{sum(r.delegated for r in rep.regions)}/{len(rep.regions)} regions on {rep.target} kernels"
        kind = {paths["fp32"]: "fp32 (eager)", paths["fp32_aoti"]: "fp32 (aoti)"}.get(p, c.kind)
        speedup = fp32_aoti / t.median_s if fp32_aoti and t.median_s else None
        result.rows.append(DemoRow(p, kind, p.stat().st_size, t.median_s, c.max_abs, c.rel,
                                   None if fp32_row else c.passed, note, speedup, c.rel_vs_baseline))
    return result


def _spec_shape(model: torch.nn.Module) -> tuple[int, ...]:
    spec = getattr(model, "example_input_spec", None)
    if not isinstance(spec, str):
        raise UsageError(f"{type(model).__name__} has no example_input_spec; pass input_shape=(...) ")
    from .cli._common import parse_input_spec

    parsed = parse_input_spec(spec)
    if not parsed.dtype.is_floating_point:
        raise UsageError(f"the demo feeds float inputs; {type(model).__name__} takes {parsed.dtype}")
    return parsed.shape


__all__ = ["BACKENDS", "DemoResult", "DemoRow", "run_demo"]
