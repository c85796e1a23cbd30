"""The backend contract: every backend plans each region into one `RegionPlan`, from one registry.

In the spirit of ExecuTorch's `Partitioner.partition(ep) -> PartitionResult`: before any graph is
touched, a backend asks one question per region — "who takes this scheme's op here?" — of the
lowerings registered for (scheme name or family, backend, op). The answer is one record: taken or not,
the kernel, the reason (in words a user can act on) and JSON-safe details; `lowering` carries what the
backend needs to rewrite the region and never leaves the process. `RegionPlan.record()` is what every
artifact's manifest stores per region and what `LoweringReport` is built from.

A lowering (a scheme family's, or a user's) is one function::

    @register_lowering("int8", "onnx", "linear")        # a scheme name or a family name
    def int8_linear(ctx: PlanContext) -> RegionPlan | Decline | None:
        if ctx.region.scheme.activation == "none":
            return Decline("needs int8 activations")          # kept for the region's reason
        return RegionPlan(taken=True, kernel="QDQ MatMul", lowering=...)

Entries registered for the scheme's name are asked before its family's, each list in registration
order; the first RegionPlan wins, a Decline's reason is kept (it leads the reason of a plan that is not
taken), None passes. When no entry plans the
region, the backend's `fallback` does (AOTI: Inductor fuses it; ExecuTorch and ONNX: the region's
reference math). A backend is declared once with `register_backend`; qexport's own are imported from
`_BUILTIN` the first time they are asked about.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from ..extras import missing_extra
from ..errors import BackendUnavailableError, LoweringError, QExportError, UnknownSchemeError
from ..regions import Region, region_nodes
from ..schemes import OPS, families, names as scheme_names
from ._graph import state_tensor

if TYPE_CHECKING:
    from serializers.manifest import LoweringRecord

__all__ = [
    "Backend", "Decline", "PlanContext", "RegionPlan", "backends", "get_backend", "lowerings_for", "plan_regions",
    "register_backend", "register_lowering", "unregister_backend", "unregister_lowering",
]

#: qexport's backends -> the module whose import declares them and registers their lowerings
_BUILTIN = {
    "aoti-cpu": "qexport.lower.kernels.cpu",
    "aoti-cuda": "qexport.lower.kernels.cuda",
    "executorch": "qexport.lower.executorch",
    "onnx": "qexport.lower.onnx_regions",
}


@dataclass(frozen=True)
class Decline:
    """A lowering that cannot take this region, and why (reaches the user's report)."""

    reason: str


@dataclass(frozen=True)
class RegionPlan:
    """What one backend makes of one region, decided before any graph is touched."""

    #: the backend's accelerated path takes it (a scheme kernel, a delegate pattern, fusable QDQ)
    taken: bool
    kernel: str
    #: why it is not taken, or a caveat when it is (a precision change, the plan's source)
    reason: str = ""
    #: JSON-safe facts for the manifest (a row-bucket plan and its ISA, a tuned plan, a target)
    details: Mapping[str, Any] = field(default_factory=dict)
    #: what the backend applies to rewrite the region (a kernel body, a graph rewrite, an ONNX emitter)
    lowering: Any = field(default=None, compare=False, repr=False)
    #: filled in by `plan_regions`
    region: Region | None = field(default=None, compare=False, repr=False)
    backend: str = ""

    def record(self, **changes: Any) -> "LoweringRecord":
        """The manifest's record of this plan (`changes` override fields, e.g. the delegate that ran it)."""
        from serializers.manifest import LoweringRecord

        fields = {"backend": self.backend, "taken": self.taken, "kernel": self.kernel, "reason": self.reason,
                  "details": dict(self.details), **changes}
        return LoweringRecord(**fields)


@dataclass
class PlanContext:
    """What a lowering may look at: the region, its node in the program, and the backend's options."""

    program: torch.export.ExportedProgram
    node: torch.fx.Node
    region: Region
    backend: str
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

    def tensor(self, role: str) -> torch.Tensor:
        """The real tensor behind a role (a buffer, parameter or constant of the program): what a plan
        that depends on the values (repacking, the range of a weight's codes) reads."""
        arg = self.node.args[1 + self.region.roles.index(role)]
        return state_tensor(self.program, arg, f"region {self.region.name}: operand {role!r}")

    def optional(self, role: str) -> tuple[str, ...]:
        """`(role,)` if the region has it, else `()`: for splicing optional roles into operands."""
        return (role,) if self.has(role) else ()


Plan = Callable[[PlanContext], "RegionPlan | Decline | None"]
#: a backend's plan for a region no entry planned: (context, the entries' reasons, whether any was registered)
Fallback = Callable[[PlanContext, list, bool], RegionPlan]


def unclaimed_reason(ctx: PlanContext, reasons: list[str], registered: bool) -> str:
    """Why no entry planned the region: the entries' reasons, or that the backend has none for it."""
    r = ctx.region
    if not registered:
        reasons = [*reasons, f"no {ctx.backend} lowering registered for {r.scheme.name if r.scheme else r.scheme_name} {r.op}"]
    return "; ".join(reasons) or "no lowering took it"


def _default_fallback(ctx: PlanContext, reasons: list[str], registered: bool) -> RegionPlan:
    return RegionPlan(taken=False, kernel="none", reason=unclaimed_reason(ctx, reasons, registered))


@dataclass(frozen=True)
class Backend:
    """A backend as the contract knows it."""

    name: str
    #: how docs and tables name it
    title: str
    fallback: Fallback = _default_fallback
    #: the PlanContext (sub)class its lowerings are given
    context: type = PlanContext
    #: False when plans depend on the target hardware (CUDA tunes on the GPU); docs then list candidates
    plans_anywhere: bool = True
    #: what the backend applies from `RegionPlan.lowering` (AOTI: KernelChoice; ExecuTorch: a callable
    #: site -> node; ONNX: Lowering): a taken plan must carry one, checked when the plan is made
    lowering_type: type | tuple[type, ...] | None = None


_BACKENDS: dict[str, Backend] = {}
_REGISTRY: dict[tuple[str, str, str], list[tuple[str, Plan]]] = {}
_LOADED: set[str] = set()


def register_backend(name: str, *, title: str, fallback: Fallback | None = None, context: type = PlanContext,
                     plans_anywhere: bool = True, lowering_type: type | tuple[type, ...] | None = None) -> Backend:
    """Declare a backend: its name in `register_lowering`, its title and its plan for unclaimed regions."""
    if name in _BUILTIN and name in _BACKENDS:
        raise LoweringError(f"backend {name!r} is qexport's own and already declared; declare yours under another name")
    backend = Backend(name, title, fallback or _default_fallback, context, plans_anywhere, lowering_type)
    _BACKENDS[name] = backend
    return backend


def unregister_backend(name: str) -> None:
    """Forget a backend and every lowering registered for it (one of qexport's own stays)."""
    if name in _BUILTIN:
        raise LoweringError(f"backend {name!r} is qexport's own and cannot be unregistered; unregister_lowering "
                            f"removes one of its entries")
    _BACKENDS.pop(name, None)
    for key in [k for k in _REGISTRY if k[1] == name]:
        del _REGISTRY[key]


def _load(name: str) -> None:
    module = _BUILTIN.get(name)
    if module is None or name in _LOADED:
        return
    _LOADED.add(name)
    try:
        importlib.import_module(module)
    except ImportError as e:  # an optional extra (onnx, executorch) that is not installed: the backend is absent
        _LOADED.discard(name)
        raise missing_extra(e, f"backend {name!r}") or e


def get_backend(name: str) -> Backend:
    _load(name)
    if name not in _BACKENDS:
        raise LoweringError(f"backend {name!r} is not declared; known: {sorted({*_BACKENDS, *_BUILTIN})} "
                            f"(qexport.lower.register_backend declares one)")
    return _BACKENDS[name]


def backends() -> list[Backend]:
    """Every declared backend, qexport's own first (those whose extras are not installed are left out)."""
    for name in _BUILTIN:
        try:
            _load(name)
        except (ImportError, BackendUnavailableError):
            pass
    # in _BUILTIN's order, not import order (which backend module a run imported first varies)
    rank = {name: i for i, name in enumerate(_BUILTIN)}
    return sorted(_BACKENDS.values(), key=lambda b: rank.get(b.name, len(rank)))


def register_lowering(scheme_or_family: str, backend: str, op: str, plan: Plan | None = None, *, name: str | None = None):
    """Register `plan` for regions of a scheme (or a whole family) and op on `backend`.

    Usable as a decorator. `name` (default: the function's name) identifies the entry; registering a
    name again replaces that entry in place of appending one (a built-in entry too: qexport's own
    backend module is imported first, so its entries are there to be replaced). A backend that is not
    declared, an op regions do not have, or a name that is neither a registered scheme nor a family
    is refused here: such an entry would never be asked.
    """
    _check_key(scheme_or_family, backend, op)

    def add(fn: Plan) -> Plan:
        if not callable(fn):
            raise LoweringError(f"register_lowering{(scheme_or_family, backend, op)}: the plan must be a function "
                                f"(ctx: PlanContext) -> RegionPlan | Decline | None, got {type(fn).__name__}")
        key = (scheme_or_family, backend, op)
        entry = name or getattr(fn, "__name__", repr(fn))
        _REGISTRY[key] = [e for e in _REGISTRY.get(key, []) if e[0] != entry] + [(entry, fn)]
        return fn

    return add(plan) if plan is not None else add


def _check_key(scheme_or_family: str, backend: str, op: str) -> None:
    where = f"register_lowering{(scheme_or_family, backend, op)}"
    if backend in _BUILTIN:
        try:
            _load(backend)
        except (ImportError, BackendUnavailableError):
            pass  # its extra is not installed: the entry is kept for a process that has it, never asked here
    elif backend not in _BACKENDS:
        raise LoweringError(f"{where}: backend {backend!r} is not declared; known: {sorted({*_BACKENDS, *_BUILTIN})} "
                            f"(qexport.register_backend declares one)")
    if op not in (*OPS, "custom"):
        raise LoweringError(f"{where}: op {op!r} is not a region op; regions are one of {[*OPS, 'custom']}")
    if scheme_or_family not in scheme_names() and scheme_or_family not in families():
        raise UnknownSchemeError(
            f"{where}: {scheme_or_family!r} is neither a registered scheme nor a scheme family (families: "
            f"{', '.join(families())}); register the scheme first (qexport.schemes.register)"
        )


def unregister_lowering(scheme_or_family: str, backend: str, op: str, name: str) -> None:
    key = (scheme_or_family, backend, op)
    _REGISTRY[key] = [e for e in _REGISTRY.get(key, []) if e[0] != name]


def lowerings_for(region: Region, backend: str) -> list[tuple[str, Plan]]:
    """The entries asked about `region` on `backend`, in order: its scheme's, then its family's."""
    get_backend(backend)
    s = region.scheme
    if s is None:
        return []
    out = list(_REGISTRY.get((s.name, backend, region.op), []))
    if s.family != s.name:
        out += _REGISTRY.get((s.family, backend, region.op), [])
    return out


def plan_regions(
    program: torch.export.ExportedProgram, backend: str, options: Mapping[str, Any] | None = None
) -> list[RegionPlan]:
    """One plan per region of `program` (graph order) on `backend`; changes nothing."""
    if options is not None and not isinstance(options, Mapping):
        raise LoweringError(f"plan_regions: options must be a dict, got {type(options).__name__}")
    b = get_backend(backend)
    plans = []
    for node, region in region_nodes(program):
        ctx = b.context(program, node, region, backend, dict(options or {}))
        plans.append(dataclasses.replace(_plan_one(b, ctx), region=region, backend=backend))
    return plans


def _check_fields(b: Backend, entry: str, ctx: PlanContext, r: RegionPlan) -> None:
    """A user's plan with a field of the wrong type went on to the compile and into the manifest
    (kernel=None, reason=5): refused here, naming the entry. So are details the manifest cannot hold:
    they were refused only when the manifest was written, by then ExecuTorch had lowered the whole
    program (seconds) and said ArtifactError where the other backends said it before any work."""
    if not (isinstance(r.taken, bool) and isinstance(r.kernel, str) and isinstance(r.reason, str) and isinstance(r.details, Mapping)):
        raise LoweringError(
            f"{b.name} lowering {entry!r} planned region {ctx.region.name} with RegionPlan(taken={r.taken!r}, "
            f"kernel={r.kernel!r}, reason={r.reason!r}, details of type {type(r.details).__name__})"[:400]
            + "; taken is a bool, kernel and reason are strings, details a dict of JSON values"
        )
    try:
        json.dumps(dict(r.details), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise LoweringError(
            f"{b.name} lowering {entry!r} planned region {ctx.region.name} with details the manifest cannot "
            f"store ({e}); details hold plain JSON values (str, int, float, bool, None, lists and dicts of them)"
        ) from None


def _plan_one(b: Backend, ctx: PlanContext) -> RegionPlan:
    reasons: list[str] = []
    candidates = lowerings_for(ctx.region, b.name)
    for entry, plan in candidates:
        try:
            r = plan(ctx)
        except QExportError:
            raise
        except Exception as e:  # a user's lowering: say which entry, region and backend before any work is done
            raise LoweringError(
                f"{b.name} lowering {entry!r} failed on region {ctx.region.name} ({ctx.region.scheme_name} "
                f"{ctx.region.op}): {type(e).__name__}: {e}"
            ) from e
        if isinstance(r, RegionPlan):
            _check_fields(b, entry, ctx, r)
            if reasons and not r.taken:  # what the better entries said is part of why it is not taken
                r = dataclasses.replace(r, reason="; ".join([*reasons, r.reason] if r.reason else reasons))
            if not r.taken and r.lowering is None:  # not taken, nothing to apply: the backend's fallback runs it
                r = dataclasses.replace(r, lowering=b.fallback(ctx, reasons, True).lowering)
            if b.lowering_type is not None and (r.taken or r.lowering is not None) and not isinstance(r.lowering, b.lowering_type):
                want = " or ".join(t.__name__ for t in (b.lowering_type if isinstance(b.lowering_type, tuple) else (b.lowering_type,)))
                raise LoweringError(
                    f"{b.name} lowering {entry!r} planned region {ctx.region.name} with RegionPlan.lowering="
                    f"{type(r.lowering).__name__}; {b.name} applies a {want} (a plan that is not taken may leave it None)"
                )
            return r
        if isinstance(r, Decline):
            reasons.append(r.reason)
        elif r is not None:
            raise LoweringError(f"{b.name} lowering {entry!r} returned {type(r).__name__}; expected RegionPlan, Decline or None")
    return b.fallback(ctx, reasons, bool(candidates))
