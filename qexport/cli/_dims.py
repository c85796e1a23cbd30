"""`--dynamic` for `qexport export`: which dims of which inputs are dynamic, and what they are called.

    --dynamic 0,1          dims 0 and 1 of every input
    --dynamic 1:seq        dim 1 of every input, named seq (repeatable, comma-joinable)
    --dynamic 0.1:seq      dim 1 of input 0 only (INPUT.DIM[:NAME], inputs counted from 0)
    --dynamic 0:batch:32   an upper bound (DIM[:NAME][:MAX]; `0::32` keeps the default name)

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
    "make dims dynamic: DIM[:NAME][:MAX] for every input (e.g. 0,1 or 1:seq or 0:batch:32), INPUT.DIM[:NAME][:MAX] "
    "for one input (e.g. 0.1:seq); comma-joined or repeated. Default names: batch for dim 0, dimN otherwise. "
    "MAX bounds the dim (an ExecuTorch .pte is planned for it; without one, torch infers the range)"
)
_ENTRY = re.compile(r"^(?:(?P<input>\d+)\.)?(?P<dim>\d+)"
                    r"(?::(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<max>\d+))?|:(?P<bare_max>\d+)))?$")
_SYMBOL = re.compile(r"\bs\d+\b")


@dataclass(frozen=True)
class DynamicDim:
    input: int | None  # None: every input that has the dim
    dim: int
    name: str
    max: int | None = None  # None: torch infers the upper bound


def parse_dynamic(values: Sequence[str]) -> list[DynamicDim]:
    out = []
    for value in values:
        for entry in value.split(","):
            m = _ENTRY.match(entry.strip())
            if not m:
                raise UsageError(f"--dynamic {value!r}: {entry.strip()!r} is not DIM[:NAME][:MAX] or INPUT.DIM[:NAME][:MAX] "
                                 f"(e.g. 0,1 or 1:seq or 0.1:seq or 0:batch:32; names are identifiers)")
            dim = int(m["dim"])
            inp = int(m["input"]) if m["input"] is not None else None
            default = "batch" if dim == 0 else f"dim{dim}"
            out.append(DynamicDim(inp, dim, m["name"] or (default if inp is None else f"in{inp}_{default}"),
                                  int(bound) if (bound := m["max"] or m["bare_max"]) is not None else None))
    return out


def resolve(dims: Sequence[DynamicDim], shapes: Sequence[Sequence[int]]) -> list[dict[int, str]]:
    """Per input, {dim: name}. Every entry must name a dim some input has; an INPUT.DIM entry must
    name an existing input and dim."""
    return [{d: dim.name for d, dim in entries.items()} for entries in _resolve(dims, shapes)]


def maxima(dims: Sequence[DynamicDim], shapes: Sequence[Sequence[int]]) -> list[dict[int, int]]:
    """Per input, {dim: upper bound} of the entries that give one; a bound below the size the dim is
    traced at is refused."""
    out: list[dict[int, int]] = []
    for i, (shape, entries) in enumerate(zip(shapes, _resolve(dims, shapes))):
        for d, dim in entries.items():
            if dim.max is not None and dim.max < max(2, shape[d]):
                raise UsageError(f"--dynamic {dim.dim}:{dim.name}:{dim.max}: input {i}'s dim {d} is traced at "
                                 f"{max(2, shape[d])} (its --input size; a size-1 dim at 2), above that bound")
        out.append({d: dim.max for d, dim in entries.items() if dim.max is not None})
    return out


def _resolve(dims: Sequence[DynamicDim], shapes: Sequence[Sequence[int]]) -> list[dict[int, DynamicDim]]:
    per_input: list[dict[int, DynamicDim]] = [{} for _ in shapes]
    for d in dims:
        targets = range(len(shapes)) if d.input is None else [d.input]
        if d.input is not None and d.input >= len(shapes):
            raise UsageError(f"--dynamic {d.input}.{d.dim}: there are {len(shapes)} inputs (counted from 0)")
        hit = False
        for i in targets:
            if d.dim < len(shapes[i]):
                per_input[i][d.dim] = d
                hit = True
            elif d.input is not None:
                raise UsageError(f"--dynamic {d.input}.{d.dim}: input {i} has {len(shapes[i])} dims "
                                 f"(shape {'x'.join(map(str, shapes[i]))})")
        if not hit:
            raise UsageError(f"--dynamic {d.dim}: no input has a dim {d.dim}")
    return per_input


_SPECIALIZED = re.compile(r"You marked L\['(?P<arg>[^']+)'\]\.size\(\)\[(?P<dim>\d+)\] as dynamic but your code "
                          r"specialized it to be a constant \((?P<size>\d+)\)")


def specialized_dims(error: Exception) -> UsageError | None:
    """torch.export's "Constraints violated" for dims that --dynamic named but the model fixes, as the flag to
    change; None for any other failure. torch's own text advises on mark_dynamic and Dim.DYNAMIC, which a
    command line does not have."""
    hits = [f"input {m['arg']}'s dim {m['dim']} at {m['size']}" for m in _SPECIALIZED.finditer(str(error))]
    if not hits:
        return None
    return UsageError(f"--dynamic: the model fixes {', '.join(hits)} (a layer of that fixed size, e.g. a Linear's "
                      f"in_features, reads it), so {'they' if len(hits) > 1 else 'it'} cannot be dynamic: leave "
                      f"{'those dims' if len(hits) > 1 else 'that dim'} out of --dynamic")


def traced_shape(shape: Sequence[int], dynamic: Mapping[int, str]) -> tuple[int, ...]:
    """The shape to trace with: torch.export specializes a size-1 dim, so a dynamic one is traced at 2."""
    return tuple(max(2, s) if i in dynamic else s for i, s in enumerate(shape))


def dynamic_shapes(per_input: Sequence[Mapping[int, str]],
                   bounds: Sequence[Mapping[int, int]] = ()) -> tuple[dict[int, object], ...] | None:
    """torch.export's dynamic_shapes: Dim.DYNAMIC lets torch infer each dim's range (a BERT's sequence
    is bounded by its position table), under the given upper bounds, and fails if the model makes the
    dim static."""
    if not any(per_input):
        return None
    bounds = list(bounds) + [{}] * (len(per_input) - len(bounds))
    return tuple({d: torch.export.Dim.DYNAMIC(max=b[d]) if d in b else torch.export.Dim.DYNAMIC for d in dims}
                 for dims, b in zip(per_input, bounds))


def rename(text: str, names: Mapping[str, str]) -> str:
    """`s77*s53` -> `batch*seq` with the recorded names (symbols without one are left as they are; a
    manifest's `dim_names` is the file's: a name that is not text is ignored, `{"s1": 5}` raised TypeError)."""
    def name(m: re.Match) -> str:
        n = names.get(m.group(0))
        return n if isinstance(n, str) else m.group(0)

    return _SYMBOL.sub(name, text) if names else text
