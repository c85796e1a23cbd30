"""`qexport bench ARTIFACT...`: median latency and size of each artifact, side by side, one run."""

from __future__ import annotations

import argparse

import torch

from ..errors import UsageError
from ._common import INPUT_SPEC_HELP, PIN_HELP, Progress, fmt_bytes, fmt_seconds, parse_input_spec, parse_pins
from ..table import format_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="median latency and size of artifacts, side by side",
        description="Load every ARTIFACT (.pt2, AOTI package, .pte, .onnx), run each on the same inputs "
        "and print median latency (with p10-p90) and file size. Inputs come from --input, else from the "
        "first artifact that describes its inputs (list the .pt2 first).",
        epilog="example: qexport bench model.pt2 model_aoti.pt2 model.pte model.onnx",
    )
    p.add_argument("artifacts", metavar="ARTIFACT", nargs="+")
    p.add_argument("--input", action="append", default=None, metavar="SHAPE[:DTYPE[:HIGH]]", help=INPUT_SPEC_HELP)
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per artifact (default 3)")
    p.add_argument("--min-iters", type=int, default=10, help="at least this many timed calls (default 10)")
    p.add_argument("--min-time", type=float, default=0.5, help="and at least this many seconds (default 0.5)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expected-sha256", action="append", default=None, metavar="FILE=SHA256", help=PIN_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime import bench

    if args.warmup < 0 or args.min_iters < 1 or args.min_time < 0:
        raise UsageError("--warmup must be >= 0, --min-iters >= 1 and --min-time >= 0")
    inputs = None
    if args.input:
        g = torch.Generator().manual_seed(args.seed)
        inputs = [parse_input_spec(s).make(g) for s in args.input]
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    pins = parse_pins(args.expected_sha256, args.artifacts)
    progress = Progress(total=len(args.artifacts))
    try:
        results = bench(args.artifacts, inputs=inputs, seed=args.seed, warmup=args.warmup, min_iters=args.min_iters,
                        min_time_s=args.min_time, on_artifact=lambda p: progress.advance(f"timing {p}"), expected_sha256=pins)
    except BaseException:
        progress.close(ok=False)
        raise
    progress.close()
    print(bench_table(results))
    return 1 if any(r.error for r in results) else 0


def bench_table(results) -> str:
    base = next((r.median_s for r in results if r.median_s), None)
    rows = [[str(r.path), r.kind, fmt_bytes(r.size), fmt_seconds(r.median_s),
             f"{fmt_seconds(r.p10_s)} - {fmt_seconds(r.p90_s)}" if r.median_s else "-",
             f"{base / r.median_s:.2f}x" if r.median_s and base else "-", r.iters or "-", r.error or ""]
            for r in results]
    return format_table(["artifact", "kind", "size", "median", "p10 - p90", "speed vs first", "calls", "error"], rows)
