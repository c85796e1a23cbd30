"""`qexport inspect FILE`: what a qexport artifact holds, read from its manifest (nothing is loaded or run)."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import ArtifactNotFoundError
from ..table import format_table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="list the quantized regions of an artifact (.pt2, AOTI package, .pte, .onnx)",
        description="Print the regions recorded in a qexport artifact's manifest: name (the module path; "
        "_1, _2 for later calls of a module used more than once), scheme, parameters and bytes, with totals, and for a lowered artifact whether its backend's accelerated "
        "path took each region and the kernel that runs it. Reads only the manifest; the model is not loaded.",
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


def _clean(value, limit: int = 160) -> str:
    """Manifest text as it may reach a terminal: control characters (escape sequences) shown escaped,
    long text cut. A manifest is the file's author's text, not ours."""
    from ..table import printable

    text = printable(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ratio(q: int, f: int) -> str:
    try:
        return f"{q / f:.3f}x" if f else "-"
    except OverflowError:  # byte counts are the author's numbers: any int JSON can hold
        return "-"


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
    # a lowered artifact's regions carry what its backend made of them (the same record for every kind)
    lowered = any(r.lowering is not None for r in manifest.regions)
    rows = [
        tuple(_clean(cell) for cell in (
            r.name, r.op, r.scheme.describe(), _params(r.scheme),
            list(r.weight_shape) if r.weight_shape else "-", _shape(r.input_shapes, dim_names),
            fmt_bytes(r.weight_bytes), fmt_bytes(r.float_bytes) if r.float_bytes else "-", _ratio(r.weight_bytes, r.float_bytes),
            *((("yes" if r.lowering.taken else "no", r.lowering.kernel) if r.lowering else ("-", "-")) if lowered else ()),
        ))
        for r in manifest.regions
    ]
    print(_clean(
        f"{args.file}: {manifest.artifact} artifact, manifest v{manifest.version}, written by qexport "
        f"{manifest.qexport_version} with torch {manifest.torch_version}", limit=400,
    ))
    # the region's name: its module path, suffixed _1, _2 for later calls of a module used more than once
    head = ("region", "op", "scheme", "params", "weight", "input", "bytes", "float bytes", "ratio")
    print(format_table(head + (("taken", "kernel") if lowered else ()), rows))
    groups = dict.fromkeys(" + ".join(map(str, r.lowering.details["siblings"])) for r in manifest.regions
                           if r.lowering is not None and isinstance(r.lowering.details.get("siblings"), list))
    if groups:  # AOTI: sibling regions (q/k/v, gate/up) that run as one kernel on their stacked weights
        print(_clean(f"one kernel each, weights stacked: {'; '.join(groups)}", limit=2000))
    inputs = _inputs(manifest.extra.get("inputs"), dim_names)
    if inputs:
        print(_clean(f"inputs: {inputs}", limit=2000))
    print(
        f"total: {len(manifest.regions)} regions, {fmt_bytes(manifest.quantized_bytes)} quantized replacing "
        f"{fmt_bytes(manifest.float_bytes)} float ({_ratio(manifest.quantized_bytes, manifest.float_bytes)}); "
        f"other tensors {fmt_bytes(manifest.other_bytes)}; file {fmt_bytes(os.path.getsize(args.file))}"
    )
    if manifest.artifact == "pte":
        for name, digest in manifest.members.items():  # the data file the .pte names and checksums
            where = os.path.join(os.path.dirname(args.file), name)
            print(_clean(f"data file: {where}, {fmt_bytes(os.path.getsize(where))}, sha256 {digest}", limit=400))
    target = manifest.extra.get("cpu_target")
    if isinstance(target, dict):
        from qexport.lower.cpu_target import CPUTarget

        try:
            print(_clean(f"compiled for: {CPUTarget.from_dict(target).describe()} (loading needs: "
                         f"{' '.join(map(str, target.get('requires', []))) or '-'})", limit=400))
        except (ValueError, TypeError) as e:
            print(_clean(f"compiled for: unreadable cpu_target ({e})", limit=400))
    rest = {k: v for k, v in manifest.extra.items() if k != "inputs" or not inputs}
    if rest:
        print(_clean(f"extra: {json.dumps(rest, sort_keys=True)}", limit=2000))
    return 0


def _inputs(raw: object, dim_names: dict) -> str:
    """The program's input signature (manifest `inputs`), dynamic dims by their names where known."""
    from qexport.signature import InputSpec

    from ._dims import rename

    try:
        specs = [InputSpec.from_json(d) for d in raw] if isinstance(raw, list) else []
    except ValueError as e:  # the file's record: said, not raised (the rest of the manifest still reads)
        return f"unreadable ({e})"
    return rename(", ".join(s.describe() for s in specs), dim_names)
