"""`bench`: median latency and size of several artifacts, all on the same inputs, in one run."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from serializers.files import check_readable

from ..errors import ArtifactError, QExportError
from .loaders import first_line, load, pinned
from .runner import Flat, Runner, describe_inputs, input_mismatch, make_inputs


@dataclass
class BenchResult:
    path: Path
    kind: str
    size: int
    median_s: float | None = None
    p10_s: float | None = None
    p90_s: float | None = None
    iters: int = 0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def time_call(fn: Callable[[], Any], *, warmup: int = 3, min_iters: int = 10, min_time_s: float = 0.5,
              max_iters: int = 10_000) -> list[float]:
    """Per-call wall times (seconds): `warmup` untimed calls, then at least `min_iters` calls and
    at least `min_time_s` seconds."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench_inputs(runners: Sequence[Runner], seed: int = 0) -> Flat:
    """One input set for every runner: from the first runner that describes its inputs (put the
    .pt2 first: it knows which integer inputs are token ids)."""
    for r in runners:
        if r.inputs is not None:
            return make_inputs(r.inputs, seed)
    raise ArtifactError("none of the artifacts describes its inputs (an AOTI package compiled by another tool "
                        "does not, nor one whose manifest's input record is unreadable: qexport inspect says why); "
                        "add the .pt2 to the list or pass --input")


def bench(
    artifacts: Sequence["str | PathLike[str]"],
    *,
    inputs: Flat | None = None,
    seed: int = 0,
    warmup: int = 3,
    min_iters: int = 10,
    min_time_s: float = 0.5,
    on_artifact: Callable[[Path], Any] | None = None,
    expected_sha256: "Mapping[str | PathLike[str], str] | None" = None,
) -> list[BenchResult]:
    """Median latency and size of each artifact, all on the same inputs, in one run. An artifact
    that fails to load or run gets a result with `.error` set. `expected_sha256` maps paths to the
    SHA-256 each must have (see `load`)."""
    paths = [check_readable(a) for a in artifacts]
    runners: list[Runner | BenchResult] = []
    for p in paths:
        try:
            runners.append(load(p, expected_sha256=pinned(expected_sha256, p)))
        except QExportError as e:
            runners.append(BenchResult(p, "?", p.stat().st_size, error=str(e)))
    loaded = [r for r in runners if isinstance(r, Runner)]
    source, hint = "the inputs given", "give inputs it takes (qexport bench --input SHAPE[:DTYPE])"
    if inputs is None and loaded:  # none loaded: each result already says why
        inputs = bench_inputs(loaded, seed)
        source = f"the inputs made for {next(r.path for r in loaded if r.inputs is not None)}"
        hint = "is it made from another model? (bench one model's artifacts together)"
    results = []
    for r in runners:
        if isinstance(r, BenchResult):
            results.append(r)
            continue
        if on_artifact is not None:
            on_artifact(r.path)
        res = BenchResult(r.path, r.kind, r.size)
        try:
            if (why := input_mismatch(r, inputs)) is not None:
                raise ArtifactError(f"{why}; {source} are {describe_inputs(inputs)}: {hint}")
            times = time_call(lambda: r(inputs), warmup=warmup, min_iters=min_iters, min_time_s=min_time_s)
            q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
            res.median_s, res.p10_s, res.p90_s, res.iters = statistics.median(times), q[0], q[-1], len(times)
        except QExportError as e:
            res.error = str(e)
        except Exception as e:
            res.error = f"{type(e).__name__}: {first_line(e)}"
        results.append(res)
    return results


__all__ = ["BenchResult", "bench", "bench_inputs", "time_call"]
