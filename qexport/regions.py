"""Quantized regions: `invoke_quant` (author a region) and `regions(ep)` (read them back).

In a graph a region is one node

    invoke_quant_packed(subgraph, input, *tensors, scheme="<name>", quant_options={
        "codegen_low_precision": True,
        "qexport": {"format": 1, "scheme": {...Scheme.to_dict()...}, "op": "linear",
                    "op_params": {...}, "module": "encoder.0.fc1", "roles": ["input", "weight", ...],
                    "weight_shape": [out, in]}})

followed by `getitem(node, 0)`. `scheme` stays the bare name so Inductor patterns written as
`invoke_quant(..., scheme="nf4")` keep matching; the full scheme and what backends need to lower the
region (op, roles of the operands) travel in `quant_options`, which torch's serde stores as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch._higher_order_ops import invoke_quant_packed

from . import _upstream
from .errors import RegionFormatError, UnsupportedVersionError
from .schemes import Scheme, get as get_scheme

REGION_FORMAT = 1
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
    quant_options = {
        "codegen_low_precision": bool(codegen_low_precision),
        PAYLOAD_KEY: {
            "format": REGION_FORMAT,
            "scheme": resolved.to_dict(),
            "op": op,
            "op_params": dict(op_params or {}),
            "module": module,
            "roles": list(roles) if roles is not None else [f"arg{i}" for i in range(len(args))],
            "weight_shape": list(weight_shape) if weight_shape is not None else None,
        },
    }
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


def region_payload(node: torch.fx.Node) -> dict[str, Any] | None:
    """The qexport payload of a region node (None for a region written with upstream's API)."""
    opts = node.kwargs.get("quant_options")
    payload = opts.get(PAYLOAD_KEY) if isinstance(opts, dict) else None
    if payload is None:
        return None
    if not isinstance(payload, dict) or "format" not in payload:
        raise RegionFormatError(f"region node {node.name}: malformed qexport payload {payload!r}")
    if payload["format"] > REGION_FORMAT:
        raise UnsupportedVersionError(
            f"region node {node.name} uses region format {payload['format']}; this qexport reads up to "
            f"{REGION_FORMAT}: upgrade qexport"
        )
    return payload


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


def read_region(node: torch.fx.Node, index: int) -> Region:
    payload = region_payload(node)
    scheme_name = node.kwargs.get("scheme")
    scheme: Scheme | None
    if payload is not None:
        scheme = Scheme.from_dict(payload["scheme"])
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
    module = payload["module"] if payload else ""
    roles = tuple(payload["roles"]) if payload else tuple(f"arg{i}" for i in range(len(operands)))
    return Region(
        name=module or f"region_{index}",
        scheme=scheme,
        scheme_name=str(scheme_name) if scheme_name is not None else (scheme.name if scheme else "?"),
        module_path=module,
        op=payload["op"] if payload else "custom",
        op_params=dict(payload["op_params"]) if payload else {},
        roles=roles,
        input_shapes=tuple(tensor_shape(v) for v in ins if isinstance(v, torch.Tensor)),
        input_dtypes=tuple(str(v.dtype).removeprefix("torch.") for v in ins if isinstance(v, torch.Tensor)),
        output_shapes=tuple(tensor_shape(v) for v in outs),
        output_dtypes=tuple(str(v.dtype).removeprefix("torch.") for v in outs),
        codegen_low_precision=bool(clp),
        node_name=node.name,
        weight_shape=tuple(payload["weight_shape"]) if payload and payload.get("weight_shape") else None,
    )


def regions(program: Any) -> list[Region]:
    """The quantized regions of an ExportedProgram (or GraphModule), in graph order."""
    return [read_region(n, i) for i, n in enumerate(iter_region_nodes(program))]
