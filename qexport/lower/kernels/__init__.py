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
that becomes a buffer `<region>.<suffix>` of the rewritten program, so it is a constant of the
compiled package and never recomputed per call. Buffers no longer used by any node are dropped.
The splicing is `qexport.lower._graph.replace_regions`: every node copied in is tagged
`meta["custom"][REGION_TAG] = {"region", "module", "scheme", "kernel"}` and keeps the region's
`nn_module_stack` and `stack_trace`.

A kernel's numerics must stay within `math_for(scheme).tolerance` of the scheme's reference math
(the region body); backends test that per scheme and device.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import torch

from ...errors import LoweringError, QExportError
from ...schemes import math_for
from ...regions import Region, region_nodes
from .._contract import (
    Decline, PlanContext, RegionPlan, _plan_one, get_backend, plan_regions, register_backend, register_lowering,
    unclaimed_reason, unregister_lowering,
)
from .._graph import (
    RegionSite, contiguous_for_views, copy_program, drop_unused_state, is_state, replace_regions, shares_state_storage,
    state_tensor,
)

__all__ = [
    "FUSE_MODES", "FUSE_OPTION", "Decline", "KernelChoice", "KernelContext", "apply_kernels", "inductor_options_for",
    "plan_kernels", "register_kernel", "unregister_kernel",
]

#: "auto" (default): sibling linear regions -- one input, one scheme, weights that differ only in
#: out_features (attention's q/k/v, an MLP's gate/up) -- run as one kernel on their weights stacked;
#: "off": one kernel per region.
FUSE_OPTION = "qexport.fuse_siblings"
FUSE_MODES = ("auto", "off")

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
    """A PlanContext on an AOTI device (its `tensor(role)` gives the region's real tensors to repack)."""

    @property
    def device(self) -> str:
        return self.backend.removeprefix("aoti-")


Choose = Callable[[KernelContext], "KernelChoice | Decline | None"]


def _inductor_fuses(ctx: PlanContext, reasons: list[str], registered: bool) -> RegionPlan:
    return RegionPlan(taken=False, kernel="inductor", reason=unclaimed_reason(ctx, reasons, registered) + "; Inductor fuses the region")


for _device in ("cpu", "cuda"):
    register_backend(f"aoti-{_device}", title=f"AOTInductor {_device.upper()}", fallback=_inductor_fuses,
                     context=KernelContext, plans_anywhere=_device == "cpu", lowering_type=KernelChoice)


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


@dataclass
class _SiblingContext(KernelContext):
    """The context of sibling regions planned as one: `tensor(role)` is their tensors stacked on dim 0."""

    stacked: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def tensor(self, role: str) -> torch.Tensor:
        return self.stacked[role]


@dataclass(frozen=True)
class _Siblings:
    members: tuple[str, ...]  # region names, graph order; the first one's place runs the kernel
    widths: tuple[int, ...]  # each member's out_features
    plan: RegionPlan
    stacked: Mapping[str, torch.Tensor]


def _sibling_key(ep: torch.export.ExportedProgram, node: torch.fx.Node, region: Region) -> tuple | None:
    """What sibling regions share (input node, scheme, op parameters, every operand's trailing shape and
    dtype), or None when a region cannot be stacked: an operand that is not a constant or not per output
    feature (a role the scheme does not declare per channel -- a static activation scale, a codebook -- or
    a per-tensor scale). The first dim alone would not tell: a codebook of 16 meets out_features=16."""
    inp = node.args[1]
    if region.op != "linear" or region.scheme is None or not isinstance(inp, torch.fx.Node):
        return None
    try:
        math = math_for(region.scheme)
    except QExportError:
        return None
    per_channel = {*math.weight_roles, "bias"} - set(math.shared_roles)
    shapes, width = [], None
    for role, arg in zip(region.roles[1:], node.args[2:]):
        if role not in per_channel or not is_state(ep, arg):
            return None
        t = state_tensor(ep, arg)
        width = t.shape[0] if t.dim() and width is None else width
        if t.dim() == 0 or t.shape[0] != width:
            return None
        shapes.append((role, tuple(t.shape[1:]), str(t.dtype)))
    return (inp, json.dumps(region.scheme.to_dict(), sort_keys=True, default=str),
            json.dumps(region.op_params, sort_keys=True, default=str), tuple(shapes))


def _fuse_siblings(ep: torch.export.ExportedProgram, device: str, plans: list[RegionPlan],
                   options: Mapping[str, Any]) -> list[_Siblings]:
    # At few rows a linear layer is one weight-streaming kernel, and each kernel pays a fixed cost
    # (launch, first DRAM round trips, last wave: several µs on a GPU) that a decode step pays once
    # per projection; q/k/v as one kernel over stacked weights pay it once (vLLM's QKVParallelLinear).
    taken = {p.region.name for p in plans if p.taken}
    groups: dict[tuple, list[tuple[torch.fx.Node, Region]]] = {}
    for node, region in region_nodes(ep):
        key = _sibling_key(ep, node, region) if region.name in taken else None
        if key is not None:
            groups.setdefault(key, []).append((node, region))
    backend = get_backend(f"aoti-{device}")
    own = {p.region.name: _plan_kernels(p) for p in plans}
    out = []
    for group in groups.values():
        args = [a for node, _ in group for a in node.args[2:]]
        # A tensor another node also reads (a tied weight) would be stored twice: in the stack and as itself.
        if len(group) < 2 or len(set(args)) != len(args) or any(len(a.users) != 1 for a in args):
            continue
        (node, first), roles = group[0], group[0][1].roles[1:]
        stacked = {role: torch.cat([state_tensor(ep, n.args[1 + r.roles.index(role)]) for n, r in group]) for role in roles}
        widths = tuple(int(state_tensor(ep, n.args[2]).shape[0]) for n, _ in group)
        shape = (sum(r.weight_shape[0] for _, r in group), *first.weight_shape[1:]) if all(r.weight_shape for _, r in group) else None
        ctx = _SiblingContext(ep, node, dataclasses.replace(first, weight_shape=shape), backend.name, dict(options), stacked=stacked)
        plan = _plan_one(backend, ctx)
        # CPU plans follow shape rules, which the stack can fail where a member passes: tinygemm packs only
        # N % 16 == 0, so stacking 2000 outputs with 40 ran the 2000 on decoded weights (bf16 GEMM at 1-4
        # rows, where its own plan had _weight_int4pack_mm_for_cpu). CUDA plans are tuned on the stack itself.
        if device == "cpu" and any(not own[r.name] <= _plan_kernels(plan) for _, r in group):
            continue
        if plan.taken and isinstance(plan.lowering, KernelChoice):
            out.append(_Siblings(tuple(r.name for _, r in group), widths, plan, stacked))
    return out


