"""`qexport inspect FILE`: what a qexport artifact holds, read from its manifest (nothing is loaded or run)."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import ArtifactNotFoundError
from ._table import format_table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="list the quantized regions of an artifact (.pt2, AOTI package, .pte, .onnx)",
        description="Print the regions recorded in a qexport artifact's manifest: scheme, parameters, "
        "module path and bytes, with totals. Reads only the manifest; the model is not loaded.",
    )
    p.add_argument("file", metavar="FILE", help="a file written by qexport (save, compile, to_executorch, to_onnx)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON instead of a table")
    p.set_defaults(func=run)


def _params(scheme) -> str:
    from qexport.schemes import names

    if scheme.name not in names():  # a user scheme not registered in this process: every field differs
        return "(scheme not registered here)"
    return ", ".join(f"{k}={v}" for k, v in scheme.params().items()) or "-"


def _shape(shapes, dim_names) -> str:
    from ._dims import rename

    return rename(" ".join("[" + ", ".join(map(str, s)) + "]" for s in shapes), dim_names) or "-"


def _ratio(q: int, f: int) -> str:
    return f"{q / f:.3f}x" if f else "-"


def run(args: argparse.Namespace) -> int:
    if not os.path.exists(args.file):  # answered before importing torch (seconds)
        raise ArtifactNotFoundError(f"{args.file}: no such file")
    from serializers import inspect

    from ._common import fmt_bytes

    manifest = inspect(args.file)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=1))
        return 0
    dim_names = manifest.extra.get("dim_names") if isinstance(manifest.extra.get("dim_names"), dict) else {}
    rows = [
        (
            r.module_path or r.name, r.op, r.scheme.describe(), _params(r.scheme),
            list(r.weight_shape) if r.weight_shape else "-", _shape(r.input_shapes, dim_names),
            fmt_bytes(r.weight_bytes), fmt_bytes(r.float_bytes) if r.float_bytes else "-", _ratio(r.weight_bytes, r.float_bytes),
        )
        for r in manifest.regions
    ]
    print(
        f"{args.file}: {manifest.artifact} artifact, manifest v{manifest.version}, written by qexport "
        f"{manifest.qexport_version} with torch {manifest.torch_version}"
    )
    print(format_table(("module", "op", "scheme", "params", "weight", "input", "bytes", "float bytes", "ratio"), rows))
    print(
        f"total: {len(manifest.regions)} regions, {fmt_bytes(manifest.quantized_bytes)} quantized replacing "
        f"{fmt_bytes(manifest.float_bytes)} float ({_ratio(manifest.quantized_bytes, manifest.float_bytes)}); "
        f"other tensors {fmt_bytes(manifest.other_bytes)}; file {fmt_bytes(os.path.getsize(args.file))}"
    )
    if manifest.extra:
        print(f"extra: {json.dumps(manifest.extra, sort_keys=True)}")
    return 0
