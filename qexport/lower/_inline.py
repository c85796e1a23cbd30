"""Inline regions into their parent graph: the step every backend that cannot execute the
`invoke_quant_packed` HOP itself needs (ExecuTorch, ONNX).

Why: EXIR's ATen->Edge replacement does not enter HOP subgraphs ("aten.div.Tensor is not an Edge
operator") and `.to_executorch()` has no schema for the HOP; a delegate that takes the whole HOP needs a
C++ backend that does not exist. So each region is replaced, in place, by ordinary nodes.

What replaces a region is decided by a backend's `lower(site)` callback from the region's scheme
(`site.region.scheme`, operands by role): it emits nodes through `site.call(...)` and returns the node
that stands for the region's output, or calls `site.inline_reference()` to copy the region's own
subgraph (the scheme's reference math, already decomposed by export). Every emitted node is tagged
`meta["custom"] = {"region": <name>, "scheme": <scheme name>}`; torch.export keeps `custom` meta through
retracing and decompositions (so through `to_edge`), which is how a backend later reports what
happened to each region.

    changed = inline_regions(ep, lower, make_constant=...)
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, Iterator

import torch
from torch._guards import detect_fake_mode
from torch.utils import _pytree as pytree

from ..errors import LoweringError
from ..regions import Region, iter_region_nodes, read_region

#: meta["custom"] key every node emitted for a region carries
REGION_TAG = "region"
SCHEME_TAG = "scheme"

ConstantFactory = Callable[[torch.export.ExportedProgram, torch.fx.Graph, str, torch.Tensor], torch.fx.Node]


class RegionSite:
    """One region being replaced: its record, its operands (by role) and a way to emit nodes in its place."""

    def __init__(
        self,
        ep: torch.export.ExportedProgram,
        node: torch.fx.Node,
        region: Region,
        make_constant: ConstantFactory | None,
    ) -> None:
        self.ep = ep
        self.graph = ep.graph_module.graph
        self.node = node
        self.region = region
        self.operands: dict[str, torch.fx.Node] = dict(zip(region.roles, node.args[1:]))
        self.tag = {REGION_TAG: region.name, SCHEME_TAG: region.scheme_name}
        self._make_constant = make_constant
        self._fake_mode = detect_fake_mode([n.meta.get("val") for n in self.graph.nodes if n.op == "placeholder"])
        self._emitted: list[torch.fx.Node] = []
        self._anchor = node

    # -- reading ----------------------------------------------------------------------------
    @property
    def input(self) -> torch.fx.Node:
        return self.operands[self.region.roles[0]]

    def has(self, role: str) -> bool:
        return role in self.operands

    def value(self, role: str) -> torch.Tensor:
        """The real tensor behind a constant operand (a buffer, parameter or lifted constant)."""
        return self.value_of(self.operands[role], role)

    def value_of(self, node: torch.fx.Node, role: str = "") -> torch.Tensor:
        sig = self.ep.graph_signature
        for table, store in (
            (sig.inputs_to_buffers, self.ep.state_dict),
            (sig.inputs_to_parameters, self.ep.state_dict),
            (sig.inputs_to_lifted_tensor_constants, self.ep.constants),
        ):
            if node.name in table:
                fqn = table[node.name]
                return (store.get(fqn) if fqn in store else self.ep.constants[fqn]).detach()
        raise LoweringError(
            f"region {self.region.name}: operand {role or node.name!r} ({node.name}) is not a constant of the program; "
            f"this backend needs the region's quantized tensors as buffers (export the quantized model with qexport.export)"
        )

    # -- emitting ---------------------------------------------------------------------------
    def call(self, target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        """Emit `target(*args, **kwargs)` before the region node (or the node given to `before`), with
        meta["val"] computed under the program's fake mode (what export itself records) and the region tag."""
        with self.graph.inserting_before(self._anchor):
            out = self.graph.call_function(target, args, kwargs)
        fake_args, fake_kwargs = pytree.tree_map_only(torch.fx.Node, lambda n: n.meta["val"], (args, kwargs))
        with self._fake_mode:
            out.meta["val"] = target(*fake_args, **fake_kwargs)
        self._stamp(out)
        return out

    @contextlib.contextmanager
    def before(self, node: torch.fx.Node) -> Iterator[None]:
        """Emit at `node` instead (to rewrite nodes `inline_reference` already copied)."""
        previous, self._anchor = self._anchor, node
        try:
            yield
        finally:
            self._anchor = previous

    @property
    def emitted(self) -> list[torch.fx.Node]:
        """The nodes emitted for this region so far (emission order), erased ones left out."""
        return [n for n in self._emitted if not n._erased]

    def constant(self, name: str, tensor: torch.Tensor) -> torch.fx.Node:
        """A new constant input of the program (e.g. a zero-point tensor a kernel pattern requires)."""
        if self._make_constant is None:
            raise LoweringError(f"region {self.region.name}: this backend did not provide a way to add constants")
        first = next(n for n in self.graph.nodes if n.op == "placeholder")
        with self.graph.inserting_before(first):
            node = self._make_constant(self.ep, self.graph, name, tensor)
        return node

    def inline_reference(self) -> torch.fx.Node:
        """Copy the region's own subgraph (its scheme's reference math) in place of the region."""
        sub = getattr(self.ep.graph_module, self.node.args[0].target)
        outs = self._copy_in(sub.graph, self.node.args[1:], self.node)
        if not isinstance(outs, (tuple, list)) or len(outs) != 1:
            raise LoweringError(f"region {self.region.name}: only single-output regions can be inlined, got {outs!r}")
        return outs[0]

    def trace(self, fn: Callable[..., Any], *args: torch.fx.Node) -> Any:
        """Emit what `fn(*args)` computes: traced by make_fx on the arguments' fake values, its nodes
        copied in place (e.g. a scheme's own `dequantize_weight` applied to other tensors)."""
        from torch.fx.experimental.proxy_tensor import make_fx

        with self._fake_mode:
            gm = make_fx(fn)(*(a.meta["val"] for a in args))
        constants_error = f"region {self.region.name}: {fn} created a constant while traced; pass it as an argument"
        return self._copy_in(gm.graph, args, self._anchor, constants_error)

    def _copy_in(self, src: torch.fx.Graph, args: Any, before: torch.fx.Node, constants_error: str | None = None) -> Any:
        """Copy `src`'s nodes, its placeholders bound to `args`, in front of `before`, each stamped;
        returns `src`'s output in terms of the copies. `constants_error`: refuse get_attr nodes with it."""
        env: dict[torch.fx.Node, Any] = dict(zip((n for n in src.nodes if n.op == "placeholder"), args))
        for n in src.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                return pytree.tree_map_only(torch.fx.Node, lambda a: env[a], n.args[0])
            if n.op == "get_attr" and constants_error:
                raise LoweringError(constants_error)
            with self.graph.inserting_before(before):
                copied = self.graph.node_copy(n, lambda a: env[a])
            self._stamp(copied)
            env[n] = copied
        return None

    def _stamp(self, node: torch.fx.Node) -> None:
        node.meta["custom"] = {**node.meta.get("custom", {}), **self.tag}
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in self.node.meta and key not in node.meta:
                node.meta[key] = self.node.meta[key]
        self._emitted.append(node)


