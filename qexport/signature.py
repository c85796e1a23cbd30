"""The user inputs of a program as plain data: name, dtype and shape, with each dynamic dim's name and
bounds. Recorded in every artifact's manifest (`extra["inputs"]`), so a runtime that holds only the
compiled file (an AOTI package has no graph to ask) can still check a request before the model sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
import re
from typing import Any, Mapping, Sequence

import torch

from .table import printable

#: what a dynamic dim's upper bound is recorded as when it has none
UNBOUNDED = None
#: key in `graph_module.meta["custom"]` (which torch's serializer keeps) holding {torch symbol: the
#: user's name for that dim}; copied into every manifest as `extra["dim_names"]`
DIM_NAMES_META = "qexport.dim_names"


def dim_names(ep: torch.export.ExportedProgram) -> dict[str, str]:
    """{torch symbol (`s77`): name} recorded on the program by `qexport.export` or the CLI."""
    names = ep.graph_module.meta.get("custom", {}).get(DIM_NAMES_META)
    return {str(k): str(v) for k, v in names.items()} if isinstance(names, dict) else {}


def record_dim_names(ep: torch.export.ExportedProgram, names: dict[str, str]) -> None:
    if names:
        ep.graph_module.meta.setdefault("custom", {})[DIM_NAMES_META] = {**dim_names(ep), **names}


def names_from_dynamic_shapes(
    ep: torch.export.ExportedProgram, forward: Any, args: tuple, kwargs: Mapping[str, Any], dynamic_shapes: Any
) -> dict[str, str]:
    """{symbol: name} for every dim the user gave a named `torch.export.Dim` (torch names its symbols
    `s77` and keeps no trace of the user's names in the program)."""
    import inspect

    from torch.utils import _pytree as pytree

    if dynamic_shapes is None:
        return {}
    if isinstance(dynamic_shapes, torch.export.ShapesCollection) and hasattr(forward, "__self__"):
        # torch's per-tensor form: ask it for the per-argument one the walk below reads
        try:
            dynamic_shapes = dynamic_shapes.dynamic_shapes(forward.__self__, args, dict(kwargs))
        except Exception:  # torch.export has accepted it already; without names the symbols keep torch's
            return {}
    by_tensor: dict[int, Any] = {}

    def walk(value: Any, spec: Any) -> None:
        if isinstance(value, torch.Tensor):
            by_tensor[id(value)] = spec
        elif isinstance(value, (list, tuple)) and isinstance(spec, (list, tuple)):
            for v, s in zip(value, spec):
                walk(v, s)
        elif isinstance(value, Mapping) and isinstance(spec, Mapping):
            for k, v in value.items():
                walk(v, spec.get(k))

    if isinstance(dynamic_shapes, Mapping):  # keyed by forward's parameter names, as torch.export takes it
        try:
            bound = inspect.signature(forward).bind(*args, **kwargs).arguments
        except (TypeError, ValueError):
            bound = dict(kwargs)
        walk(dict(bound), dynamic_shapes)
    elif isinstance(dynamic_shapes, (list, tuple)):
        walk((*args, *kwargs.values()), tuple(dynamic_shapes))
    leaves = [x for x in pytree.tree_leaves((args, dict(kwargs))) if isinstance(x, torch.Tensor)]
    per_input = []
    for leaf in leaves:
        spec = by_tensor.get(id(leaf))
        items = spec.items() if isinstance(spec, Mapping) else enumerate(spec) if isinstance(spec, (list, tuple)) else ()
        # a named Dim carries its name; Dim.DYNAMIC / AUTO carry none
        per_input.append({d: dim.__name__ for d, dim in items if isinstance(d, int) and isinstance(getattr(dim, "__name__", None), str)})
    return symbol_names(ep, per_input)


_SYMBOL = re.compile(r"s\d+")


def tensor_inputs(ep: torch.export.ExportedProgram) -> list[tuple[torch.fx.Node, torch.Tensor]]:
    """The program's tensor user inputs in graph order: (placeholder, its traced value)."""
    user = set(ep.graph_signature.user_inputs)
    return [(n, v) for n in ep.graph.find_nodes(op="placeholder")
            if n.name in user and isinstance(v := n.meta.get("val"), torch.Tensor)]


def symbol_names(ep: torch.export.ExportedProgram, per_input: Sequence[Mapping[int, str]]) -> dict[str, str]:
    """{torch symbol: name} from {dim: name} per tensor user input, in order (the first name given to a
    symbol wins: dims torch found equal share one symbol)."""
    names: dict[str, str] = {}
    for (_, val), dims in zip(tensor_inputs(ep), per_input):
        for d, name in dims.items():
            if d < val.dim() and _SYMBOL.fullmatch(sym := str(val.shape[d])):
                names.setdefault(sym, name)
    return names


@dataclass(frozen=True)
class DimSpec:
    """One dim: `size` for a static dim, else `name` with `min`/`max` (max None: unbounded)."""

    size: int | None = None
    name: str | None = None
    min: int = 0
    max: int | None = None

    @property
    def dynamic(self) -> bool:
        return self.size is None

    def accepts(self, n: int) -> bool:
        if not self.dynamic:
            return n == self.size
        # as torch.export's own input check: a lower bound of 2 is the tracer's 0/1 specialization
        # (Dim.DYNAMIC, the CLI's --dynamic, records min 2), not the model's, so sizes 0 and 1 pass
        low = self.min if self.min > 2 else 0
        return n >= low and (self.max is None or n <= self.max)

    def example(self) -> int:
        """A size to make an example input with: the lower bound, at least 2 (so the dim still looks
        dynamic to the runtime), capped by the upper bound."""
        if not self.dynamic:
            return self.size  # type: ignore[return-value]
        v = max(self.min, 2)
        return min(v, self.max) if self.max is not None else v

    def describe(self) -> str:
        if not self.dynamic:
            return str(self.size)
        return f"{self.name}[{self.min}..{'' if self.max is None else self.max}]"

    def to_json(self) -> Any:
        return self.size if not self.dynamic else {"name": self.name, "min": self.min, "max": self.max}

    @classmethod
    def from_json(cls, d: Any) -> "DimSpec":
        def whole(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        if whole(d):
            return cls(size=d)
        # the file's bounds reach example sizes (bench) and a server's limits: 0 <= min <= max, as torch records them
        if isinstance(d, dict) and isinstance(d.get("name"), str) and whole(d.get("min")) \
                and (d.get("max") is None or (whole(d.get("max")) and d["max"] >= d["min"])):
            return cls(name=d["name"], min=d["min"], max=d["max"])
        raise ValueError(f"a dim is a size >= 0 or {{name, min, max}} with 0 <= min <= max, got {printable(d)[:80]}")


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str
    shape: tuple[DimSpec, ...]
    #: the values an integer input may hold, [lo, hi], when the program indexes a table with it (token
    #: ids into an embedding); None: not known
    values: tuple[int, int] | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def describe(self) -> str:
        within = "" if self.values is None else f" in [{self.values[0]}, {self.values[1]}]"
        return f"{self.name}: {self.dtype}[{', '.join(d.describe() for d in self.shape)}]{within}"

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "dtype": self.dtype, "shape": [d.to_json() for d in self.shape]}
        if self.values is not None:
            out["values"] = list(self.values)
        return out

    @classmethod
    def from_json(cls, d: Any) -> "InputSpec":
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not isinstance(d.get("dtype"), str) \
                or not isinstance(d.get("shape"), list) or not isinstance(getattr(torch, d["dtype"], None), torch.dtype):
            raise ValueError(f"an input is {{name, dtype, shape}} with a torch dtype name, got {d!r}")
        values = d.get("values")
        if values is not None:
            _check_values(values, getattr(torch, d["dtype"]))
        return cls(d["name"], d["dtype"], tuple(DimSpec.from_json(x) for x in d["shape"]),
                   None if values is None else (values[0], values[1]))


def _check_values(values: Any, dtype: torch.dtype) -> None:
    """ValueError unless `values` is [lo, hi] that `dtype` holds: the file's numbers reach torch.randint
    (bench, verify) and a server's limits, where 2**70 or 300 for a uint8 raised outside qexport's errors."""
    if not _is_integer(dtype):
        raise ValueError(f"an input's values bound an integer input, not a {str(dtype).removeprefix('torch.')} one; "
                         f"got {printable(values)[:80]}")
    info = torch.iinfo(dtype)
    if not (isinstance(values, list) and len(values) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            and info.min <= values[0] <= values[1] <= info.max):
        raise ValueError(f"an input's values are [lo, hi] with {info.min} <= lo <= hi <= {info.max} "
                         f"(what {str(dtype).removeprefix('torch.')} holds), got {printable(values)[:80]}")


def program_inputs(ep: torch.export.ExportedProgram, *, require_tensors: bool = False) -> list[InputSpec]:
    """The program's tensor user inputs in graph order; other inputs are left out, or refused with
    `require_tensors` (what runs an artifact on generated inputs needs tensors)."""
    from .errors import ArtifactError

    user = set(ep.graph_signature.user_inputs)
    names = dim_names(ep)
    ranges = index_ranges(ep)
    out = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        if require_tensors and not isinstance(val, torch.Tensor):
            raise ArtifactError(f"input {node.name} is not a tensor ({type(val).__name__}); verify and bench need tensor inputs")
        if isinstance(val, torch.Tensor):
            out.append(InputSpec(node.name, str(val.dtype).removeprefix("torch."), tuple(_dim(d, ep, names) for d in val.shape),
                                 ranges.get(node.name) if _is_integer(val.dtype) else None))
    return out


def _is_integer(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _aten(*names: str) -> frozenset:
    ops = []
    for n in names:
        packet, _, overload = n.partition(".")
        op = getattr(getattr(torch.ops.aten, packet, None), overload or "default", None)
        if op is not None:
            ops.append(op)
    return frozenset(ops)


#: ops that pass every value of an index through (another shape, same values; not slicing: the part
#: left out may be something else)
_SAME_VALUES = _aten("view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "squeeze.dim", "squeeze.dims",
                     "flatten.using_ints", "clone", "alias", "permute", "transpose.int", "t", "expand", "lift_fresh_copy")


def index_ranges(ep: torch.export.ExportedProgram) -> dict[str, tuple[int, int]]:
    """{user input: [lo, hi]} for integer inputs the program uses as indices into a table of static size
    (an embedding, plain or a quantized region; index_select; indexing), followed through ops that keep
    values. An index outside its table raises in eager torch, is read as counted from the end by
    onnxruntime's Gather, and aborts an AOTI package's process (its bounds check throws inside an
    OpenMP region): recorded so that a server can refuse it first (qexport.serve)."""
    from .regions import iter_region_nodes, region_payload

    bounds: dict[str, tuple[int, int]] = {}  # fx node name -> range its values must lie in

    def bound(node: Any, lo: int, hi: int) -> None:
        if isinstance(node, torch.fx.Node):
            old = bounds.get(node.name, (lo, hi))
            bounds[node.name] = (max(lo, old[0]), min(hi, old[1]))

    def rows(node: Any, dim: int = 0) -> int | None:
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        n = val.shape[dim] if isinstance(val, torch.Tensor) and -val.dim() <= dim < val.dim() else None
        return n if isinstance(n, int) and n > 0 else None

    embedding, index_select, index = _aten("embedding"), _aten("index_select"), _aten("index.Tensor")
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in embedding and (n := rows(node.args[0])):
            bound(node.args[1], 0, n - 1)
        elif node.target in index_select and isinstance(node.args[1], int) and (n := rows(node.args[0], node.args[1])):
            bound(node.args[2], 0, n - 1)
        elif node.target in index:
            for d, idx in enumerate(node.args[1]):
                if idx is not None and (n := rows(node.args[0], d)):
                    bound(idx, -n, n - 1)  # indexing counts negative indices from the end
    for node in iter_region_nodes(ep):
        payload = region_payload(node)
        if payload and payload.op == "embedding" and payload.weight_shape and len(node.args) > 1:
            bound(node.args[1], 0, int(payload.weight_shape[0]) - 1)
    # carry each bound back to the input it comes from (users are visited before their inputs)
    for node in reversed(list(ep.graph.nodes)):
        if node.op == "call_function" and node.target in _SAME_VALUES and node.name in bounds \
                and isinstance(node.args[0], torch.fx.Node):
            bound(node.args[0], *bounds[node.name])
    user = set(ep.graph_signature.user_inputs)
    return {name: r for name, r in bounds.items() if name in user}


def _dim(d: Any, ep: torch.export.ExportedProgram, names: dict[str, str]) -> DimSpec:
    if isinstance(d, int):
        return DimSpec(size=d)
    expr = d.node.expr
    vr = ep.range_constraints.get(expr)
    lo = int(vr.lower) if vr is not None else 0
    try:
        hi = int(vr.upper) if vr is not None else UNBOUNDED
    except (TypeError, ValueError, OverflowError, AttributeError):  # sympy's / torch's infinity
        hi = UNBOUNDED
    return DimSpec(name=names.get(str(expr), str(expr)), min=lo, max=hi)


def check_tensors(specs: Sequence[InputSpec], tensors: Sequence[Any], *, device: str, what: str) -> list[torch.Tensor]:
    """`tensors` checked against the program's inputs, made contiguous where they are not.

    Why: a compiled runtime trusts its caller. An AOTI package reads whatever memory it is handed as
    the dtype, rank and strides it was traced with: a float64 or bfloat16 input gave NaN, a 3-D one for
    a 4-D program garbage of a wrong shape, a transposed view 50 % error, a size outside the exported
    range or a token id past its table undefined behaviour, all without an error (torch 2.13). So every
    refusal here names the input, what it got and what the program takes (UsageError); integer values
    are checked against their table only on the CPU (a device tensor's min/max would sync, and break
    CUDA-graph capture)."""
    from .errors import UsageError

    if len(tensors) != len(specs) or not all(isinstance(x, torch.Tensor) for x in tensors):
        got = ", ".join(type(x).__name__ if not isinstance(x, torch.Tensor) else "Tensor" for x in tensors)
        raise UsageError(f"{what} takes {len(specs)} tensor input(s) ({', '.join(s.describe() for s in specs)}); "
                         f"got {len(tensors)} ({got or 'none'})")
    out = []
    seen: dict[str, tuple[int, str]] = {}  # dynamic dim name -> (size, the input that set it)
    for spec, x in zip(specs, tensors):
        if x.dtype != spec.torch_dtype:
            raise UsageError(f"{what}: input {spec.name} is {str(x.dtype).removeprefix('torch.')}; the program takes "
                             f"{spec.dtype} (convert it first: x.to(torch.{spec.dtype}))")
        if x.device.type != device:
            raise UsageError(f"{what}: input {spec.name} is on {x.device}; the package runs on {device} (x.to({device!r}))")
        if x.dim() != len(spec.shape) or not all(d.accepts(n) for d, n in zip(spec.shape, x.shape)):
            raise UsageError(f"{what}: input {spec.name} has shape {list(x.shape)}, which does not fit {spec.describe()} "
                             f"(static sizes exact, dynamic ones within the bounds the program was exported with)")
        for i, (d, n) in enumerate(zip(spec.shape, x.shape)):
            if d.dynamic and (first := seen.setdefault(d.name, (n, spec.name)))[0] != n:
                raise UsageError(f"{what}: input {spec.name}'s dim {i} ({d.name}) is {n} where input {first[1]}'s is "
                                 f"{first[0]}; the program was compiled for equal sizes there")
        if spec.values is not None and x.device.type == "cpu" and x.numel():
            lo, hi = int(x.min()), int(x.max())
            if lo < spec.values[0] or hi > spec.values[1]:
                raise UsageError(f"{what}: input {spec.name} holds {lo if lo < spec.values[0] else hi}, outside "
                                 f"[{spec.values[0]}, {spec.values[1]}] (the rows of the table it indexes)")
        out.append(x if x.is_contiguous() else x.contiguous())
    return out
