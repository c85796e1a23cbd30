"""Checks of what users hand qexport (models, calibration data, example inputs), run before any work.

torch accepts all of these and fails later, far from the cause, or not at all: a zero-size Linear
dies in the scheme's math with an IndexError, NaN weights quantize to NaN scales and every output is
NaN, a model on the meta device exports and saves a file without data, calibration data of the wrong
shape fails inside the model with a RuntimeError, and an int64 example input to a float model traces
into a program that returns int64. Each check here raises a QExportError subclass that names the
fix; quantize / export / save call them with one line each.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .errors import ArtifactError, CalibrationError, ExportError, QExportError, UnsupportedModuleError


def _no_data(t: torch.Tensor) -> str | None:
    """Why `t` holds no real values (meta or fake tensor), or None."""
    if t.is_meta or t.device.type == "meta":
        return "is on the meta device (it has a shape but no values)"
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(t, FakeTensor):
        return "is a fake tensor (it has a shape but no values)"
    return None


def _not_finite(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point and t.numel() > 0 and not bool(torch.isfinite(t).all())


def check_modules(chosen: Iterable[tuple[str, nn.Module, str]]) -> None:
    """The layers quantize() is about to replace: real, non-empty, finite weights."""
    for fqn, m, op in chosen:
        for role in ("weight", "bias"):
            t = getattr(m, role, None)
            if not isinstance(t, torch.Tensor):
                continue
            why = _no_data(t)
            if why:
                raise UnsupportedModuleError(
                    f"{fqn}.{role} {why}; load real weights first (e.g. model.to_empty(device='cpu') and "
                    f"load_state_dict, or build the model without device='meta')"
                )
            if role == "weight" and t.numel() == 0:
                raise UnsupportedModuleError(
                    f"{fqn}: {type(m).__name__} with a zero-size weight {tuple(t.shape)} has nothing to quantize; "
                    f"remove the layer or make filter_fn return False for it"
                )
            if _not_finite(t):
                raise UnsupportedModuleError(
                    f"{fqn}.{role} holds NaN or inf values; quantizing them gives NaN outputs. Fix the checkpoint "
                    f"(torch.isfinite(model.get_submodule({fqn!r}).{role}).all()) or leave the layer out with filter_fn"
                )


def calibration_batches(data: Any) -> Iterator[Any]:
    """Iterate calibration data, refusing what cannot be a batch of model inputs."""
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise CalibrationError(
            f"calibration_data must be an iterable of batches (argument tuples or kwarg dicts), got "
            f"{type(data).__name__}; e.g. calibration_data=[(x,) for x in batches]"
        )
    for i, batch in enumerate(data):
        values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else (batch,)
        for t in values:
            if isinstance(t, torch.Tensor):
                why = _no_data(t)
                if why:
                    raise CalibrationError(f"calibration batch {i}: an input {why}; calibrate on real data")
                if _not_finite(t):
                    raise CalibrationError(
                        f"calibration batch {i} holds NaN or inf values; they would make every activation range "
                        f"NaN. Drop or clean that batch"
                    )
        yield batch


def calibration_failed(e: Exception, batch: int) -> QExportError:
    """The error for a model that raised while running calibration batch `batch`."""
    if isinstance(e, QExportError):
        return e
    return CalibrationError(
        f"the model raised on calibration batch {batch} ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
        f"calibration_data must hold the inputs the model takes (same shapes and dtypes as the example inputs)"
    )


def check_export_inputs(model: nn.Module, args: tuple, kwargs: Mapping[str, Any] | None) -> None:
    """Before tracing: a model with data, and example inputs with values."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            why = _no_data(t)
            if why:
                raise ExportError(
                    f"{kind} {name} {why}, so the exported program would carry no weights; load real weights "
                    f"first (model.to_empty(device='cpu') and load_state_dict)"
                )
    leaves = torch.utils._pytree.tree_leaves((args, dict(kwargs or {})))
    for i, t in enumerate(leaves):
        if isinstance(t, torch.Tensor):
            why = _no_data(t)
            if why:
                raise ExportError(f"example input {i} {why}; pass real tensors (torch.randn(...) of the input shape)")


def check_region_inputs(ep: torch.export.ExportedProgram) -> None:
    """After tracing: every linear/conv region gets floating activations. An integer example input
    that reaches one traces into a program that computes in, and returns, integers."""
    from .regions import iter_region_nodes, region_payload

    lifted = set(ep.graph_signature.inputs_to_parameters) | set(ep.graph_signature.inputs_to_buffers)
    lifted |= set(getattr(ep.graph_signature, "inputs_to_lifted_tensor_constants", {}))
    for node in iter_region_nodes(ep):
        payload = region_payload(node)
        if payload is not None and payload.op == "embedding":
            continue
        for a in node.args[1:]:
            val = a.meta.get("val") if isinstance(a, torch.fx.Node) and a.name not in lifted else None
            if isinstance(val, torch.Tensor) and not val.dtype.is_floating_point:
                where = payload.module if payload and payload.module else node.name
                raise ExportError(
                    f"region {where} ({payload.op if payload else '?'}) gets a {val.dtype} activation: an example input of a "
                    f"dtype the model cannot take; pass floating-point inputs (e.g. x.float())"
                )
            if isinstance(val, torch.Tensor):
                break  # the first activation operand is the one the region computes on


def check_state(ep: torch.export.ExportedProgram, where: str) -> None:
    """Before saving: every tensor of the program holds data."""
    for kind, items in (("state", ep.state_dict.items()), ("constant", ep.constants.items())):
        for fqn, t in items:
            if isinstance(t, torch.Tensor):
                why = _no_data(t)
                if why:
                    raise ArtifactError(f"{where}: {kind} {fqn!r} {why}; the file would hold no weights. Export a model with real weights")
