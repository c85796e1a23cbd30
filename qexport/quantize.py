"""`quantize(model, scheme)`: swap Linear / Conv2d / Embedding for modules that run one region each.

The float weights are dropped; the quantized tensors are buffers (so `state_dict`, `.pt2` files and
memory shrink accordingly). Every check runs before the first module is touched.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from . import _validate
from .errors import CalibrationError, NothingToQuantizeError, UnsupportedModuleError
from .regions import invoke_quant
from .schemes import Scheme, get as get_scheme, make_region_fn, math_for
from .schemes._activation import int8_asym_qparams

FilterFn = Callable[[nn.Module, str], bool]

_OPS: dict[type, str] = {nn.Linear: "linear", nn.Conv2d: "conv2d", nn.Embedding: "embedding"}
# Weight-bearing layers a user may select with filter_fn that have no region op (yet): refused loudly.
# Linear subclasses (e.g. MultiheadAttention's out_proj, whose weight is read directly) are left alone.
_UNSUPPORTED_LAYERS = (nn.modules.conv._ConvNd, nn.EmbeddingBag, nn.RNNBase, nn.Bilinear)


def _op_params(module: nn.Module) -> dict[str, Any]:
    dtype = str(module.weight.dtype).removeprefix("torch.")
    if isinstance(module, nn.Conv2d):
        return {
            "stride": list(module.stride),
            "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
            "dilation": list(module.dilation),
            "groups": module.groups,
            "out_dtype": dtype,
        }
    if isinstance(module, nn.Embedding):
        return {"padding_idx": module.padding_idx, "out_dtype": dtype}
    return {"out_dtype": dtype}


class QuantizedModule(nn.Module):
    """A Linear / Conv2d / Embedding whose forward is one `invoke_quant` region."""

    def __init__(
        self,
        scheme: Scheme,
        op: str,
        op_params: Mapping[str, Any],
        weight_shape: tuple[int, ...],
        tensors: Mapping[str, torch.Tensor],
        module_path: str,
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.op = op
        self.op_params = dict(op_params)
        self.weight_shape = tuple(weight_shape)
        self.module_path = module_path
        self.roles = tuple(tensors)
        for role, t in tensors.items():
            self.register_buffer(role, t)
        self._region = make_region_fn(scheme, op, self.op_params, self.roles, self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invoke_quant(
            self._region,
            x,
            *(getattr(self, r) for r in self.roles),
            scheme=self.scheme,
            op=self.op,
            op_params=self.op_params,
            module=self.module_path,
            roles=("input", *self.roles),
            weight_shape=self.weight_shape,
        )[0]

    def quantized_bytes(self) -> int:
        return sum(getattr(self, r).nbytes for r in self.roles if r != "bias")

    def float_bytes(self) -> int:
        n = 1
        for d in self.weight_shape:
            n *= d
        return n * getattr(torch, self.op_params.get("out_dtype", "float32")).itemsize

    def extra_repr(self) -> str:
        return f"{self.op}, weight={list(self.weight_shape)}, scheme={self.scheme.describe()}"


def _select(
    model: nn.Module, scheme: Scheme, filter_fn: FilterFn | None
) -> list[tuple[str, nn.Module, str]]:
    """The (fqn, module, op) to quantize among the Linear / Conv2d / Embedding layers. Without
    filter_fn: every one the scheme supports. With filter_fn: those it keeps; keeping one the scheme
    cannot take is an error (the user asked for something that cannot happen)."""
    math = math_for(scheme)
    supported = sorted(o for o in math.supported_ops if math.supports(scheme, o))
    chosen = []
    for fqn, m in model.named_modules():
        op = _OPS.get(type(m))
        if filter_fn is not None and isinstance(m, _UNSUPPORTED_LAYERS) and op is None and filter_fn(m, fqn):
            raise UnsupportedModuleError(
                f"{fqn}: {type(m).__name__} cannot be quantized (qexport quantizes nn.Linear, nn.Conv2d "
                f"and nn.Embedding); make filter_fn return False for it"
            )
        if op is None or (filter_fn is not None and not filter_fn(m, fqn)):
            continue
        if not math.supports(scheme, op):
            if filter_fn is not None:
                raise UnsupportedModuleError(
                    f"{fqn}: scheme {scheme.name} cannot quantize {type(m).__name__} (it quantizes "
                    f"{supported} layers); make filter_fn return False for it or pick another scheme"
                )
            continue
        _check_module(m, fqn, scheme, op)
        chosen.append((fqn, m, op))
    return chosen


def _check_module(m: nn.Module, fqn: str, scheme: Scheme, op: str) -> None:
    _validate.check_modules([(fqn, m, op)])
    if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
        raise UnsupportedModuleError(f"{fqn}: Conv2d padding_mode={m.padding_mode!r} is not supported (only 'zeros')")
    if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.sparse):
        raise UnsupportedModuleError(f"{fqn}: Embedding with max_norm or sparse=True is not supported")
    if not m.weight.dtype.is_floating_point:
        raise UnsupportedModuleError(f"{fqn}: weight dtype {m.weight.dtype} is not floating point")
    math_for(scheme).check_weight(scheme, op, tuple(m.weight.shape), fqn)


def _calibrate(
    model: nn.Module, chosen: list[tuple[str, nn.Module, str]], data: Iterable[Any]
) -> dict[str, dict[str, torch.Tensor]]:
    """Run the float model on `data`, recording input/output ranges of every chosen module."""
    ranges: dict[str, list[torch.Tensor]] = {}

    def hook(name: str):
        def record(_m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            for key, t in (("input", inputs[0]), ("output", output)):
                t = t.detach().float()
                lo, hi = t.amin(), t.amax()
                prev = ranges.get(f"{name}/{key}")
                ranges[f"{name}/{key}"] = [lo, hi] if prev is None else [torch.minimum(prev[0], lo), torch.maximum(prev[1], hi)]

        return record

    handles = [m.register_forward_hook(hook(fqn)) for fqn, m, _ in chosen]
    n = 0
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for batch in _validate.calibration_batches(data):
                if isinstance(batch, Mapping):
                    model(**batch)
                else:
                    model(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
                n += 1
    except Exception as e:
        raise _validate.calibration_failed(e, n) from e
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    if n == 0:
        raise CalibrationError("calibration_data is empty; pass at least one batch of example inputs")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for fqn, _, _ in chosen:
        if f"{fqn}/input" not in ranges:
            raise CalibrationError(f"{fqn} never ran during calibration; its activation range is unknown")
        t: dict[str, torch.Tensor] = {}
        for key in ("input", "output"):
            scale, zp = int8_asym_qparams(*ranges[f"{fqn}/{key}"])
            t[f"{key}_scale"] = scale.float()
            t[f"{key}_zero_point"] = zp.to(torch.int32)
        out[fqn] = t
    return out


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize(
    model: nn.Module,
    scheme: "str | Scheme",
    *,
    filter_fn: FilterFn | None = None,
    calibration_data: Iterable[Any] | None = None,
) -> nn.Module:
    """Replace the model's Linear / Conv2d / Embedding modules (those `filter_fn(module, fqn)` keeps,
    by default every one the scheme supports) by quantized modules, in place; returns the model.

    `calibration_data` (an iterable of argument tuples, or kwarg dicts) is required by static schemes.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModuleError(f"quantize() takes an nn.Module, got {type(model).__name__}")
    scheme = get_scheme(scheme)
    math = math_for(scheme)
    if scheme.activation == "static" and calibration_data is None:
        raise CalibrationError(
            f"scheme {scheme.name} quantizes activations statically and needs calibration_data: an "
            f"iterable of example argument tuples, e.g. calibration_data=[(x,) for x in batches]"
        )
    if isinstance(model, (nn.Linear, nn.Conv2d, nn.Embedding)):
        raise UnsupportedModuleError(
            "quantize() replaces submodules in place; wrap a bare Linear/Conv2d/Embedding in a container "
            "(e.g. nn.Sequential(layer))"
        )
    chosen = _select(model, scheme, filter_fn)
    if not chosen:
        raise NothingToQuantizeError(
            f"no module to quantize with {scheme.name}: it quantizes "
            f"{sorted(o for o in math.supported_ops if math.supports(scheme, o))} layers and none "
            f"{'passed filter_fn' if filter_fn else 'was found'}"
        )
    act = _calibrate(model, chosen, calibration_data) if scheme.activation == "static" else {}
    for fqn, m, op in chosen:
        tensors = math.quantize_weight(scheme, m.weight)
        tensors.update(act.get(fqn, {}))
        if op != "embedding" and getattr(m, "bias", None) is not None:
            tensors["bias"] = m.bias.detach().clone()
        q = QuantizedModule(scheme, op, _op_params(m), tuple(m.weight.shape), tensors, fqn)
        q.to(m.weight.device)
        q.train(m.training)
        _set_submodule(model, fqn, q)
    return model


def quantized_modules(model: nn.Module) -> list[tuple[str, QuantizedModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedModule)]
