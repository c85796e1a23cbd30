"""`qexport compile IN.pt2 -o OUT.pt2 --device cpu|cuda`: an AOTInductor package for servers."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import UsageError
from ._common import Progress, fmt_bytes, input_path, output_path, stage


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--option {text!r}: expected KEY=VALUE, e.g. max_autotune=true or qexport.kernels=inductor")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw  # a bare word is a string
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    return key.strip(), value


def _parse_options(texts: list[str]) -> dict[str, Any]:
    """Every --option as a dict; a key given twice is refused (which value was meant is unknown)."""
    options: dict[str, Any] = {}
    for text in texts:
        key, value = _parse_option(text)
        if key in options:
            raise UsageError(f"--option {key} is given twice ({options[key]!r} and {value!r}): keep one")
        options[key] = value
    return options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compile",
        help="compile a .pt2 into an AOTInductor package with scheme-aware kernels",
        description=(
            "Compile a qexport .pt2 into an AOTInductor package (loadable with qexport.load_compiled or "
            "torch._inductor.aoti_load_package). Each quantized region gets the kernel its scheme picks "
            "on the device; the others are fused by Inductor. Prints which kernel each region got."
        ),
    )
    p.add_argument("input", metavar="IN.pt2", help="a .pt2 written by qexport export / qexport.save")
    p.add_argument("-o", "--output", required=True, metavar="OUT.pt2", help="the package to write (.pt2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the package runs (default: cpu)")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="an Inductor config (torch._inductor.config name), qexport.kernels=inductor to skip the "
        "kernel table, qexport.large_m=bf16_weights for CUDA weight-only packages that also keep bf16 "
        "weights for large batches, qexport.cuda_plan=static to skip tuning on the GPU, or "
        "qexport.fuse_siblings=off to keep one kernel per region (q/k/v apart); repeatable",
    )
    p.add_argument("--quiet", action="store_true", help="print only the output path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src = input_path(args.input, "IN.pt2")
    out = output_path(args.output, (".pt2",), "OUT.pt2")
    if src.resolve() == out.resolve():
        raise UsageError("OUT.pt2 must differ from IN.pt2 (the package replaces the program with compiled code)")
    options = _parse_options(args.option)
    compile_ = stage("compile")
    from ..lower.aoti import check_options, plan

    check_options(args.device, options)  # refuse bad options before loading anything
    import serializers

    progress = Progress(total=3, enabled=not args.quiet)
    with progress.step(f"load {src}"):
        ep = serializers.load(src)
    with progress.step("choose kernels"):
        report = plan(ep, device=args.device, options=options)
    if not args.quiet:
        print(report.table().rsplit("\n", 1)[0])
    with progress.step(f"AOTInductor compile for {args.device} (Inductor generates and builds C++)"):
        path = compile_(ep, out, device=args.device, options=options)
    if args.quiet:
        print(path)
    else:
        print(f"wrote {path} ({fmt_bytes(out.stat().st_size)}); load it with qexport.load_compiled({str(path)!r})")
    return 0
