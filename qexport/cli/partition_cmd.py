"""`qexport partition IN.pt2 --target xnnpack|portable|onnx -o OUT`: lower a .pt2 for an edge runtime
and print where each region went (delegated or not, and why not)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import UsageError
from ._common import Progress, fmt_bytes, input_path, output_path, stage


@dataclass(frozen=True)
class Target:
    """One `--target`: the artifact kind it writes (serializers.kinds) and the lowering that writes it
    (a LoweringReport back)."""

    kind: str
    lower: Callable[[Path, Path, argparse.Namespace], Any]
    runtime: str
    #: the target-specific options (argparse dests) its lowering reads; the others must stay unset
    options: tuple[str, ...] = ()

    @property
    def suffix(self) -> str:
        from serializers import kinds

        return kinds.get(self.kind).suffix


def _executorch(backend: str) -> Callable[[Path, Path, argparse.Namespace], Any]:
    def lower(src: Path, out: Path, args: argparse.Namespace) -> Any:
        return stage("to_executorch")(src, out, backend=backend, progress=False)  # the CLI shows its own steps

    return lower


def _onnx(src: Path, out: Path, args: argparse.Namespace) -> Any:
    return stage("to_onnx")(src, out, keep_regions=args.keep_regions, opset=args.opset, target=args.onnx_target or "portable")


#: --target -> how to lower; a backend adds its entry here
TARGETS: dict[str, Target] = {
    "xnnpack": Target("pte", _executorch("xnnpack"), "ExecuTorch (XNNPACK delegate)"),
    "portable": Target("pte", _executorch("portable"), "ExecuTorch (portable kernels only)"),
    "onnx": Target("onnx", _onnx, "ONNX Runtime", options=("keep_regions", "opset", "onnx_target")),
}
#: target-specific option -> its flag, for the refusal of one the chosen target would ignore
_OPTION_FLAGS = {"keep_regions": "--keep-regions", "opset": "--opset", "onnx_target": "--onnx-target"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "partition",
        help="lower a .pt2 for an edge runtime (ExecuTorch .pte, ONNX) and report what was delegated",
        description=(
            "Lower a qexport .pt2 for an edge runtime. Each quantized region is lowered from its scheme; "
            "the table says, per region, whether the accelerated backend took it and, if not, why and what "
            "to change."
        ),
    )
    p.add_argument("input", metavar="IN.pt2", help="a .pt2 written by qexport export / qexport.save")
    p.add_argument("--target", required=True, choices=sorted(TARGETS), help="what to lower for")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the file to write (.pte or .onnx)")
    p.add_argument("--keep-regions", action="store_true",
                   help="onnx: keep each region as an ONNX local function whose metadata carries its scheme")
    p.add_argument("--opset", type=int, default=None, help="onnx: the ONNX opset (default 21; int4/fp8 QDQ need 21+)")
    p.add_argument("--onnx-target", default=None, metavar="CPUS",
                   help="onnx: the CPUs the file must be exact on: portable (default; every CPU), x86_vnni, arm64, "
                        "or host (the fastest exact form for this machine)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="print only the output path")
    p.set_defaults(func=run, parser_defaults={d: p.get_default(d) for d in _OPTION_FLAGS})


def run(args: argparse.Namespace) -> int:
    target = TARGETS[args.target]
    ignored = [d for d, default in args.parser_defaults.items() if d not in target.options and getattr(args, d) != default]
    if ignored:  # silently ignored, --keep-regions with a .pte target looked like it had been applied
        takers = " / ".join(sorted(t for t, spec in TARGETS.items() if set(ignored) & set(spec.options)))
        one = len(ignored) == 1
        raise UsageError(f"{', '.join(_OPTION_FLAGS[d] for d in ignored)} {'does' if one else 'do'} not apply to "
                         f"--target {args.target} (only to --target {takers}); drop {'it' if one else 'them'}")
    src = input_path(args.input, "IN.pt2")
    out = output_path(args.output, (target.suffix,), f"--target {args.target} output")
    if src.resolve() == out.resolve():
        raise UsageError("the output must differ from IN.pt2")
    progress = Progress(total=1, enabled=not (args.quiet or args.json))
    with progress.step(f"lower {src} for {target.runtime}"):
        report = target.lower(src, out, args)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    elif args.quiet:
        print(out)
    else:
        print(report.table())
        delegated = sum(r.delegated for r in report.regions)
        also = f" and {report.extra['data_file']['path']}" if "data_file" in report.extra else ""
        print(f"{delegated}/{len(report.regions)} regions delegated; wrote {out}{also} ({fmt_bytes(report.bytes)})")
    return 0
