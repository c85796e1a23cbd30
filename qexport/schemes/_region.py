"""The region function: what one `invoke_quant` region computes, composed from a scheme's math.

Written once for every family: quantize the activation (if the scheme says so), dequantize the
weight, run the module's op in the scheme's compute dtype, quantize the output (static schemes).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from . import activation as act
from ._scheme import Scheme
from .registry import math_for


def quantize_input(scheme: Scheme, x: torch.Tensor, t: Mapping[str, torch.Tensor], op: str) -> torch.Tensor:
    """A region's input `x` after the scheme's activation quantization (fake-quant, in x's dtype); `t`
    holds the region's tensors by role (static schemes read input_scale/input_zero_point)."""
    if scheme.activation == "none":
        return x
    if scheme.activation == "static":
        return act.static_int8(x, t["input_scale"], t["input_zero_point"])
    # Conv activations have no token axis: dynamic schemes quantize them per tensor.
    per_token = scheme.act_granularity == "per_token" and not op.startswith("conv")
    if scheme.act_dtype == "float8_e4m3fn":
        return act.dynamic_fp8(x, per_token)
    return act.dynamic_int8(x, per_token)


def apply_op(op: str, p: Mapping[str, Any], x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if op == "linear":
        return F.linear(x, w, bias)
    if op in ("conv1d", "conv2d"):
        conv = F.conv1d if op == "conv1d" else F.conv2d
        return conv(x, w, bias, p["stride"], p["padding"], p["dilation"], p["groups"])
    if op == "embedding":
        return F.embedding(x, w, p.get("padding_idx"))
    raise ValueError(f"unknown region op {op!r}")


def make_region_fn(
    scheme: Scheme, op: str, op_params: Mapping[str, Any], roles: Sequence[str], weight_shape: Sequence[int]
) -> Callable[..., tuple[torch.Tensor]]:
    """fn(input, *tensors in `roles` order) -> (output,) — the body of one region."""
    math = math_for(scheme)
    cd = scheme.torch_compute_dtype
    roles = tuple(roles)
    shape = tuple(weight_shape)
    out_dtype = getattr(torch, op_params.get("out_dtype", "float32"))

    # A weight-only table gathers the quantized rows its indices select, then dequantizes only those:
    # the same numbers, but Inductor does not fuse a full-table decode into the lookup for packed codes
    # (an int4 32000 x 768 table: 8 ms per token decoding all of it, vs 0.014 ms for int8's fused load).
    rows_first = op == "embedding" and scheme.activation == "none" and scheme.family != "fp8" and len(shape) == 2

    def region(x: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor]:
        t = dict(zip(roles, tensors))
        if rows_first:
            flat = x.reshape(-1)
            rows = {r: v.index_select(0, flat) if r != "bias" and v.dim() > 0 and v.shape[0] == shape[0] else v
                    for r, v in t.items()}
            w = math.dequantize_weight(scheme, rows, (flat.shape[0], shape[1]))
            # The output must not be a view (Inductor's invoke_quant lowering fails on one: "NotImplementedError:
            # ReinterpretView", seen compiling a bf16 Llama), so a real cast follows the reshape; with two
            # casts the reshape stays between them, or torch 2.11's Inductor folds fp32 -> bf16 -> fp32 into
            # no cast at all and leaves the view (seen on the H200).
            if out_dtype == cd:  # no cast to end in: the rows gathered once more, by position, end it
                return (F.embedding(torch.arange(flat.shape[0], device=x.device).reshape(x.shape), w.to(cd)),)
            return (w.to(cd).reshape(*x.shape, shape[1]).to(out_dtype),)
        w = math.dequantize_weight(scheme, t, shape).to(cd)
        if op == "embedding":
            return (apply_op(op, op_params, x, w, None).to(out_dtype),)
        xq = quantize_input(scheme, x, t, op).to(cd)
        bias = t.get("bias")
        y = apply_op(op, op_params, xq, w, None if bias is None else bias.to(cd))
        if scheme.activation == "static":
            y = act.static_int8(y.float(), t["output_scale"], t["output_zero_point"])
        return (y.to(x.dtype),)

    region.__qualname__ = region.__name__ = f"{scheme.name}_{op}_region"
    return region
