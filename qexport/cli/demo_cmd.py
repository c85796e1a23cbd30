"""`qexport demo [--out DIR]`: the built-in model through every stage, in one table."""

from __future__ import annotations

import argparse

from ._common import Progress


def register(sub: argparse._SubParsersAction) -> None:
    from ..demo import BACKENDS, DEFAULT_MODEL, DEFAULT_SCHEME

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
    from ..demo import run_demo
    from ..schemes import get
    from ._common import parse_scheme_args

    scheme = get(args.scheme, **parse_scheme_args(args.scheme, args.scheme_arg))
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    result = run_demo(args.out, scheme=scheme, model=args.model, backends=backends, bench_time_s=args.bench_time,
                      threads=args.threads or None,
                      progress=Progress(total=5 + len(set(backends)) + ("aoti" in backends)))
    print(result.table())
    return 0 if result.passed else 1
