"""`--dynamic` for `qexport export`: which dims of which inputs are dynamic, and what they are called.

    --dynamic 0,1          dims 0 and 1 of every input
    --dynamic 1:seq        dim 1 of every input, named seq (repeatable, comma-joinable)
    --dynamic 0.1:seq      dim 1 of input 0 only (INPUT.DIM[:NAME], inputs counted from 0)

torch.export names every dynamic dim with a symbol of its own (`s77`); the names given here are
recorded in the .pt2's manifest (`extra.dim_names`) and replace the symbols in region tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..errors import UsageError

DYNAMIC_HELP = (
    "make dims dynamic: DIM[:NAME] for every input (e.g. 0,1 or 1:seq), INPUT.DIM[:NAME] for one input "
    "(e.g. 0.1:seq); comma-joined or repeated. Default names: batch for dim 0, dimN otherwise"
)
_ENTRY = re.compile(r"^(?:(?P<input>\d+)\.)?(?P<dim>\d+)(?::(?P<name>[A-Za-z_][A-Za-z0-9_]*))?$")
_SYMBOL = re.compile(r"\bs\d+\b")


@dataclass(frozen=True)
class DynamicDim:
    input: int | None  # None: every input that has the dim
    dim: int
    name: str


def parse_dynamic(values: Sequence[str]) -> list[DynamicDim]:
    out = []
    for value in values:
        for entry in value.split(","):
            m = _ENTRY.match(entry.strip())
            if not m:
                raise UsageError(f"--dynamic {value!r}: {entry.strip()!r} is not DIM[:NAME] or INPUT.DIM[:NAME] "
                                 f"(e.g. 0,1 or 1:seq or 0.1:seq; names are identifiers)")
            dim = int(m["dim"])
            inp = int(m["input"]) if m["input"] is not None else None
            default = "batch" if dim == 0 else f"dim{dim}"
            out.append(DynamicDim(inp, dim, m["name"] or (default if inp is None else f"in{inp}_{default}")))
    return out


def resolve(dims: Sequence[DynamicDim], shapes: Sequence[Sequence[int]]) -> list[dict[int, str]]:
    """Per input, {dim: name}. Every entry must name a dim some input has; an INPUT.DIM entry must
    name an existing input and dim."""
    per_input: list[dict[int, str]] = [{} for _ in shapes]
    for d in dims:
        targets = range(len(shapes)) if d.input is None else [d.input]
        if d.input is not None and d.input >= len(shapes):
            raise UsageError(f"--dynamic {d.input}.{d.dim}: there are {len(shapes)} inputs (counted from 0)")
        hit = False
        for i in targets:
            if d.dim < len(shapes[i]):
                per_input[i][d.dim] = d.name
                hit = True
            elif d.input is not None:
                raise UsageError(f"--dynamic {d.input}.{d.dim}: input {i} has {len(shapes[i])} dims "
                                 f"(shape {'x'.join(map(str, shapes[i]))})")
        if not hit:
            raise UsageError(f"--dynamic {d.dim}: no input has a dim {d.dim}")
    return per_input


def traced_shape(shape: Sequence[int], dynamic: Mapping[int, str]) -> tuple[int, ...]:
    """The shape to trace with: torch.export specializes a size-1 dim, so a dynamic one is traced at 2."""
    return tuple(max(2, s) if i in dynamic else s for i, s in enumerate(shape))


def dynamic_shapes(per_input: Sequence[Mapping[int, str]]) -> tuple[dict[int, object], ...] | None:
    """torch.export's dynamic_shapes: Dim.DYNAMIC lets torch infer each dim's range (a BERT's sequence
    is bounded by its position table) and fails if the model makes the dim static."""
    if not any(per_input):
        return None
    return tuple({d: torch.export.Dim.DYNAMIC for d in dims} for dims in per_input)


def rename(text: str, names: Mapping[str, str]) -> str:
    """`s77*s53` -> `batch*seq` with the recorded names (symbols without one are left as they are)."""
    return _SYMBOL.sub(lambda m: names.get(m.group(0), m.group(0)), text) if names else text
