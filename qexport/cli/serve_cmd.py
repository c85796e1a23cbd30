"""`qexport serve ARTIFACT`: serve an artifact over HTTP on Ray Serve (see qexport/serve.py)."""

from __future__ import annotations

import argparse

from ._common import PIN_HELP, input_path, parse_pins


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve an artifact over HTTP on Ray Serve, with replicas and dynamic batching",
        description="Deploy ARTIFACT (AOTI package, .pte, .onnx or .pt2) as a Ray Serve application: POST /predict "
        "(JSON or .npz/.npy), GET /health, GET /info (inputs, regions, schemes, kernels), GET /stats. Requests "
        "are checked against the artifact's input signature before any model replica sees them; concurrent "
        "requests are batched along the dynamic batch dim. Needs `pip install 'qexport[serve]'`.",
        epilog="example: qexport serve model_aoti.pt2 --replicas 2 --max-batch 32 --port 8000 "
        "(multi-node: start a Ray cluster, then add --address auto on its head node)",
    )
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch of requests run as one call (1: no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="how long a batch waits to fill (default 2 ms)")
    p.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024, help="larger requests get 413 (default 16 MiB)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto) instead of starting one")
    p.add_argument("--expected-sha256", action="append", default=None, metavar="FILE=SHA256", help=PIN_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..serve import ServeConfig, run as serve_run

    path = input_path(args.artifact, "ARTIFACT")
    pin = next(iter(parse_pins(args.expected_sha256, [args.artifact]).values()), None)  # one file: its pin, if any
    config = ServeConfig(str(path), replicas=args.replicas, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                         max_body_bytes=args.max_body_bytes, expected_sha256=pin).check()
    serve_run(config, host=args.host, port=args.port, address=args.address, blocking=True,
              ready=lambda url: print(f"serving {path} at {url} (POST /predict, GET /health /info /stats); Ctrl-C stops",
                                      flush=True))
    return 0
