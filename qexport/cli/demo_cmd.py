"""`qexport demo [--out DIR]`: the built-in model through every stage, in one table.

quantize -> export -> save .pt2 -> write every lowered artifact kind (the kind table,
`serializers.kinds`: AOTInductor for CPU, the fp32 model too; ExecuTorch .pte; ONNX) -> verify every
artifact against the .pt2 and the fp32 model -> bench them all, each relative to the fp32 AOTI
package -> one table. `run_demo` is the library call (`qexport.demo.run_demo`); tests can call it too.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import time
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

import torch

from serializers import kinds

from ..errors import UsageError
from ..runtime import stage
from ..table import format_table
from ._common import Progress, build_model, fmt_bytes, fmt_err, fmt_seconds

#: every kind a backend lowers a .pt2 into, in the kind table's order
BACKENDS = tuple(k.name for k in kinds.lowered())
DEFAULT_MODEL = "qexport.models:TinyNet"
DEFAULT_SCHEME = "int8_dynamic"
#: the kind the fp32 baseline is also written as: every speed is relative to it
SPEED_BASELINE = "aoti"
#: how the demo writes a kind (progress line, writer options); a kind not listed gets its writer's defaults
_WRITE = {
    "aoti": ("compiling with AOTInductor for CPU (tens of seconds)", {"device": "cpu"}),
    "pte": ("lowering to ExecuTorch (XNNPACK)", {"backend": "xnnpack", "progress": False}),
    "onnx": ("lowering to ONNX", {}),
}


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
    from .. import schemes
    from ..runtime import bench, verify

    resolved = schemes.get(scheme)
    backends = _parse_backends(backends)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be a positive number of threads (or 0 for torch's default), got {threads}")
    if not bench_time_s >= 0:
        raise UsageError(f"--bench-time must be >= 0 seconds, got {bench_time_s}")
    save = stage("save")
    for b in backends:  # every stage a kind needs is checked before any work, so a missing backend fails first
        for name in kinds.get(b).stages():
            stage(name)
    out = Path(out_dir)
    created = _make_out_dir(out)
    paths = {k: out / kinds.get(k).file_name() for k in ("pt2", *backends)}
    fp32_path = out / kinds.get("pt2").file_name("model_fp32")
    speed_path = out / kinds.get(SPEED_BASELINE).file_name("model_fp32") if SPEED_BASELINE in backends else None
    progress = progress or Progress(total=_steps(backends))
    started = time.time_ns()
    try:
        with progress.step(f"quantizing {model} with {resolved.describe()}"):
            fp32 = build_model(model)
            shape = tuple(input_shape) if input_shape else _spec_shape(fp32)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g)
            from ..quantize import quantize

            calib = [(torch.randn(shape, generator=g),) for _ in range(8)] if resolved.activation == "static" else None
            qmodel = quantize(copy.deepcopy(fp32), resolved, calibration_data=calib)
        with progress.step("exporting the fp32 baseline and the quantized model"):
            from ..export import export

            fp32_ep = export(fp32, (x,))
            ep = export(qmodel, (x,))
        with progress.step(f"saving {paths['pt2']} (and the fp32 baseline)"):
            save(fp32_ep, fp32_path)
            save(ep, paths["pt2"])
        result = DemoResult(out, resolved, 0.0)
        for b in backends:
            kind = kinds.get(b)
            with progress.step(_WRITE.get(b, (f"writing {kind.what}",))[0]):
                written = _write(kind, paths["pt2"], paths[b])
            if hasattr(written, "regions"):  # a LoweringReport: the table's note says where the regions went
                result.reports[b] = written
            if b == SPEED_BASELINE:
                # The row every speed is measured against: is the quantized artifact faster than fp32 here?
                with progress.step(f"writing the fp32 baseline as {kind.what} too (the speed baseline)"):
                    _write(kind, fp32_path, speed_path)

        artifacts = [paths["pt2"]] + [paths[b] for b in backends]
        baselines = [fp32_path] + ([speed_path] if speed_path else [])
        with progress.step("verifying every artifact against the .pt2 (and the fp32 model)"):
            checks = {r.path: r for r in verify(paths["pt2"], artifacts + baselines, per_region=False, baseline=fp32_path)}
        with progress.step("benchmarking"):
            saved_threads = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)
            try:
                timings = {r.path: r for r in bench(artifacts + baselines, min_time_s=bench_time_s, min_iters=5)}
            finally:
                torch.set_num_threads(saved_threads)
        result.tolerance = next(iter(checks.values())).tolerance
        fp32_speed = timings[speed_path].median_s if speed_path else None
        for p in baselines + artifacts:
            c, t = checks[p], timings[p]
            fp32_row = p in baselines
            note = c.error or t.error or ""
            if p == fp32_path and not note:
                note = "baseline; its error vs the .pt2 is what quantization costs"
            elif p == speed_path and not note:
                note = "baseline for speed: the unquantized model, compiled the same way"
            elif not note and (rep := result.reports.get(c.kind)) is not None and rep.regions:
                note = f"{sum(r.delegated for r in rep.regions)}/{len(rep.regions)} regions on {rep.target} kernels"
            label = {fp32_path: "fp32 (eager)", speed_path: f"fp32 ({SPEED_BASELINE})"}.get(p, c.kind)
            speedup = fp32_speed / t.median_s if fp32_speed and t.median_s else None
            result.rows.append(DemoRow(p, label, p.stat().st_size, t.median_s, c.max_abs, c.rel,
                                       None if fp32_row else c.passed, note, speedup, c.rel_vs_baseline))
        return result
    except BaseException:
        # An error or Ctrl-C mid-way: no half demo (a .pt2 without its lowerings, or new files beside an older
        # run's). A failed verification is a result, not this: it returns, and its artifacts stay to inspect.
        for p in (*paths.values(), fp32_path, speed_path):
            if p is not None and p.is_file() and p.stat().st_mtime_ns >= started:
                p.unlink()
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if nothing else is in it
        raise


def _make_out_dir(out: Path) -> bool:
    """Create --out (with its parents) if needed and check it can be written; whether it was created."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create the directory: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the directory is not writable")
    return created


