"""Scheme-aware kernels: a table, per (scheme, device, op), from a region to the best kernel.

Upstream Inductor inlines an `invoke_quant` region and ignores its scheme, so every quantized model
compiles into generic dequantize-then-matmul code (70x slower than the right kernel on CPU, see
FINDINGS.md). This table is where a scheme picks its kernel before Inductor runs.

The table is the backend contract's registry (`qexport.lower._contract`) on backends `aoti-cpu` and
`aoti-cuda`; `register_kernel` registers a `choose` function there. Registering a kernel (one module
per device: `cpu.py`, `cuda.py`; imported the first time the device's backend is asked about)::

    @register_kernel("int8_weight_only", "cpu", "linear")      # a scheme name or a family name
    def int8pack(ctx: KernelContext) -> KernelChoice | Decline:
        if ctx.input_dtype not in (torch.float32, torch.bfloat16):
            return Decline("int8pack_mm needs float activations")
        scale = ctx.tensor("weight_scale").to(torch.bfloat16)           # repacked once, here
        return KernelChoice(
            name="aten._weight_int8pack_mm",
            why="bf16 activations (the scheme's compute dtype)",
            body=lambda x, w, s, *b: ...,                                # ordinary aten / custom ops
            operands=("weight", ("weight_scale_bf16", scale), *ctx.optional("bias")),
        )

`choose(ctx)` returns a `KernelChoice` (take the region: the region's RegionPlan is taken, its kernel
the choice's name, its reason `why`, its details the choice's), a `Decline(reason)` or None (let the
next registered kernel, then Inductor's own fusion of the region, take it). Candidates are tried in
registration order, scheme-name entries before family entries.

A `KernelChoice` says what replaces the region: `body(input, *operands)` is traced with make_fx
over the region's fake values (so dynamic dims stay symbolic) and its nodes replace the region's
`invoke_quant_packed` + `getitem` in the parent graph. Each operand is either a role of the region
(its existing buffer) or `(suffix, tensor)`: a tensor computed at compile time (a repacked weight)
that becomes a buffer `<module>.<suffix>` of the rewritten program, so it is a constant of the
compiled package and never recomputed per call. Buffers no longer used by any node are dropped.
Every node copied in is tagged `meta["custom"]["qexport_region"] = {"module", "scheme", "kernel"}`.

A kernel's numerics must stay within `math_for(scheme).tolerance` of the scheme's reference math
(the region body); backends test that per scheme and device.
"""

from __future__ import annotations

import copy
import importlib
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch._guards import detect_fake_mode
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument
from torch.fx.experimental.proxy_tensor import make_fx

from ...errors import LoweringError
from ...regions import Region, iter_region_nodes
from .._contract import (
    Decline, PlanContext, RegionPlan, get_backend, plan_regions, register_backend, register_lowering, unclaimed_reason,
    unregister_lowering,
)

__all__ = [
    "Decline", "KernelChoice", "KernelContext", "apply_kernels", "inductor_options_for", "register_kernel",
    "unregister_kernel",
]

