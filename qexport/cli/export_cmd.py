"""`qexport export TARGET --scheme NAME --input SHAPE ... -o OUT.pt2`: quantize a model and save
its exported program."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationError, ExportError, UsageError
from ._common import (
    INPUT_SPEC_HELP, InputSpec, Progress, build_model, default_int_high, fmt_bytes, import_target, input_path,
    output_path, parse_input_spec, parse_scheme_args, stage,
)
from ._dims import DYNAMIC_HELP, dynamic_shapes, maxima, parse_dynamic, rename, resolve, specialized_dims, traced_shape
from ..table import format_table

#: random calibration batches when --calibrate is given without a file
CALIBRATION_BATCHES = 8


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="quantize a model and save it as a .pt2 program",
        description="Build the model TARGET, quantize it with a scheme, torch.export it on example inputs "
        "and save the program (one invoke_quant region per quantized layer) as a .pt2 file.",
        epilog="example: qexport export qexport.models:TinyNet --scheme int4_weight_only --scheme-arg "
        "group_size=32 --input 1x256 -o tinynet.pt2",
    )
    p.add_argument("target", metavar="TARGET",
                   help="package.module:callable (or file.py:callable) returning an nn.Module, e.g. qexport.models:TinyNet")
    p.add_argument("--scheme", required=True, help="scheme name (see docs/schemes.md), e.g. int8_weight_only")
    p.add_argument("--scheme-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scheme parameter, e.g. group_size=64 (repeatable)")
    p.add_argument("--recipe", action="append", default=[], metavar="KEY=SCHEME",
                   help="give the layers KEY selects another scheme (or none: leave them float); KEY is a layer class "
                        "name (Embedding, Linear, FalconLinear) or a module-name glob ('lm_head', 'encoder.*'); "
                        "--scheme takes every other layer (repeatable)")
    p.add_argument("--input", action="append", required=True, metavar="SHAPE[:DTYPE[:HIGH]]", help=INPUT_SPEC_HELP)
    p.add_argument("--dynamic", action="append", default=[], metavar="[INPUT.]DIM[:NAME][:MAX]", help=DYNAMIC_HELP)
    p.add_argument("--dynamic-batch", action="store_true", help="same as --dynamic 0:batch")
    p.add_argument("--calibrate", nargs="?", const="random", default=None, metavar="INPUTS.pt",
                   help="calibrate static schemes and algorithm=gptq: on random inputs of the --input shapes, or on a file saved "
                   "with torch.save holding a list of batches (each a tensor or a tuple of tensors)")
    p.add_argument("--strict", action="store_true", help="use strict (Dynamo) export instead of non-strict")
    p.add_argument("--seed", type=int, default=0, help="seed for random example and calibration inputs")
    p.add_argument("-o", "--output", required=True, metavar="OUT.pt2", help="where to write the program")
    p.set_defaults(func=run)


def load_calibration(path: str, n_inputs: int) -> list[tuple[torch.Tensor, ...]]:
    """Batches from a torch.save file: a list (or tuple) of tensors or of tuples of tensors.
    Loaded with weights_only=True: a calibration file never runs code."""
    p = input_path(path, "--calibrate file")
    try:
        data = torch.load(p, weights_only=True)
    except Exception as e:
        raise CalibrationError(f"--calibrate {path}: not a tensor file torch.load can read safely ({type(e).__name__}); "
                               "save a list of batches with torch.save([x1, x2, ...], path)") from None
    if isinstance(data, torch.Tensor):
        data = [data]
    if not isinstance(data, (list, tuple)) or not data:
        raise CalibrationError(f"--calibrate {path}: expected a non-empty list of batches, got {type(data).__name__}")
    batches = []
    for i, b in enumerate(data):
        b = (b,) if isinstance(b, torch.Tensor) else b
        if not isinstance(b, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in b):
            raise CalibrationError(f"--calibrate {path}: batch {i} is not a tensor or a tuple of tensors")
        if len(b) != n_inputs:
            raise CalibrationError(f"--calibrate {path}: batch {i} has {len(b)} tensors, the model takes {n_inputs} (--input)")
        batches.append(tuple(b))
    return batches


def run(args: argparse.Namespace) -> int:
    # Every argument is checked before the model is built, so a typo costs nothing and writes nothing.
    specs = [parse_input_spec(s) for s in args.input]
    parsed = parse_dynamic(args.dynamic + (["0:batch"] if args.dynamic_batch else []))
    dims, bounds = resolve(parsed, [s.shape for s in specs]), maxima(parsed, [s.shape for s in specs])
    specs = [InputSpec(traced_shape(s.shape, d), s.dtype, s.high) for s, d in zip(specs, dims)]
    _import_schemes_of(args.target, [args.scheme, *(pair.rpartition("=")[2].strip() for pair in args.recipe)])
    scheme_params = parse_scheme_args(args.scheme, args.scheme_arg)
    from ..schemes import get

    scheme = get(args.scheme, **scheme_params)
    entries = parse_recipe(args.recipe)
    out = output_path(args.output, (".pt2",), "-o")
    calibrated = next((s for s in (scheme, *entries.values()) if s is not None and s.needs_calibration), None)
    if calibrated is not None and args.calibrate is None:
        why = "quantizes activations statically" if calibrated.activation == "static" else "fits its weights with GPTQ"
        raise CalibrationError(f"scheme {calibrated.name} {why}: add --calibrate INPUTS.pt (or --calibrate "
                               "for random inputs)")
    calib_file = load_calibration(args.calibrate, len(specs)) if args.calibrate not in (None, "random") else None
    save = stage("save")

    progress = Progress(total=5)
    with progress.step(f"building {args.target}"):
        model = build_model(args.target)
    g = torch.Generator().manual_seed(args.seed)
    high = default_int_high(model)
    example = tuple(s.make(g, high) for s in specs)
    with progress.step("checking the model runs on the example inputs"):
        # One eager call catches wrong shapes / dtypes with the model's own message, before
        # quantization and before torch.export (whose failure logs a page of fake-tensor traces).
        try:
            with torch.no_grad():
                model(*example)
        except Exception as e:
            shown = ", ".join(map(str, specs))
            raise UsageError(f"{args.target} fails on the example inputs {shown} (check --input): "
                             f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    with progress.step(f"quantizing with {scheme.describe()}" + (f" and {len(entries)} recipe entries" if entries else "")):
        calib: Any = None
        if calibrated is not None:
            calib = calib_file or [tuple(s.make(g, high) for s in specs) for _ in range(CALIBRATION_BATCHES)]
        from ..quantize import quantize

        quantize(model, recipe_for(model, entries, scheme) if entries else scheme, calibration_data=calib)
    with progress.step("exporting"):
        from ..export import export

        try:
            ep = export(model, example, dynamic_shapes=dynamic_shapes(dims, bounds), strict=args.strict)
        except ExportError as e:
            raise specialized_dims(e) or e from None
    from ..signature import symbol_names

    names = symbol_names(ep, dims)
    with progress.step(f"saving {out}"):
        from ..signature import record_dim_names

        record_dim_names(ep, names)  # in the program, so every artifact lowered from this .pt2 has them
        save(ep, out)
    print(model.qexport_summary)
    print_regions(ep, names)
    shown = ["x".join(d.get(i, str(n)) for i, n in enumerate(s.shape)) + ":" + str(s).split(":", 1)[1]
             for s, d in zip(specs, dims)]
    print(f"wrote {out} ({fmt_bytes(Path(out).stat().st_size)}), inputs: {', '.join(shown)}"
          + (f" (traced at {', '.join(map(str, specs))})" if any(dims) else ""))
    return 0


def _import_schemes_of(target: str, names: list[str]) -> None:
    """A scheme registered by TARGET's own module (a user scheme defined beside the model, the documented
    way to add one) is known only once that module is imported: import it, without building the model,
    when a scheme the command names is not registered yet."""
    from ..schemes import names as registered

    if any(n and n.lower() != "none" and n not in registered() for n in names):
        import_target(target)


def parse_recipe(pairs: list[str]) -> dict[str, Any]:
    """`["Embedding=int8_weight_only", "lm_head=none"]` -> {"Embedding": Scheme, "lm_head": None}, in order."""
    from ..schemes import get

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, name = pair.rpartition("=")
        if not sep or not key.strip() or not name.strip():
            raise UsageError(f"--recipe {pair!r}: expected KEY=SCHEME, e.g. Embedding=int8_weight_only or lm_head=none")
        out[key.strip()] = None if name.strip().lower() == "none" else get(name.strip())
    return out


def recipe_for(model: torch.nn.Module, entries: dict[str, Any], scheme: Any) -> dict[Any, Any]:
    """The quantize() recipe: a KEY naming a class among the model's layers (or their bases) is a type
    key, any other a module-name glob; --scheme takes every other layer."""
    classes = {c.__name__: c for m in model.modules() for c in type(m).__mro__
               if isinstance(c, type) and issubclass(c, torch.nn.Module)}
    return {**{classes.get(k, k): v for k, v in entries.items()}, torch.nn.Module: scheme}


def print_regions(ep: torch.export.ExportedProgram, dim_names: dict[str, str] | None = None) -> None:
    from ..regions import regions

    def shape(shapes) -> str:
        return "x".join(rename(str(d), dim_names or {}) for d in shapes[0]) if shapes else ""

    rows = [[r.name, r.scheme.describe() if r.scheme else r.scheme_name, r.op,
             shape(r.input_shapes), shape(r.output_shapes)] for r in regions(ep)]
    print(format_table(["region", "scheme", "op", "input", "output"], rows))
