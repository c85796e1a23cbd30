"""Row-bucket plans tuned on the GPU that compiles the package.

A family's plan (kernels/cuda.py: `[(max_rows, kernel), ..., (None, kernel)]`) says which kernel
serves which activation row counts. Constants measured on one card did not carry over to the next
(H100 plans on the H200: int8 weight-only 0.76x bf16 at M=256, issue 16), so `qexport.compile`
times each candidate kernel on the region's own weights, on the card, at a few probe row counts,
and keeps the fastest per probe; buckets end half-way (in log scale) between probes.

Results are cached per device name, torch and Triton version, a digest of the kernels' source, family,
weight shape, policy and probes, in memory and in `$QEXPORT_CACHE_DIR/cuda_plans.json` (default `~/.cache/qexport`), so a
model of many same-shaped layers, or a recompile, tunes once. Without a CUDA device (or with
`qexport.cuda_plan="static"`) the static plans of kernels/cuda.py are used; the region's report
and the package manifest say which.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

PLAN_OPTION = "qexport.cuda_plan"
PLAN_MODES = ("tuned", "static")
#: row counts timed; buckets between two probes go to the nearer one (log scale)
PROBE_ROWS = (1, 4, 16, 64, 256, 1024, 4096)
#: a kernel already serving the previous probe keeps its rows unless another beats it by more than this
#: (fewer buckets, fewer compiled kernels, and no flip-flop on timing noise)
STICKY = 0.03

Plan = list[tuple["int | None", Any]]


@dataclass(frozen=True)
class Candidate:
    """A plan entry (`"gemv"`, `("triton", tile)`, ...) and the row counts it is worth timing at."""

    kernel: Any
    min_rows: int = 1
    max_rows: int = 1 << 30


_MEMORY: dict[str, dict] = {}


def cache_path() -> Path:
    root = os.environ.get("QEXPORT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "qexport")
    return Path(root) / "cuda_plans.json"


def kernels_fingerprint() -> str:
    """A digest of the CUDA kernels' and this tuner's source: a plan timed against older kernels is
    stale (a faster decode moves the crossovers), so an upgraded qexport must not reuse it."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in ("cuda.py", "cuda_tune.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:12]


def device_key() -> str:
    import triton

    name = torch.cuda.get_device_name()
    return f"{name} | torch {torch.__version__} | triton {triton.__version__} | kernels {kernels_fingerprint()}"


def _to_json(kernel: Any) -> Any:
    return [kernel[0], list(kernel[1])] if isinstance(kernel, tuple) else kernel


def _from_json(kernel: Any) -> Any:
    return (kernel[0], tuple(kernel[1])) if isinstance(kernel, list) else kernel


def _load_disk() -> dict:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(key: str, entry: dict) -> None:
    _MEMORY[key] = entry
    path = cache_path()
    try:  # the cache only saves time: an unwritable home directory costs a re-tune, nothing else
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load_disk()
        data[key] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cuda_plans.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass


def probes_for(rows: tuple[int, float]) -> tuple[int, ...]:
    """The probe row counts inside the program's range (its ends included, capped at the largest probe)."""
    lo, hi = rows[0], min(rows[1], PROBE_ROWS[-1])
    return tuple(sorted({lo, int(hi), *(p for p in PROBE_ROWS if lo <= p <= hi)}))


def plan_from_winners(winners: Sequence[tuple[int, Any]]) -> Plan:
    """[(probe rows, kernel)] in row order -> buckets, each ending at the log-midpoint to the next probe."""
    plan: Plan = []
    for i, (m, kernel) in enumerate(winners):
        bound = int(math.sqrt(m * winners[i + 1][0])) if i + 1 < len(winners) else None
        if plan and plan[-1][1] == kernel:
            plan[-1] = (bound, kernel)
        else:
            plan.append((bound, kernel))
    return plan


def tune(
    key: str,
    probes: Sequence[int],
    candidates: Sequence[Candidate],
    timer: Callable[[Any, int], float],
) -> tuple[Plan, dict]:
    """The fastest candidate per probe, as a plan; `timer(kernel, rows)` returns µs, or NaN for a
    candidate that failed or gave wrong numbers there. Cached under `key` (see module doc)."""
    entry = _MEMORY.get(key) or _load_disk().get(key)
    if entry is not None:
        _MEMORY[key] = entry
        return [(b, _from_json(k)) for b, k in entry["plan"]], {**entry, "cached": True}
    winners: list[tuple[int, Any]] = []
    table: dict[str, dict[str, float]] = {}
    for m in probes:
        times = {}
        for c in candidates:
            if c.min_rows <= m <= c.max_rows:
                us = timer(c.kernel, m)
                if us == us:
                    times[json.dumps(_to_json(c.kernel))] = us
        if not times:
            raise RuntimeError(f"no candidate kernel ran at {m} rows")
        best = min(times, key=times.get)
        prev = json.dumps(_to_json(winners[-1][1])) if winners else None
        if prev in times and times[prev] <= times[best] * (1 + STICKY):
            best = prev
        winners.append((m, _from_json(json.loads(best))))
        table[str(m)] = {k: round(v, 2) for k, v in sorted(times.items(), key=lambda kv: kv[1])[:4]}
    plan = plan_from_winners(winners)
    entry = {"plan": [[b, _to_json(k)] for b, k in plan], "best_us": table}
    _store(key, entry)
    return plan, {**entry, "cached": False}


_FLUSH: list = []


def time_us(fn: Callable[[], Any], warmup_ms: float = 10, rep_ms: float = 25) -> float:
    """Median µs of `fn()` between CUDA events, the L2 flushed before each call by READING a buffer
    several times its size. (triton's do_bench flushes by writing zeros; the dirty lines that leaves
    are written back while the timed kernel reads, which on the H200 held every 4096x4096 layer at
    M=1, whatever its weight bytes, to 14-16 µs.)"""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.int8, device="cuda"))
    flush = _FLUSH[0]
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.sum()
        fn()
    end.record()
    torch.cuda.synchronize()
    per_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(int(warmup_ms / per_ms)):
        fn()
    n = max(10, min(2000, int(rep_ms / per_ms)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in events:
        flush.sum()
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events) * 1e3


def bench_us(fn: Callable[[], Any]) -> float:
    """Median µs of `fn` on the GPU (L2 flushed before each call), short enough for compile time.

    Timed as a CUDA graph replay: called from Python, a Triton op's launch takes longer than the L2
    flush before it, and the first tuning run on the H200 timed that (80-180 µs for every kernel)
    instead of the kernels. `fn` must have run once already (compiled, warmed up).
    """
    return time_us(capture(fn).replay)


def capture(fn: Callable[[], Any]) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of one `fn()` call, run once on a side stream first (as torch.cuda.graph asks)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