def _spec_shape(model: torch.nn.Module) -> tuple[int, ...]:
    spec = getattr(model, "example_input_spec", None)
    name = type(model).__name__
    if not isinstance(spec, str):
        has = "has no example_input_spec" if spec is None else f"has example_input_spec = {spec!r}, not a string"
        raise UsageError(f"{name} {has}, the input shape the demo feeds it: give the model one (example_input_spec = "
                         "'1x256', as qexport.models.TinyNet has), or from Python pass run_demo(..., input_shape=(1, 256))")
    from ._common import parse_input_spec

    parsed = parse_input_spec(spec, what=f"{name}.example_input_spec")
    if not parsed.dtype.is_floating_point:
        raise UsageError(f"the demo feeds float inputs; {type(model).__name__} takes {parsed.dtype}")
    return parsed.shape


def _steps(backends: Sequence[str]) -> int:
    """Progress steps: quantize, export, save, verify, bench, one per kind, the fp32 speed baseline."""
    return 5 + len(backends) + (SPEED_BASELINE in backends)


def _write(kind: kinds.ArtifactKind, src: Path, dest: Path) -> Any:
    """Write `src` (a .pt2) as `kind` at `dest` with the demo's options; the writer's return value."""
    options = _WRITE.get(kind.name, ("", {}))[1]
    return stage(kind.writer.split(":")[1])(src, dest, **options)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="quantize a built-in model, export it, lower it to every backend, verify and bench",
        description="Quantize a built-in model, export and save the .pt2, compile it with AOTInductor for "
        "CPU (and the unquantized model, the speed baseline), lower it to ExecuTorch (.pte, XNNPACK) and ONNX, "
        "verify every artifact against the .pt2 and the fp32 model and time them all, each relative to the fp32 AOTI package. Prints one table; leaves the artifacts in DIR. Exits 1 if any artifact fails "
        "verification.",
    )
    p.add_argument("--out", default="qexport-demo", metavar="DIR", help="where to leave the artifacts (default ./qexport-demo)")
    p.add_argument("--scheme", default=DEFAULT_SCHEME, help=f"scheme name (default {DEFAULT_SCHEME})")
    p.add_argument("--scheme-arg", action="append", default=[], metavar="KEY=VALUE", help="override a scheme parameter")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="TARGET",
                   help=f"model with float input (default {DEFAULT_MODEL}); its example_input_spec gives the shape")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help=f"comma-separated subset of {','.join(BACKENDS)} (default: all)")
    p.add_argument("--bench-time", type=float, default=0.5, metavar="SECONDS", help="timing per artifact (default 0.5)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads while timing, torch and onnxruntime (default 1; 0 = torch's default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..schemes import get
    from ._common import parse_scheme_args

    scheme = get(args.scheme, **parse_scheme_args(args.scheme, args.scheme_arg))
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    result = run_demo(args.out, scheme=scheme, model=args.model, backends=backends, bench_time_s=args.bench_time,
                      threads=args.threads or None,
                      progress=Progress(total=_steps(_parse_backends(backends))))
    print(result.table())
    return 0 if result.passed else 1