def _plan_kernels(plan: RegionPlan) -> frozenset[str]:
    """The kernels a region's row-bucket plan runs (its kernel alone where it has no buckets)."""
    buckets = plan.details.get("plan") if isinstance(plan.details, Mapping) else None
    return frozenset(str(b.get("kernel")) for b in buckets) if isinstance(buckets, list) else frozenset({plan.kernel})


def plan_kernels(
    program: torch.export.ExportedProgram, device: str, options: Mapping[str, Any] | None = None
) -> tuple[list[RegionPlan], list[_Siblings]]:
    """Each region's plan on `aoti-<device>` and the sibling groups that run as one kernel (their
    members' plans name the kernel, the siblings and the stacked width)."""
    options = dict(options or {})
    plans = plan_regions(program, f"aoti-{device}", options)
    if options.get(FUSE_OPTION, "auto") == "off":
        return plans, []
    fused = _fuse_siblings(program, device, plans, options)
    member = {m: f for f in fused for m in f.members}
    for i, p in enumerate(plans):
        f = member.get(p.region.name)
        if f is not None:
            others = [m for m in f.members if m != p.region.name]
            plans[i] = dataclasses.replace(
                p, kernel=f.plan.kernel, lowering=f.plan.lowering,
                reason="; ".join(x for x in (f.plan.reason, f"one kernel with {', '.join(others)} "
                                             f"(weights stacked: {sum(f.widths)} outputs)") if x),
                details={**f.plan.details, "siblings": list(f.members), "stacked_out_features": sum(f.widths)},
            )
    return plans, fused


def apply_kernels(
    program: torch.export.ExportedProgram, device: str, options: Mapping[str, Any] | None = None
) -> tuple[torch.export.ExportedProgram, list[RegionPlan]]:
    """Replace each region a kernel takes by that kernel; returns a new program and the plans.

    Regions nobody takes stay `invoke_quant_packed` (Inductor fuses them). Sibling regions
    (`plan_kernels`) become one kernel, at the first one's place, and a slice of its output each.
    `program` is not changed.
    """
    ep = copy_program(program)
    plans, fused = plan_kernels(ep, device, options)
    chosen = {p.region.name: p.lowering for p in plans if p.taken}
    lead = {f.members[0]: f for f in fused}
    slices: dict[str, tuple[torch.fx.Node, int, int, int]] = {}  # member -> (stacked output, dim, start, end)
    cut: list[torch.fx.Node] = []

    def lower(site: RegionSite) -> torch.fx.Node:
        name = site.region.name
        if name in slices:
            # emitted at the member's own site (members follow the first in graph order), so its slice
            # carries the member's tag, module stack and stack trace, not the first member's
            cut.append(site.call(torch.ops.aten.slice.Tensor, *slices.pop(name)))
            return cut[-1]
        f = lead.get(name)
        if f is None:
            return _splice_kernel(site, chosen[name])
        out = _splice_kernel(site, f.plan.lowering, f.stacked)
        start, last = 0, out.meta["val"].dim() - 1
        for member, width in zip(f.members, f.widths):
            slices[member] = (out, last, start, start + width)
            start += width
        return lower(site)

    if chosen:
        replace_regions(ep, lower, kernel_of=lambda r: chosen[r.name].name if r.name in chosen else None)
        for s in cut:  # a sibling's slice is not contiguous: a view of it across its last dim needs a copy
            contiguous_for_views(s)
        drop_unused_state(ep)
        ep.graph_module.graph.lint()
        ep.graph_module.recompile()
    return ep, plans


def _splice_kernel(site: RegionSite, choice: KernelChoice, stacked: Mapping[str, torch.Tensor] | None = None) -> torch.fx.Node:
    """The kernel's body, traced over the region's input and the operands it names, in the region's place
    (`stacked`: sibling regions' tensors per role, which become new constants)."""
    args = [site.input]
    for op in choice.operands:
        if isinstance(op, str):
            if not site.has(op):
                raise LoweringError(
                    f"kernel {choice.name} for {site.region.name} asks for role {op!r}; the region has {list(site.region.roles)}"
                )
            args.append(site.operands[op] if stacked is None else site.constant(f"siblings_{op}", stacked[op]))
        else:
            suffix, tensor = op
            if shares_state_storage(site.ep, tensor):
                # two package constants on one storage made AOTInductor refuse the program ("cond_true
                # might be aliasing the input or the output!": int8_weight_only with large_m="dequant",
                # whose row buckets read the scale as stored and, for the one-row loop, as float32)
                tensor = tensor.clone()
            args.append(site.constant(suffix, tensor))
    out = site.trace(choice.body, *args)
    return out[0] if isinstance(out, (tuple, list)) else out