Operand = Union[str, tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class KernelChoice:
    """What replaces a region: `body(input, *operands) -> output`, built from ordinary ops."""

    name: str
    why: str
    body: Callable[..., torch.Tensor]
    operands: Sequence[Operand] = ()
    #: JSON-safe facts about the choice for the package's manifest (e.g. a row-bucket plan and its ISA)
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class KernelContext(PlanContext):
    """A PlanContext on an AOTI device, with the region's real tensors (to repack them)."""

    @property
    def device(self) -> str:
        return self.backend.removeprefix("aoti-")

    def tensor(self, role: str) -> torch.Tensor:
        """The real tensor behind a role (a buffer, parameter or constant of the program)."""
        arg = self.node.args[1 + self.region.roles.index(role)]
        return _real_tensor(self.program, arg)


Choose = Callable[[KernelContext], "KernelChoice | Decline | None"]


def _inductor_fuses(ctx: PlanContext, reasons: list[str], registered: bool) -> RegionPlan:
    return RegionPlan(taken=False, kernel="inductor", reason=unclaimed_reason(ctx, reasons, registered) + "; Inductor fuses the region")


for _device in ("cpu", "cuda"):
    register_backend(f"aoti-{_device}", title=f"AOTInductor {_device.upper()}", fallback=_inductor_fuses,
                     context=KernelContext, plans_anywhere=_device == "cpu")


def register_kernel(scheme_or_family: str, device: str, op: str, choose: Choose | None = None, *, name: str | None = None):
    """`register_lowering` on backend `aoti-<device>` ("cpu"/"cuda") for a `choose` function that
    returns the KernelChoice that replaces the region. Usable as a decorator."""

    def add(fn: Choose) -> Choose:
        def plan(ctx: KernelContext) -> RegionPlan | Decline | None:
            r = fn(ctx)
            if isinstance(r, KernelChoice):
                return RegionPlan(taken=True, kernel=r.name, reason=r.why, details=dict(r.details), lowering=r)
            return r

        register_lowering(scheme_or_family, f"aoti-{device}", op, plan, name=name or getattr(fn, "__name__", repr(fn)))
        return fn

    return add(choose) if choose is not None else add


def unregister_kernel(scheme_or_family: str, device: str, op: str, name: str) -> None:
    unregister_lowering(scheme_or_family, f"aoti-{device}", op, name)


def inductor_options_for(device: str) -> dict[str, Any]:
    """Inductor configs a device's kernels rely on (its module's `INDUCTOR_OPTIONS`, e.g. coordinate
    descent tuning for CUDA GEMVs); `compile` puts the caller's options over them."""
    get_backend(f"aoti-{device}")
    table = importlib.import_module(f"{__name__}.{device}")
    return dict(getattr(table, "INDUCTOR_OPTIONS", {}))


def apply_kernels(
    program: torch.export.ExportedProgram, device: str, options: Mapping[str, Any] | None = None
) -> tuple[torch.export.ExportedProgram, list[RegionPlan]]:
    """Replace each region a kernel takes by that kernel; returns a new program and the plans.

    Regions nobody takes stay `invoke_quant_packed` (Inductor fuses them). `program` is not changed.
    """
    ep = _copy_program(program)
    nodes = list(iter_region_nodes(ep))
    plans = plan_regions(ep, f"aoti-{device}", options)
    taken = [(n, p) for n, p in zip(nodes, plans) if p.taken]
    for node, p in taken:
        _replace_region(ep, node, p.region, p.lowering)
    if taken:
        _drop_unused_state(ep)
        ep.graph_module.graph.lint()
        ep.graph_module.recompile()
    return ep, plans


# -- program surgery ------------------------------------------------------------------------

def _copy_program(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """A copy whose graph can be rewritten; tensors are shared (rewrites add or drop state, never mutate it)."""
    gm = copy.deepcopy(ep.graph_module)
    sig = copy.deepcopy(ep.graph_signature)
    # Copying a graph re-derives node names and avoids Python builtins, so nn.Sequential's input
    # `input` becomes `input_1`; the signature must follow or the verifier rejects the program.
    renamed = {a.name: b.name for a, b in zip(ep.graph.nodes, gm.graph.nodes) if a.name != b.name}
    for spec in (*sig.input_specs, *sig.output_specs):
        if getattr(spec.arg, "name", None) in renamed:
            spec.arg = type(spec.arg)(renamed[spec.arg.name])
    return ep._update(gm, sig, state_dict=dict(ep.state_dict), constants=dict(ep.constants))


def _real_tensor(ep: torch.export.ExportedProgram, arg: Any) -> torch.Tensor:
    spec = next((s for s in ep.graph_signature.input_specs if getattr(s.arg, "name", None) == getattr(arg, "name", None)), None)
    if spec is None or spec.kind == InputKind.USER_INPUT:
        raise LoweringError(f"operand {arg} of a region is not a buffer, parameter or constant of the program")
    if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in ep.state_dict:
        return ep.state_dict[spec.target]
    return ep.constants[spec.target]


def _add_buffer(ep: torch.export.ExportedProgram, fqn: str, tensor: torch.Tensor, fake_mode) -> torch.fx.Node:
    """A new persistent buffer placeholder, placed after the existing state (placeholders and
    input_specs must stay in the same order)."""
    graph = ep.graph_module.graph
    specs = list(ep.graph_signature.input_specs)
    first_user = next((i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT), len(specs))
    placeholders = list(graph.find_nodes(op="placeholder"))
    name = "b_" + fqn.replace(".", "_")
    if first_user < len(placeholders):
        ctx = graph.inserting_before(placeholders[first_user])
    else:
        ctx = graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(next(iter(graph.nodes)))
    with ctx:
        ph = graph.placeholder(name)
    ph.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
    specs.insert(first_user, InputSpec(InputKind.BUFFER, TensorArgument(ph.name), target=fqn, persistent=True))
    ep.graph_signature.input_specs[:] = specs
    ep.state_dict[fqn] = tensor
    return ph


def _replace_region(ep: torch.export.ExportedProgram, node: torch.fx.Node, region: Region, choice: KernelChoice) -> None:
    graph = ep.graph_module.graph
    operand_vals = [a.meta["val"] for a in node.args[1:]]
    fake_mode = detect_fake_mode(operand_vals)
    args: list[torch.fx.Node] = [node.args[1]]
    for op in choice.operands:
        if isinstance(op, str):
            if op not in region.roles:
                raise LoweringError(f"kernel {choice.name} for {region.name} asks for role {op!r}; the region has {list(region.roles)}")
            args.append(node.args[1 + region.roles.index(op)])
        else:
            suffix, tensor = op
            prefix = f"{region.module_path}." if region.module_path else f"{region.name}."
            args.append(_add_buffer(ep, prefix + suffix, tensor, fake_mode))
    with fake_mode:
        traced = make_fx(choice.body, tracing_mode="real")(*(a.meta["val"] for a in args))
    fold_static_cond_operands(traced)
    # graph_copy copies get_attr nodes but not what they name: a body with control flow (torch.cond's
    # branch graphs) needs its submodules moved into the program. Every one, nested too, gets a name
    # unique in the program: make_fx names each level's branches true_graph_0/false_graph_0, and
    # AOTInductor generates one function per subgraph name, so nested branches of the same name
    # silently ran one another's code (seen on CUDA: the M=4096 branch ran the M<=16 kernel).
    for i, (mod, attr) in enumerate(
        (m, a) for m in list(traced.modules()) if isinstance(m, torch.fx.GraphModule) for a in m.graph.find_nodes(op="get_attr")
    ):
        fresh = f"{attr.target}_{region.node_name}_{i}"
        sub = getattr(mod, attr.target)
        setattr(ep.graph_module if mod is traced else mod, fresh, sub)
        if mod is not traced:
            delattr(mod, attr.target)
        attr.target = fresh
    for mod in traced.modules():
        if isinstance(mod, torch.fx.GraphModule):
            mod.recompile()
    getitems = [u for u in node.users if u.target is operator.getitem]
    if len(getitems) != len(node.users) or any(g.args[1] != 0 for g in getitems):
        raise LoweringError(f"region {region.name}: kernels replace single-output regions only")
    tag = {"module": region.module_path, "scheme": region.scheme.name if region.scheme else region.scheme_name, "kernel": choice.name}
    with graph.inserting_before(node):
        val_map = dict(zip(traced.graph.find_nodes(op="placeholder"), args))
        out = graph.graph_copy(traced.graph, val_map)
        for new in list(val_map.values()):
            if new not in args:
                custom = dict(new.meta.get("custom") or {})
                custom["qexport_region"] = tag
                new.meta["custom"] = custom
                new.meta.setdefault("stack_trace", node.meta.get("stack_trace"))
    out = out[0] if isinstance(out, (tuple, list)) else out
    for g in getitems:
        for spec in ep.graph_signature.output_specs:
            if getattr(spec.arg, "name", None) == g.name:
                spec.arg = TensorArgument(out.name)
        g.replace_all_uses_with(out)
        graph.erase_node(g)
    sub = node.args[0]
    graph.erase_node(node)
    if sub.op == "get_attr" and not sub.users:
        target = sub.target
        graph.erase_node(sub)
        if hasattr(ep.graph_module, target):
            delattr(ep.graph_module, target)


def fold_static_cond_operands(gm: torch.fx.GraphModule) -> bool:
    """Bake the Python-int operands make_fx gives `torch.cond` (sizes that are static) into its branches.

    Why: Inductor's cond lowering (torch 2.11, `ir.Conditional.create`) asserts that every operand is
    a graph node and fails the AOTI compile otherwise.
    """
    changed = False
    for mod in list(gm.modules()):
        if not isinstance(mod, torch.fx.GraphModule):
            continue
        for node in mod.graph.find_nodes(op="call_function", target=torch.ops.higher_order.cond):
            pred, true_fn, false_fn, operands = node.args
            static = {i: o for i, o in enumerate(operands) if not isinstance(o, torch.fx.Node)}
            if not static:
                continue
            for branch in (true_fn, false_fn):
                sub = getattr(mod, branch.target)
                for i, ph in enumerate(list(sub.graph.find_nodes(op="placeholder"))):
                    if i in static:
                        ph.replace_all_uses_with(static[i])
                        sub.graph.erase_node(ph)
                sub.recompile()
            node.args = (pred, true_fn, false_fn, tuple(o for i, o in enumerate(operands) if i not in static))
            changed = True
        if changed:
            mod.recompile()
    return changed


def _drop_unused_state(ep: torch.export.ExportedProgram) -> bool:
    """Remove state placeholders nothing reads any more (a weight replaced by its repacked copy)."""
    graph = ep.graph_module.graph
    unused = {n.name: n for n in graph.find_nodes(op="placeholder") if not n.users}
    keep, changed = [], False
    for spec in ep.graph_signature.input_specs:
        name = getattr(spec.arg, "name", None)
        if spec.kind != InputKind.USER_INPUT and name in unused:
            graph.erase_node(unused[name])
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                ep.state_dict.pop(spec.target, None)
            else:
                ep.constants.pop(spec.target, None)
            changed = True
        else:
            keep.append(spec)
    ep.graph_signature.input_specs[:] = keep
    return changed
