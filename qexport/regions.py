"""Quantized regions: `invoke_quant` (author a region) and `regions(ep)` (read them back).

In a graph a region is one node

    invoke_quant_packed(subgraph, input, *tensors, scheme="<name>", quant_options={
        "codegen_low_precision": True,
        "qexport": RegionPayload(...).to_dict()})

followed by `getitem(node, 0)`. `scheme` stays the bare name so Inductor patterns written as
`invoke_quant(..., scheme="nf4")` keep matching; the full scheme and what backends need to lower the
region (op, roles of the operands, its unique name) travel in `quant_options` as a `RegionPayload`
dict, which torch's serde stores as JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch._higher_order_ops import invoke_quant_packed
from torch.export.graph_signature import InputKind

from . import _upstream
from .errors import RegionFormatError, UnsupportedVersionError
from .schemes import Scheme, get as get_scheme

#: (major, minor) of `RegionPayload`'s dict, after torch.export serde's rule: a new optional field
#: bumps the minor (older readers ignore it), anything else bumps the major (older readers refuse it).
#: 1.1 added `name`. Files of format 1.0 (no "format_minor") read as they always did.
REGION_FORMAT = (1, 1)
PAYLOAD_KEY = "qexport"

HOP_TARGETS = (torch.ops.higher_order.invoke_quant_packed, torch.ops.higher_order.invoke_quant)

_upstream.install()  # every stage imports this module: torch gets its two additions before any region exists


def invoke_quant(
    fn: Callable[..., Any],
    *args: Any,
    scheme: "str | Scheme",
    codegen_low_precision: bool = True,
    op: str = "custom",
    op_params: Mapping[str, Any] | None = None,
    module: str = "",
    roles: Sequence[str] | None = None,
    weight_shape: Sequence[int] | None = None,
) -> Any:
    """Run `fn(*args)` as one quantized region.

    Eager: calls `fn`. Under torch.export (strict or not) and torch.compile: emits exactly one
    `invoke_quant_packed` HOP carrying the scheme's name, its full parameters and the InvokeQuant
    options. `fn` may return a tensor or a tuple of tensors; the caller gets the same structure back.
    The keyword arguments after `codegen_low_precision` describe the region for backends; quantized
    modules fill them in, hand-written regions can leave them (`op="custom"`).
    """
    resolved = get_scheme(scheme)
    if not torch.compiler.is_compiling():
        return fn(*args)
    payload = RegionPayload(
        scheme=resolved,
        op=op,
        op_params=dict(op_params or {}),
        module=module,
        roles=tuple(roles) if roles is not None else tuple(f"arg{i}" for i in range(len(args))),
        weight_shape=tuple(weight_shape) if weight_shape is not None else None,
    )
    quant_options = {"codegen_low_precision": bool(codegen_low_precision), PAYLOAD_KEY: payload.to_dict()}
    kwargs = {"scheme": resolved.name, "quant_options": quant_options}
    if torch.compiler.is_dynamo_compiling():
        # Dynamo already normalises the subgraph's output to a tuple in the graph and hands the
        # caller fn's own structure back.
        return invoke_quant_packed(fn, *args, **kwargs)
    # make_fx (non-strict export, aot_autograd) keeps a bare-tensor output as a bare-tensor HOP, which
    # AOTInductor's pattern matcher cannot handle (KeyError 'example_value'): always return a tuple.
    returned_tuple: list[bool] = []

    def as_tuple(*xs: Any) -> tuple:
        out = fn(*xs)
        returned_tuple.append(isinstance(out, tuple))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    out = invoke_quant_packed(as_tuple, *args, **kwargs)
    return out if returned_tuple and returned_tuple[0] else out[0]


@dataclass(frozen=True)
class RegionPayload:
    """What a region node carries for backends (`quant_options["qexport"]`), as a versioned record.

    `name` is the region's unique name in its program (`name_regions` stamps it at export): the
    module path, with `_1`, `_2`, ... for the second and later calls of a module used more than once.
    """

    scheme: Scheme
    op: str = "custom"
    op_params: Mapping[str, Any] = field(default_factory=dict)
    module: str = ""
    roles: tuple[str, ...] = ()
    weight_shape: tuple[int, ...] | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe dict stored in the graph (format 1.0 readers read it too)."""
        return {
            "format": REGION_FORMAT[0],
            "format_minor": REGION_FORMAT[1],
            "scheme": self.scheme.to_dict(),
            "op": self.op,
            "op_params": dict(self.op_params),
            "module": self.module,
            "roles": list(self.roles),
            "weight_shape": list(self.weight_shape) if self.weight_shape is not None else None,
            **({"name": self.name} if self.name is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "a region") -> "RegionPayload":
        """Read a payload dict of any 1.x format; a newer major is refused, naming both versions."""
        if not isinstance(data, Mapping) or not isinstance(data.get("format"), int) or "scheme" not in data:
            raise RegionFormatError(f"{where}: malformed qexport payload {data!r}")
        major, minor = data["format"], data.get("format_minor", 0)
        if major > REGION_FORMAT[0]:
            raise UnsupportedVersionError(
                f"{where} uses region format {major}.{minor}; this qexport reads format {REGION_FORMAT[0]}.x: "
                f"upgrade qexport"
            )
        try:
            # fields a newer minor added are left out: they are optional by the bump rule
            known = {f.name: data[f.name] for f in fields(cls) if f.name in data}
            known["scheme"] = Scheme.from_dict(data["scheme"])
            known["roles"] = tuple(known.get("roles", ()))
            if known.get("weight_shape") is not None:
                known["weight_shape"] = tuple(int(d) for d in known["weight_shape"])
            known["op_params"] = dict(known.get("op_params") or {})
            return cls(**known)
        except (TypeError, ValueError) as e:
            raise RegionFormatError(f"{where}: malformed qexport payload ({e})") from None

    def replace(self, **changes: Any) -> "RegionPayload":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Region:
    """One quantized region of a graph, read from the graph alone."""

    name: str
    scheme: Scheme | None
    scheme_name: str
    module_path: str
    op: str
    op_params: dict[str, Any]
    roles: tuple[str, ...]
    input_shapes: tuple[tuple[int | str, ...], ...]
    input_dtypes: tuple[str, ...]
    output_shapes: tuple[tuple[int | str, ...], ...]
    output_dtypes: tuple[str, ...]
    codegen_low_precision: bool
    node_name: str
    weight_shape: tuple[int, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def tensor_roles(self) -> dict[str, int]:
        """role -> position among the HOP's operands (0 is the activation input)."""
        return {r: i for i, r in enumerate(self.roles)}


def is_region_node(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in HOP_TARGETS


def region_payload(node: torch.fx.Node) -> RegionPayload | None:
    """The qexport payload of a region node (None for a region written with upstream's API)."""
    opts = node.kwargs.get("quant_options")
    payload = opts.get(PAYLOAD_KEY) if isinstance(opts, dict) else None
    if payload is None:
        return None
    return RegionPayload.from_dict(payload, f"region node {node.name}")


def set_region_payload(node: torch.fx.Node, payload: RegionPayload) -> None:
    """Store `payload` in a region node (the node's other options are kept)."""
    opts = node.kwargs.get("quant_options")
    node.kwargs = {**node.kwargs, "quant_options": {**(opts if isinstance(opts, dict) else {}), PAYLOAD_KEY: payload.to_dict()}}


def tensor_shape(t: Any) -> tuple[int | str, ...]:
    """A tensor's shape as a manifest records it: ints, and symbol names for dynamic dims."""
    return tuple(int(d) if isinstance(d, int) or (hasattr(d, "node") and d.node.is_constant()) else str(d) for d in t.shape)


def _vals(v: Any) -> list[Any]:
    if isinstance(v, (tuple, list)):
        return [x for x in v if isinstance(x, torch.Tensor)]
    return [v] if isinstance(v, torch.Tensor) else []


def _graph_module(program: Any) -> torch.fx.GraphModule:
    if isinstance(program, torch.export.ExportedProgram):
        return program.graph_module
    if isinstance(program, torch.fx.GraphModule):
        return program
    from .errors import QExportError

    raise QExportError(f"regions() takes an ExportedProgram or GraphModule, got {type(program).__name__}")


def iter_region_nodes(program: Any) -> Iterator[torch.fx.Node]:
    yield from (n for n in _graph_module(program).graph.nodes if is_region_node(n))


def read_region(node: torch.fx.Node, index: int, name: str | None = None) -> Region:
    """The record of one region node; `name` (default: its payload's name, module path or
    `region_<index>`) is what `region_nodes` makes unique across the program."""
    payload = region_payload(node)
    scheme_name = node.kwargs.get("scheme")
    scheme: Scheme | None
    if payload is not None:
        scheme = payload.scheme
    else:
        try:
            scheme = get_scheme(scheme_name) if isinstance(scheme_name, str) else None
        except Exception:  # a scheme name qexport does not know (upstream's own use of the HOP)
            scheme = None
    opts = node.kwargs.get("quant_options")
    clp = opts.get("codegen_low_precision", True) if isinstance(opts, dict) else True
    operands = node.args[1:]
    ins = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in operands]
    outs = _vals(node.meta.get("val"))
    module = payload.module if payload else ""
    roles = payload.roles if payload else tuple(f"arg{i}" for i in range(len(operands)))
    return Region(
        name=name or _base_name(payload, index),
        scheme=scheme,
        scheme_name=str(scheme_name) if scheme_name is not None else (scheme.name if scheme else "?"),
        module_path=module,
        op=payload.op if payload else "custom",
        op_params=dict(payload.op_params) if payload else {},
        roles=roles,
        input_shapes=tuple(tensor_shape(v) for v in ins if isinstance(v, torch.Tensor)),
        input_dtypes=tuple(str(v.dtype).removeprefix("torch.") for v in ins if isinstance(v, torch.Tensor)),
        output_shapes=tuple(tensor_shape(v) for v in outs),
        output_dtypes=tuple(str(v.dtype).removeprefix("torch.") for v in outs),
        codegen_low_precision=bool(clp),
        node_name=node.name,
        weight_shape=payload.weight_shape if payload and payload.weight_shape else None,
    )


def _base_name(payload: RegionPayload | None, index: int) -> str:
    return (payload.name or payload.module if payload else "") or f"region_{index}"


def region_nodes(program: Any) -> list[tuple[torch.fx.Node, Region]]:
    """Every region node of a program with its record, in graph order, names unique.

    Names key plans and reports in every backend. A module called twice is two regions of one
    module path: the first keeps the path as its name, later ones get `_1`, `_2`, ... (the first
    free suffix, in graph order, so the same program always gets the same names).
    """
    out, taken = [], set()
    for index, node in enumerate(iter_region_nodes(program)):
        base = _base_name(region_payload(node), index)
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        out.append((node, read_region(node, index, name)))
    return out


#: the input kinds that are program state (what `operand_state` answers for)
STATE_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def operand_state(ep: torch.export.ExportedProgram, operand: Any) -> tuple[str, torch.Tensor] | None:
    """`(fqn, tensor)` when `operand` (a node of `ep`'s graph) is one of its parameters, buffers or
    lifted constants, else None (a user input, a computed value). Followed through the signature, so
    a tied weight answers with the name the graph reads it under."""
    name = getattr(operand, "name", None)
    spec = next((s for s in ep.graph_signature.input_specs if getattr(s.arg, "name", None) == name), None)
    if spec is None or spec.kind not in STATE_KINDS:
        return None
    store = ep.state_dict if spec.target in ep.state_dict else ep.constants
    return spec.target, store[spec.target]


def storage_key(t: torch.Tensor) -> Any:
    """What identifies a tensor's bytes: the tensors of one tied weight, lifted under several names, share
    it (one object in the program export made, two sharing storage in one torch.export.load read back)."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # no storage (a fake or wrapper tensor): its own bytes
        return id(t)
    return (t.device.type, ptr, t.storage_offset(), t.nbytes) if ptr else id(t)


def regions(program: Any) -> list[Region]:
    """The quantized regions of an ExportedProgram (or GraphModule), in graph order."""
    return [region for _, region in region_nodes(program)]