LowerFn = Callable[[RegionSite], torch.fx.Node]


def _reference(site: RegionSite) -> torch.fx.Node:
    return site.inline_reference()


def inline_regions(
    ep: torch.export.ExportedProgram,
    lower: LowerFn | None = None,
    *,
    make_constant: ConstantFactory | None = None,
) -> bool:
    """Replace every region of `ep` (in place) by the nodes `lower(site)` emits (default: the region's
    own subgraph). Returns whether the graph changed."""
    lower = lower or _reference
    gm = ep.graph_module
    nodes = list(iter_region_nodes(ep))
    for index, node in enumerate(nodes):
        region = read_region(node, index)
        getitems = list(node.users)
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in getitems):
            raise LoweringError(
                f"region {region.name}: only `getitem(region, 0)` users can be inlined, found "
                f"{[u.format_node() for u in getitems]}"
            )
        site = RegionSite(ep, node, region, make_constant)
        out = lower(site)
        for g in getitems:
            g.replace_all_uses_with(out)
            gm.graph.erase_node(g)
        subgraph_attr = node.args[0]
        gm.graph.erase_node(node)
        if isinstance(subgraph_attr, torch.fx.Node) and not subgraph_attr.users:
            target = subgraph_attr.target
            gm.graph.erase_node(subgraph_attr)
            if hasattr(gm, target):
                delattr(gm, target)
    if nodes:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return bool(nodes)


def region_of(node: torch.fx.Node) -> str | None:
    """The region a node was emitted for (read back after later passes), or None."""
    custom = node.meta.get("custom")
    return custom.get(REGION_TAG) if isinstance(custom, dict) else None
