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

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import torch

from ...errors import LoweringError
from .._contract import (
    Decline, PlanContext, RegionPlan, get_backend, plan_regions, register_backend, register_lowering, unclaimed_reason,
    unregister_lowering,
)
from .._graph import RegionSite, copy_program, drop_unused_state, replace_regions

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
    """A PlanContext on an AOTI device (its `tensor(role)` gives the region's real tensors to repack)."""

    @property
    def device(self) -> str:
        return self.backend.removeprefix("aoti-")


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
    ep = copy_program(program)
    plans = plan_regions(ep, f"aoti-{device}", options)
    chosen = {p.region.name: p.lowering for p in plans if p.taken}
    if chosen:
        replace_regions(
            ep, lambda site: _splice_kernel(site, chosen[site.region.name]),
            kernel_of=lambda r: chosen[r.name].name if r.name in chosen else None,
        )
        drop_unused_state(ep)
        ep.graph_module.graph.lint()
        ep.graph_module.recompile()
    return ep, plans


def _splice_kernel(site: RegionSite, choice: KernelChoice) -> torch.fx.Node:
    """The kernel's body, traced over the region's input and the operands it names, in the region's place."""
    args = [site.input]
    for op in choice.operands:
        if isinstance(op, str):
            if not site.has(op):
                raise LoweringError(
                    f"kernel {choice.name} for {site.region.name} asks for role {op!r}; the region has {list(site.region.roles)}"
                )
            args.append(site.operands[op])
        else:
            suffix, tensor = op
            args.append(site.constant(suffix, tensor))
    out = site.trace(choice.body, *args)
    return out[0] if isinstance(out, (tuple, list)) else out
