"""Scheme-aware kernels: a table, per (scheme, device, op), from a region to the best kernel.

Upstream Inductor inlines an `invoke_quant` region and ignores its scheme, so every quantized model
compiles into generic dequantize-then-matmul code (70x slower than the right kernel on CPU, see
FINDINGS.md). This table is where a scheme picks its kernel before Inductor runs.

Registering a kernel (one module per device: `cpu.py`, `cuda.py`; imported by `_load_tables`)::

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

`choose(ctx)` returns a `KernelChoice` (take the region), a `Decline(reason)` or None (let the next
registered kernel, then Inductor's own fusion of the region, take it). Candidates are tried in
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
from ...regions import Region, region_nodes
from .._graph import RegionSite, copy_program, drop_unused_state, replace_regions, state_tensor

__all__ = [
    "Decline", "KernelChoice", "KernelContext", "KernelDecision", "apply_kernels", "choose_kernels",
    "inductor_options_for",
    "kernels_for", "register_kernel", "unregister_kernel",
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


@dataclass(frozen=True)
class Decline:
    """A kernel that cannot take this region, and why (reaches the user's report)."""

    reason: str


@dataclass
class KernelContext:
    """What a `choose` function may look at: the region, its real tensors and where it will run."""

    program: torch.export.ExportedProgram
    node: torch.fx.Node
    region: Region
    device: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def scheme(self):
        return self.region.scheme

    @property
    def input_val(self) -> torch.Tensor:
        """The fake value of the activation input (its dtype, rank and symbolic shape)."""
        return self.node.args[1].meta["val"]

    @property
    def input_dtype(self) -> torch.dtype:
        return self.input_val.dtype

    def has(self, role: str) -> bool:
        return role in self.region.roles

    def optional(self, role: str) -> tuple[str, ...]:
        """`(role,)` if the region has it, else `()`: for splicing optional roles into operands."""
        return (role,) if self.has(role) else ()

    def tensor(self, role: str) -> torch.Tensor:
        """The real tensor behind a role (a buffer, parameter or constant of the program)."""
        arg = self.node.args[1 + self.region.roles.index(role)]
        return state_tensor(self.program, arg, f"region {self.region.name}: operand {role!r}")


@dataclass(frozen=True)
class KernelDecision:
    """The outcome for one region: the choice taken, or why Inductor's fusion keeps it."""

    region: Region
    choice: KernelChoice | None
    reason: str = ""


Choose = Callable[[KernelContext], "KernelChoice | Decline | None"]
_TABLE: dict[tuple[str, str, str], list[tuple[str, Choose]]] = {}
_LOADED: set[str] = set()


def register_kernel(scheme_or_family: str, device: str, op: str, choose: Choose | None = None, *, name: str | None = None):
    """Register `choose` for regions of a scheme (or a whole family) on a device ("cpu"/"cuda") and op.

    Usable as a decorator. `name` (default: the function's name) identifies the entry for
    `unregister_kernel`.
    """

    def add(fn: Choose) -> Choose:
        key = (scheme_or_family, device, op)
        entry = name or getattr(fn, "__name__", repr(fn))
        _TABLE.setdefault(key, [])
        _TABLE[key] = [e for e in _TABLE[key] if e[0] != entry] + [(entry, fn)]
        return fn

    return add(choose) if choose is not None else add


def unregister_kernel(scheme_or_family: str, device: str, op: str, name: str) -> None:
    key = (scheme_or_family, device, op)
    _TABLE[key] = [e for e in _TABLE.get(key, []) if e[0] != name]


def _load_tables(device: str) -> None:
    if device in _LOADED:
        return
    _LOADED.add(device)
    try:
        importlib.import_module(f"{__name__}.{device}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{device}":
            raise


def inductor_options_for(device: str) -> dict[str, Any]:
    """Inductor configs a device's kernels rely on (its module's `INDUCTOR_OPTIONS`, e.g. coordinate
    descent tuning for CUDA GEMVs); `compile` puts the caller's options over them."""
    _load_tables(device)
    module = importlib.import_module(__name__)
    table = getattr(module, device, None)
    return dict(getattr(table, "INDUCTOR_OPTIONS", {}))


def kernels_for(region: Region, device: str) -> list[tuple[str, Choose]]:
    """Candidates for a region, scheme-name entries first, then its family's."""
    _load_tables(device)
    if region.scheme is None:
        return []
    out = list(_TABLE.get((region.scheme.name, device, region.op), []))
    if region.scheme.family != region.scheme.name:
        out += _TABLE.get((region.scheme.family, device, region.op), [])
    return out


def choose_kernels(
    program: torch.export.ExportedProgram, device: str, options: Mapping[str, Any] | None = None
) -> list[tuple[torch.fx.Node, KernelDecision]]:
    """Ask the table about every region of `program`; changes nothing."""
    options = dict(options or {})
    out = []
    for node, region in region_nodes(program):
        reasons = []
        choice = None
        candidates = kernels_for(region, device)
        for _, choose in candidates:
            r = choose(KernelContext(program, node, region, device, options))
            if isinstance(r, KernelChoice):
                choice = r
                break
            if isinstance(r, Decline):
                reasons.append(r.reason)
        if choice is None and not candidates:
            s = region.scheme.name if region.scheme else region.scheme_name
            reasons.append(f"no {device} kernel registered for {s} {region.op}")
        out.append((node, KernelDecision(region, choice, "; ".join(reasons))))
    return out


def apply_kernels(
    program: torch.export.ExportedProgram, device: str, options: Mapping[str, Any] | None = None
) -> tuple[torch.export.ExportedProgram, list[KernelDecision]]:
    """Replace each region the table can take by its kernel; returns a new program and the decisions.

    Regions nobody takes stay `invoke_quant_packed` (Inductor fuses them). `program` is not changed.
    """
    ep = copy_program(program)
    decisions = choose_kernels(ep, device, options)
    chosen = {d.region.name: d.choice for _, d in decisions if d.choice is not None}
    if chosen:
        replace_regions(
            ep, lambda site: _splice_kernel(site, chosen[site.region.name]),
            kernel_of=lambda r: chosen[r.name].name if r.name in chosen else None,
        )
        drop_unused_state(ep)
        ep.graph_module.graph.lint()
        ep.graph_module.recompile()
    return ep, [d for _, d in decisions]


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
