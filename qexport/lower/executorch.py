"""ExecuTorch backend: `to_executorch(program, "model.pte", backend="xnnpack"|"portable") -> LoweringReport`.

Each region is lowered from its scheme (never from the ops inside it):

* int8_static / int8_dynamic Linear and Conv2d become the `quantized_decomposed` Q/DQ patterns that
  PT2E's XNNPACKQuantizer produces (static: per-tensor Q/DQ around the op and on its output; dynamic:
  `choose_qparams_per_token_asymmetric` + per-token Q/DQ for Linear, the per-tensor `choose_qparams`
  form for Conv2d; weights: per-channel `dequantize_per_channel` of the int8 buffer), which XNNPACK's
  partitioner delegates as qs8 / qd8-f32-qc8w kernels.
* every other region (weight-only schemes, nf4, fp8, embeddings, hand-written regions) falls back to
  its own reference subgraph, inlined and computed in float32: the weights stay quantized in the .pte
  and are dequantized on every call by portable kernels, XNNPACK still runs the fp32 matmul where it
  can (embeddings dequantize only the rows they gather). Correct, not a quantized kernel, and the
  report record says why and what to change to get it delegated.

The region pass is `qexport.lower._graph.replace_regions`; a few small edge-compat passes follow, then
`attention.grouped_attention` (a decoder's attention without copies of its KV cache) and, in
`to_executorch`, ExecuTorch's reinplace pass (cache writes in place).
The program's qexport manifest travels inside the .pte as a constant method, which `serializers.pte`
builds (`manifest_methods`), writes and reads. A weight that a delegated region and code left in the
program both read (a tied embedding + LM head) goes to a data file beside the .pte (`share_with_delegates`).
"""

from __future__ import annotations

import collections.abc
import contextlib
import copy
import dataclasses
import logging
import operator
from dataclasses import dataclass
from os import PathLike
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch._guards import detect_fake_mode

from serializers import pte
from serializers.pte import MANIFEST_METHOD  # noqa: F401  (the method that returns the manifest)

from ..extras import missing_extra
from ..errors import BackendUnavailableError, LoweringError
from . import resolve_program
from ..regions import Region
from ..signature import InputSpec, program_inputs, tensor_inputs
from ..schemes.packing import unpack_uint4
from ._contract import Decline, PlanContext, RegionPlan, plan_regions, register_backend, register_lowering
from ._graph import RegionSite, call_before, drop_unused_state, region_of, replace_regions, replace_state, state_tensor
from .attention import grouped_attention
from ._stages import Stages
from .report import LoweringReport, RegionReport

if TYPE_CHECKING:
    from serializers.manifest import LoweringRecord

BACKENDS = ("xnnpack", "portable")

qd = torch.ops.quantized_decomposed
_aten = torch.ops.aten
_EPS = torch.finfo(torch.float32).eps


# -- per-scheme lowering ------------------------------------------------------------------------
# Plans are the backend contract's (`_contract.RegionPlan` from entries registered on backend
# "executorch"): `lowering` is the RegionSite rewrite, `taken` means XNNPACK is expected to delegate it
# (if its partitioner does not, its own words become the reason). backend="portable" lowers the same
# graph and delegates nothing (`_portable`).

def _weight_dq(site: RegionSite, weight: torch.fx.Node | None = None) -> torch.fx.Node:
    """Per-channel int8 weight: the `dequantize_per_channel(weight, scale, zero_point)` XNNPACK reads
    as a qc8w constant. Its zero point must be a program constant, so one is added. A per-tensor
    weight (granularity="per_tensor") is the per-channel one with its scale repeated: the op wants one
    scale per channel ("Invalid size of per channel quantization scales" failed every such program)."""
    s = site.region.scheme
    scale, scale_node = site.value("weight_scale"), site.operands["weight_scale"]
    channels = site.value_of(weight).shape[0] if weight is not None else site.value("weight").shape[0]
    if scale.numel() == 1 and channels > 1:
        scale = scale.reshape(1).expand(channels).contiguous()
        scale_node = site.constant("weight_scale_per_channel", scale)
    zp = site.constant("weight_zero_point_i64", torch.zeros(scale.shape, dtype=torch.int64))
    return site.call(
        qd.dequantize_per_channel.default, weight or site.operands["weight"], scale_node, zp, 0,
        int(s.qmin), int(s.qmax), torch.int8,
    )


def _apply_op(site: RegionSite, x: torch.fx.Node, w: torch.fx.Node) -> torch.fx.Node:
    r = site.region
    bias = site.operands.get("bias")
    if r.op == "linear":
        return site.call(torch.ops.aten.linear.default, x, w, bias)
    p = r.op_params
    conv = torch.ops.aten.conv1d if r.op == "conv1d" else torch.ops.aten.conv2d
    conv = conv.padding if isinstance(p["padding"], str) else conv.default
    return site.call(conv, x, w, bias, list(p["stride"]), p["padding"], list(p["dilation"]), int(p["groups"]))


def _lower_int8_static(site: RegionSite) -> torch.fx.Node:
    def qdq(x: torch.fx.Node, which: str) -> torch.fx.Node:
        scale, zp = float(site.value(f"{which}_scale")), int(site.value(f"{which}_zero_point"))
        q = site.call(qd.quantize_per_tensor.default, x, scale, zp, -128, 127, torch.int8)
        return site.call(qd.dequantize_per_tensor.default, q, scale, zp, -128, 127, torch.int8)

    y = _apply_op(site, qdq(site.input, "input"), _weight_dq(site))
    return qdq(y, "output")


def _dynamic_input(site: RegionSite, x: torch.fx.Node | None = None) -> torch.fx.Node:
    x = x or site.input
    if site.region.op.startswith("conv"):  # conv activations have no token axis: per tensor (as the scheme says)
        qp = site.call(qd.choose_qparams.tensor, x, -128, 127, _EPS, torch.int8)
        scale, zp = site.call(operator.getitem, qp, 0), site.call(operator.getitem, qp, 1)
        q = site.call(qd.quantize_per_tensor.tensor, x, scale, zp, -128, 127, torch.int8)
        xdq = site.call(qd.dequantize_per_tensor.tensor, q, scale, zp, -128, 127, torch.int8)
    else:
        qp = site.call(qd.choose_qparams_per_token_asymmetric.default, x, torch.int8)
        scale, zp = site.call(operator.getitem, qp, 0), site.call(operator.getitem, qp, 1)
        q = site.call(qd.quantize_per_token.default, x, scale, zp, -128, 127, torch.int8)
        xdq = site.call(qd.dequantize_per_token.default, q, scale, zp, -128, 127, torch.int8, torch.float32)
    return xdq


def _lower_int8_dynamic(site: RegionSite) -> torch.fx.Node:
    if site.region.op == "conv1d":
        return _dynamic_conv1d_as_conv2d(site)
    return _apply_op(site, _dynamic_input(site), _weight_dq(site))


def _dynamic_conv1d_as_conv2d(site: RegionSite) -> torch.fx.Node:
    """A conv1d as the conv2d over a height of 1 that it is (input [N, C, 1, L], weight [O, C/g, 1, K]):
    XNNPACK takes dynamically quantized convs only in 2-D ("XNNPACK only supports standard 2D
    convolutions for dynamic quantization": a Whisper encoder's conv front end stayed on portable kernels)."""
    p = site.region.op_params
    unbatched = site.input.meta["val"].dim() == 2  # XNNPACK takes batched convs only
    x = site.call(_aten.unsqueeze.default, site.input, 0) if unbatched else site.input
    x = site.call(_aten.unsqueeze.default, x, 2)
    w = _weight_dq(site, site.constant("weight_2d", site.value("weight").unsqueeze(2)))
    pad = p["padding"] if isinstance(p["padding"], str) else [0, *p["padding"]]
    conv = _aten.conv2d.padding if isinstance(pad, str) else _aten.conv2d.default
    y = site.call(conv, _dynamic_input(site, x), w, site.operands.get("bias"), [1, *p["stride"]], pad,
                  [1, *p["dilation"]], int(p["groups"]))
    y = site.call(_aten.squeeze.dim, y, 2)
    return site.call(_aten.squeeze.dim, y, 0) if unbatched else y


def _lower_int8_dynamic_int4_weight(site: RegionSite) -> torch.fx.Node:
    """Per-token int8 activations x blockwise int4 weights: the `dequantize_per_channel_group` of int8
    codes in [-8, 7] (torchao's 8da4w pattern) that XNNPACK takes as qb4w (it packs the codes two per
    byte and keeps the group scales in bf16, as the scheme stores them). The scheme's symmetric zero
    point 8 is subtracted here, once: qb4w has no per-block zero point."""
    codes = unpack_uint4(site.value("weight")).to(torch.int8) - 8
    scale = site.value("weight_scale").float()
    w = site.call(
        qd.dequantize_per_channel_group.default,
        _copy_of(site.constant("weight_int4", codes), site.operands["weight"], _in_qb4w_nibble_order),
        _copy_of(site.constant("weight_group_scale", scale), site.operands["weight_scale"]),  # bf16 to XNNPACK again
        site.constant("weight_group_zero_point", torch.zeros(scale.shape, dtype=torch.int8)),
        -8, 7, torch.int8, site.region.scheme.group_size, torch.float32,
    )
    return _apply_op(site, _dynamic_input(site), w)


def _reference(site: RegionSite) -> torch.fx.Node:
    return site.inline_reference()


_LOW_PRECISION = (torch.bfloat16, torch.float16)
_CASTS = (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default)


def compute_in_float32(site: RegionSite, output: torch.fx.Node | None = None) -> bool:
    """Compute a region whose scheme says bf16/fp16 in float32: its casts to a low-precision dtype are
    dropped (from float32) or made casts to float32 (from a low-precision input or bias); `output`, the
    region's result, keeps the dtype the program reads.

    Why: ExecuTorch has no fast bf16 GEMM — XNNPACK's partitioner takes fp32 linears only and the
    portable bf16 linear is a plain loop (all-MiniLM-L6-v2 int4_weight_only: 35 s per call) that also
    accumulates in bf16 (a bf16 part of a model, int8_weight_only: 2.4 % from eager at 128 inputs, 4.5 % at
    1024, above the scheme's 2 %). In float32 the region is at least as accurate as the scheme's bf16
    compute, and XNNPACK can run its matmul with the weight dequantized at run time
    (`force_non_static_weights_for_f32_linear`).
    """
    changed = False
    for n in site.emitted:
        if n is output or n.op != "call_function" or n.target not in _CASTS:
            continue
        dtype = n.kwargs.get("dtype", n.args[1] if len(n.args) > 1 else None)
        src = n.args[0]
        if dtype not in _LOW_PRECISION or not src.meta["val"].dtype.is_floating_point:
            continue
        if src.meta["val"].dtype == torch.float32:
            n.replace_all_uses_with(src)
        else:
            with site.before(n):
                n.replace_all_uses_with(site.call(torch.ops.aten._to_copy.default, src, dtype=torch.float32))
        site.graph.erase_node(n)
        changed = True
    return changed


def _in_float32(lower: Callable[[RegionSite], torch.fx.Node]) -> Callable[[RegionSite], torch.fx.Node]:
    def lower_in_float32(site: RegionSite) -> torch.fx.Node:
        out = lower(site)
        dtype = out.meta["val"].dtype
        compute_in_float32(site, out)
        if out.target not in _CASTS and dtype != torch.float32:  # computed in float32 now: back to what follows reads
            out = site.call(torch.ops.aten._to_copy.default, out, dtype=dtype)
        return out

    return lower_in_float32


_FP8 = torch.float8_e4m3fn
_FP8_MANTISSA_BITS = 3
_FP8_MIN_NORMAL_EXP = -6


def _lower_fp8_reference(site: RegionSite) -> torch.fx.Node:
    """The fp8 region's reference subgraph with its float8 casts replaced, because ExecuTorch has no
    float8 kernels (the portable `_to_dim_order_copy` rejects Float8_e4m3fn at run time):

    * the fp8 weight buffer is widened to bfloat16 at lowering time: every e4m3 value is exactly a
      bfloat16, so the reference's `weight.float()` sees the same numbers;
    * the activation round trip `v.to(float8_e4m3fn).float()` (v already clamped to ±448 by the
      reference) becomes round-to-nearest-even on e4m3's grid, computed in float: the grid step is
      2**(floor(log2|v|) - 3), with subnormals sharing the step of 2**-6.
    """
    out = site.inline_reference()
    aten = torch.ops.aten
    wide: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in site.emitted:
        for src in n.all_input_nodes:
            if src.op == "placeholder" and src.meta["val"].dtype == _FP8:
                if src not in wide:
                    wide[src] = site.constant(f"{src.name}_bf16", site.value_of(src).to(torch.bfloat16))
                n.replace_input_with(src, wide[src])
        val = n.meta.get("val")
        if not (isinstance(val, torch.Tensor) and val.dtype == _FP8):
            continue
        src = n.args[0]
        with site.before(n):
            mag = site.call(aten.clamp.default, site.call(aten.abs.default, src), 2.0 ** _FP8_MIN_NORMAL_EXP)
            exp = site.call(aten.floor.default, site.call(aten.log2.default, mag))
            step = site.call(aten.pow.Scalar, 2.0, site.call(aten.sub.Tensor, exp, _FP8_MANTISSA_BITS))
            units = site.call(aten.round.default, site.call(aten.div.Tensor, src, step))
            rounded = site.call(aten.mul.Tensor, units, step)
        n.replace_all_uses_with(rounded)
        site.graph.erase_node(n)
    return out


_PORTABLE = ("falls back to its reference decomposition (weights dequantized on every call, the matmul in "
             "float32, on XNNPACK where it takes it)")
_FLOAT32_ONLY = "XNNPACK's int8 patterns take float32 activations"
_DELEGATE_IT = "Quantize with int8_dynamic to delegate it"
_QDQ_KERNELS = {"static": "qs8 {op} (static int8 Q/DQ)", "dynamic": "qd8-f32-qc8w {op} (dynamic int8 Q/DQ)"}
_QDQ_LOWERINGS = {"static": _lower_int8_static, "dynamic": _lower_int8_dynamic}


def plan_int8_qdq(ctx: PlanContext) -> RegionPlan | Decline | None:
    """int8 weights with int8 activations: the Q/DQ pattern XNNPACK's partitioner delegates."""
    r, s = ctx.region, ctx.region.scheme
    if s.activation == "none":
        return Decline("XNNPACK (ExecuTorch) takes int8 weights only with int8 activations; int8_weight_only keeps "
                       f"float activations, so it {_PORTABLE} (weights stay int8). {_DELEGATE_IT}")
    if s.activation not in _QDQ_LOWERINGS:
        return None
    if r.input_dtypes[:1] != ("float32",):
        return Decline(f"its input is {r.input_dtypes[0] if r.input_dtypes else '?'}; {_FLOAT32_ONLY}, so it "
                       f"{_PORTABLE}. Export the model in float32 to delegate it")
    return RegionPlan(True, "XNNPACK " + _QDQ_KERNELS[s.activation].format(op=r.op), _own_qparams_caveat(ctx),
                      lowering=_QDQ_LOWERINGS[s.activation])


def _own_qparams_caveat(ctx: PlanContext) -> str:
    """XNNPACK's dynamically quantized ops take the per-tensor Q/DQ pattern but quantize each image (a
    conv: executorch's QuantParams `num_nonbatch_dims=3`) or each row (a linear) with its own qparams,
    which is the scheme's per-tensor quantization only where there is one: say so where there can be more."""
    r, s = ctx.region, ctx.region.scheme
    if s.activation != "dynamic":
        return ""
    if r.op == "linear" and s.act_granularity == "per_tensor":
        rows = 1
        for d in ctx.input_val.shape[:-1]:
            rows = rows * d
        if isinstance(rows, int) and rows == 1:
            return ""
        return ("XNNPACK quantizes each row (token) of its input with its own scale, the scheme one scale per tensor: "
                "the same numbers for one row; for more they differ from the eager model by int8 rounding (rows whose "
                "ranges differ 1000x: 0.7 % of the output range, 44 % of a small row's). Quantize with "
                "act_granularity='per_token' (int8_dynamic's default) for eager's numbers")
    if not r.op.startswith("conv"):
        return ""
    batched = ctx.input_val.dim() == (3 if r.op == "conv1d" else 4)
    batch = ctx.input_val.shape[0] if batched else 1
    if isinstance(batch, int) and batch == 1:
        return ""
    return ("XNNPACK quantizes each image's activations with its own scale, the scheme one scale per batch: the same "
            "numbers at batch 1; at batch > 1 they differ from the eager model by int8 rounding (ConvNeXt, batch 3: "
            "2.4e-2 of the output range, beyond int8_dynamic's tolerance). Run it one image per call for eager's "
            "numbers, or quantize this layer with int8_static")


def plan_int4(ctx: PlanContext) -> RegionPlan | Decline:
    """int4 linears: XNNPACK's qd8-f32-qb4w takes per-token int8 activations x symmetric int4 weights."""
    r, s = ctx.region, ctx.region.scheme
    if s.activation == "none":
        return Decline("XNNPACK's 4-bit kernels need int8 dynamic activations and symmetric weights; int4_weight_only "
                       f"has float activations and per-group zero points, so it {_PORTABLE}. Quantize with "
                       "int8_dynamic_int4_weight to delegate it")
    if not s.symmetric:
        return Decline(f"XNNPACK's qb4w weights have no per-block zero point and {s.name} has symmetric=False, so it "
                       f"{_PORTABLE}. Keep symmetric=True to delegate it")
    if r.input_dtypes[:1] != ("float32",):
        return Decline(f"its input is {r.input_dtypes[0] if r.input_dtypes else '?'}; {_FLOAT32_ONLY}, so it "
                       f"{_PORTABLE}. Export the model in float32 to delegate it")
    return RegionPlan(True, "XNNPACK qd8-f32-qb4w linear (dynamic int8 x blockwise int4)",
                      lowering=_lower_int8_dynamic_int4_weight)


def _declines(reason: str) -> Callable[[PlanContext], Decline]:
    def decline(ctx: PlanContext) -> Decline:
        return Decline(reason)

    return decline


def plan_fp8(ctx: PlanContext) -> RegionPlan:
    """fp8 has no ExecuTorch kernels at all: its reference, with the float8 casts rewritten."""
    return _reference_plan(ctx.region, _lower_fp8_reference, (
        "neither XNNPACK nor ExecuTorch's portable kernels have float8 arithmetic: its weights are widened to "
        "bfloat16 (exactly, 2x the fp8 bytes), the fp8 activation rounding is computed in float and the matmul "
        "runs in fp32. Quantize with int8_dynamic to delegate it"))


_INT8_OPS = ("linear", "conv1d", "conv2d")
for _op in _INT8_OPS:
    register_lowering("int8", "executorch", _op, plan_int8_qdq)
    register_lowering("nf4", "executorch", _op, _declines(
        f"XNNPACK has no codebook (NF4) weights, so it {_PORTABLE}. {_DELEGATE_IT}"), name="nf4_codebook")
for _op in (*_INT8_OPS, "embedding"):
    register_lowering("fp8", "executorch", _op, plan_fp8)
register_lowering("int4", "executorch", "linear", plan_int4)


def _reference_plan(region: Region, reference: Callable[[RegionSite], torch.fx.Node], why: str) -> RegionPlan:
    """The region's reference math on portable kernels, a linear or conv computed in float32 whatever
    its input's dtype (a weight-only embedding's reference gathers its quantized rows before
    dequantizing them: a gather, nothing to accumulate)."""
    s, kernel = region.scheme, "portable (reference decomposition)"
    rows_first = region.op == "embedding" and s.activation == "none" and s.family != "fp8"
    if rows_first:
        kernel = "portable (gather quantized rows, dequantize them)"
        float32_out = region.op_params.get("out_dtype", "float32") == "float32"
    else:
        float32_out = region.op != "embedding"  # a low-precision input is widened: see compute_in_float32
    if s.compute_dtype != "float32" and float32_out:
        reference = _in_float32(reference)
    return RegionPlan(False, kernel, why, lowering=reference)


def _fallback(ctx: PlanContext, reasons: list[str], registered: bool) -> RegionPlan:
    r = ctx.region
    if r.scheme is None:
        raise LoweringError(
            f"region {r.name} uses scheme {r.scheme_name!r}, which is not registered in this process; "
            f"import the module that registers it before lowering"
        )
    if reasons:
        why = "; ".join(reasons)
    elif r.op == "embedding":
        why = ("XNNPACK has no embedding kernel; the region gathers the quantized rows it needs and dequantizes "
               "them on portable kernels (its weights stay quantized in the .pte)")
    elif r.op == "custom":
        why = f"a hand-written region (op='custom') has no XNNPACK pattern; it {_PORTABLE}"
    else:
        why = f"XNNPACK has no {r.scheme.name} {r.op} pattern; the region {_PORTABLE}"
    return _reference_plan(r, _reference, why)


register_backend("executorch", title="ExecuTorch (XNNPACK)", fallback=_fallback, lowering_type=collections.abc.Callable)


#: Q/DQ lowerings whose every op has a kernel in ExecuTorch's quantized library (no delegate needed)
_PORTABLE_QDQ = tuple(_QDQ_LOWERINGS.values())


def _portable(plan: RegionPlan) -> RegionPlan:
    """The plan under backend="portable": the same graph, nothing delegated; a pattern only XNNPACK runs
    becomes the region's reference."""
    if plan.taken and plan.lowering in _PORTABLE_QDQ:
        return dataclasses.replace(plan, taken=False, kernel="portable + quantized Q/DQ kernels", reason=(
            "backend='portable' delegates nothing; use backend='xnnpack' to accelerate it"))
    if plan.taken:
        # qb4w's dequantize_per_channel_group has no out-variant outside XNNPACK: to_executorch failed
        # with "Missing out variants" on every 8da4w program
        ref = _reference_plan(plan.region, _reference, "")
        return dataclasses.replace(plan, taken=False, kernel=ref.kernel, lowering=ref.lowering, reason=(
            f"backend='portable' delegates nothing and ExecuTorch has no portable kernel for its {plan.kernel} "
            f"pattern, so the region {_PORTABLE}; use backend='xnnpack' to run it as {plan.kernel}"))
    return dataclasses.replace(plan, reason="backend='portable' delegates nothing; the region " + _PORTABLE)


def plan(ep: torch.export.ExportedProgram, backend: str = "xnnpack") -> list[RegionPlan]:
    """What each region of `ep` becomes on ExecuTorch with `backend`, decided from its scheme."""
    plans = plan_regions(ep, "executorch")
    return [_portable(p) for p in plans] if backend == "portable" else plans


# -- edge-compat passes -------------------------------------------------------------------------

def rshift_as_floor_divide(gm: torch.fx.GraphModule) -> bool:
    """`x >> k` on the unsigned 4-bit codes -> `x // 2**k`.

    Why: torch records `>>` as `aten.__rshift__.Scalar`, which is not Core ATen, so `to_edge` rejects
    it; floor division of a non-negative integer by 2**k is the same value and is Core ATen with a
    portable kernel.
    """
    changed = False
    for n in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.__rshift__.Scalar):
        n.target = torch.ops.aten.div.Tensor_mode
        n.args = (n.args[0], 2 ** int(n.args[1]))
        n.kwargs = {"rounding_mode": "floor"}
        changed = True
    if changed:
        gm.recompile()
    return changed


# -- weights a delegate shares with the program ---------------------------------------------------

#: ExecuTorch's tag for the data file the shared weights go to (its name on disk is the .pte's stem + .ptd)
SHARED_DATA_TAG = "qexport_shared"


#: meta key of a constant a lowering derived for XNNPACK from a program tensor: (that tensor's node, the
#: pass that makes the program hold XNNPACK's bytes of the copy, or None where it already does)
_COPY_OF = "qexport_xnnpack_copy_of"

_Relayout = Callable[[torch.export.ExportedProgram, torch.fx.Node, "list[torch.fx.Node]"], None]


def _copy_of(copy_node: torch.fx.Node, source: torch.fx.Node, relayout: _Relayout | None = None) -> torch.fx.Node:
    copy_node.meta[_COPY_OF] = (source, relayout)
    return copy_node


def share_with_delegates(ep: torch.export.ExportedProgram, plans: dict[str, RegionPlan]) -> set[str]:
    """Tag the program's state tensors that a region planned for XNNPACK and code left in the program
    both read (GPT-2's tied `wte` / `lm_head`), directly or through a copy the region's lowering made
    (an int8_dynamic_int4_weight head's int8 codes), for one data file, on both sides; returns their
    placeholder names, which `ExecutorchBackendConfig(external_constants=...)` is given.

    Why: XNNPACK serializes its own copy of every weight it takes into named data, and ExecuTorch 1.5.1
    resolves a program tensor kept outside the program's constants only through an external data map
    (a program tensor naming a blob of the .pte's own named data fails to load: `external_data_map is
    null`). Written to one external file, the program constant and XNNPACK's blob (the same bytes:
    int8 codes and float32 scales; qb4w nibbles and bf16 scales once the program holds the codes in
    XNNPACK's nibble order) are one buffer of ExecuTorch's NamedDataStore, which deduplicates by content.
    """
    sig = ep.graph_signature
    state = {*sig.inputs_to_parameters, *sig.inputs_to_buffers, *sig.inputs_to_lifted_tensor_constants}

    def delegated(n: torch.fx.Node) -> bool:
        return (r := region_of(n)) is not None and r in plans and plans[r].taken

    copies: dict[torch.fx.Node, list[tuple[torch.fx.Node, _Relayout | None]]] = {}
    for node in ep.graph.find_nodes(op="placeholder"):
        if _COPY_OF in node.meta and node.users and all(delegated(u) for u in node.users):
            source, relayout = node.meta[_COPY_OF]
            copies.setdefault(source, []).append((node, relayout))
    shared = set()
    for node in ep.graph.find_nodes(op="placeholder"):
        if node.name not in state:
            continue
        direct = [u for u in node.users if delegated(u)]
        program = [u for u in node.users if not delegated(u)]
        relayouts = {r for _, r in copies.get(node, ()) if r is not None}
        # one program tensor holds one layout: XNNPACK reading it as it is and as a relayout cannot share
        if not program or not (direct or node in copies) or (relayouts and direct) or len(relayouts) > 1:
            continue
        for relayout in relayouts:
            relayout(ep, node, program)
        shared.add(node.name)
        # XNNPACK reads the tag from the weight's node and its dequantize
        for n in (node, *direct, *(m for c, _ in copies.get(node, ()) for m in (c, *c.users))):
            n.meta["custom"] = {**(n.meta.get("custom") or {}), "delegate_constant_tag": SHARED_DATA_TAG}
    return shared


#: ops whose output holds bytes of their first operand unchanged (a nibble swap commutes with them)
_MOVES_BYTES = (_aten.index_select.default, _aten.embedding.default, _aten.index.Tensor, _aten.reshape.default,
                _aten.view.default, _aten.slice.Tensor, _aten.select.int)


def _in_qb4w_nibble_order(ep: torch.export.ExportedProgram, table: torch.fx.Node, readers: list[torch.fx.Node]) -> None:
    """Store the uint4 codes `table` (qexport's packing: even element in the high nibble) in the byte
    layout XNNPACK serializes for a qb4w weight (`NodeVisitor.convert_to_qc4w`: the int8 code + 8, which
    is qexport's uint4 code under the symmetric zero point 8, even element in the low nibble), and swap
    the nibbles back where the program reads it: after a row gather (the embedding's, on the rows it
    reads, not the table), else before the reader."""
    w = state_tensor(ep, table)
    replace_state(ep, table, ((w & 0xF) << 4) | (w >> 4))
    for reader in readers:
        if reader.target in _MOVES_BYTES and reader.args[0] is table:
            users = list(reader.users)
            swapped = _swap_nibbles(reader, reader.next, reader)
            for u in users:
                u.replace_input_with(reader, swapped)
        else:
            reader.replace_input_with(table, _swap_nibbles(table, reader, reader))
    ep.graph_module.recompile()


def _swap_nibbles(x: torch.fx.Node, anchor: torch.fx.Node, like: torch.fx.Node) -> torch.fx.Node:
    """`(x & 0xF) * 16 + x // 16` on uint8, in Core ATen ops with portable kernels (no shifts: not Core ATen)."""
    lo = call_before(anchor, _aten.bitwise_and.Scalar, x, 0xF, like=like)
    hi = call_before(anchor, _aten.div.Tensor_mode, x, 16, rounding_mode="floor", like=like)
    lo16 = call_before(anchor, _aten.mul.Tensor, lo, 16, like=like)
    return call_before(anchor, _aten.add.Tensor, lo16, hi, like=like)


# -- the stage ----------------------------------------------------------------------------------

class _WhyNoPartition(logging.Handler):
    """Collects the reasons XNNPACK's partitioner logs (`WhyNoPartition`, at DEBUG) for rejected nodes."""

    LOGGER = "executorch.backends.xnnpack"

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.by_region: dict[str, list[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        node, reason = getattr(record.msg, "node", None), getattr(record.msg, "reason", None)
        if isinstance(node, torch.fx.Node) and reason:
            region = region_of(node)
            if region is not None:
                op = getattr(node.target, "__name__", str(node.target))
                self.by_region.setdefault(region, []).append(f"{op}: {reason}")

    def __enter__(self) -> "_WhyNoPartition":
        self._logger = logging.getLogger(self.LOGGER)
        self._level, self._propagate = self._logger.level, self._logger.propagate
        self._logger.addHandler(self)
        self._logger.setLevel(logging.DEBUG)
        self._logger.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)
        self._logger.propagate = self._propagate


#: the edge ops that carry a region's op (what must sit inside a delegate for the region to count)
_ANCHORS = {"linear": ("linear", "mm"), "conv1d": ("convolution",), "conv2d": ("convolution",), "embedding": ("embedding", "index")}


def _delegation(
    edge_gm: torch.fx.GraphModule, ops: dict[str, str]
) -> tuple[dict[str, str], dict[str, list[str]], set[str]]:
    """region -> backend id that took some of its nodes; region -> its anchor ops left outside delegates;
    the regions with any node left in the program."""
    taken: dict[str, str] = {}
    left: dict[str, list[str]] = {}
    present: set[str] = set()
    for node in edge_gm.graph.nodes:
        if node.op == "get_attr" and hasattr(getattr(edge_gm, node.target, None), "backend_id"):
            lowered = getattr(edge_gm, node.target)
            for inner in lowered.original_module.graph.nodes:
                if (r := region_of(inner)) is not None:
                    taken.setdefault(r, lowered.backend_id)
                    present.add(r)
        elif node.op == "call_function" and (r := region_of(node)) is not None:
            present.add(r)
            name = str(getattr(node.target, "__name__", node.target))
            anchors = _ANCHORS.get(ops.get(r, ""), tuple(a for v in _ANCHORS.values() for a in v))
            if any(k in name for k in anchors):
                left.setdefault(r, []).append(name)
    return taken, left, present


def _records(planned: list[RegionPlan], edge_gm: torch.fx.GraphModule, why: _WhyNoPartition) -> list[LoweringRecord]:
    """Each region's lowering record: its plan, checked against where its nodes went after partitioning."""
    taken, left, present = _delegation(edge_gm, {p.region.name: p.region.op for p in planned})
    records = []
    for plan in planned:
        r = plan.region
        if r.name not in present:
            records.append(plan.record(backend="-", taken=False, kernel="removed (dead code)", reason=(
                "nothing in the program uses its output, so it was removed with its weights; it costs nothing "
                "at run time")))
            continue
        # the region's GEMM/conv ran inside a delegate and none of its compute ops stayed outside
        in_delegate = r.name in taken and not left.get(r.name)
        if plan.taken and in_delegate:
            records.append(plan.record(backend=taken[r.name]))
            continue
        reason = plan.reason
        if plan.taken:
            said_all = why.by_region.get(r.name, [])
            # the refusal of the region's own op, not of the layout ops around it (unsqueeze_copy, ...)
            anchored = [w for w in said_all if any(a in w.split(":")[0] for a in _ANCHORS.get(r.op, ()))]
            said = "; ".join(dict.fromkeys(anchored or said_all))
            reason = (f"XNNPACK's partitioner did not take it ({said or 'no reason logged'}); it runs on portable "
                      f"kernels. Try another scheme for this layer (e.g. int8_static) or leave it in float with "
                      f"quantize(filter_fn=...)")
        if in_delegate:  # a fallback whose fp32 matmul XNNPACK took: the quantized form still is not delegated
            backend_name, kernel = f"portable+{taken[r.name]}", f"dequantize per call + XNNPACK fp32 {r.op}"
        else:
            backend_name, kernel = "portable", "portable" if plan.taken else plan.kernel
        records.append(plan.record(backend=backend_name, taken=False, kernel=kernel, reason=reason))
    return records


def _check_input_layouts(ep: torch.export.ExportedProgram) -> None:
    """Refuse a program whose inputs were exported from examples neither contiguous nor channels-last
    (a transposed view): its `.pte` records that layout, which ExecuTorch's runtime cannot be given
    ("Input 0 for method forward should be contiguous or channels-last"), and a contiguous input failed
    inside the method (XNNPACK and portable alike; ExecuTorch 1.5.1, a plain float Linear too)."""
    for node, val in tensor_inputs(ep):
        if not val.is_contiguous() and not (val.dim() == 4 and val.is_contiguous(memory_format=torch.channels_last)):
            raise LoweringError(
                f"input {node.name} was exported from a non-contiguous example (strides {tuple(val.stride())}, a "
                f"transposed view?); an ExecuTorch .pte takes contiguous or channels-last inputs only: export the "
                f"model again with x.contiguous() as the example"
            )


def channels_last_inputs_as_contiguous(ep: torch.export.ExportedProgram) -> bool:
    """A program exported from a channels-last example takes a contiguous input, made channels-last by
    its first node. Why: the `.pte` records each input's dim order and ExecuTorch's runtime copies the
    tensor it is given into that layout without reordering it: an ordinary (contiguous) image into a
    channels-last input computed garbage, silently (a float Conv2d: 1.85 relative error; the plain
    ExecuTorch flow the same). XNNPACK converts to its own layout inside the delegate either way."""
    changed = False
    first = next(n for n in ep.graph.nodes if n.op != "placeholder")
    for node, val in tensor_inputs(ep):
        if val.dim() == 4 and not val.is_contiguous() and val.is_contiguous(memory_format=torch.channels_last):
            fake_mode = detect_fake_mode([val])
            with fake_mode if fake_mode is not None else contextlib.nullcontext():
                node.meta["val"] = val.contiguous()
            as_before = call_before(first, torch.ops.aten.clone.default, node, fake_mode=fake_mode,
                                    memory_format=torch.channels_last)
            node.replace_all_uses_with(as_before, delete_user_cb=lambda user: user is not as_before)
            changed = True
    if changed:
        ep.graph_module.recompile()
    return changed


def planned_inputs(ep: torch.export.ExportedProgram) -> tuple[list[InputSpec], dict[str, int]]:
    """The program's inputs as a `.pte` of it takes them, and {dim name: size} of the dynamic dims
    that had no upper bound. ExecuTorch plans every tensor's memory for its dims' upper bounds and
    gives a dim without one the example's size (executorch.exir.sym_util.eval_upper_bound), so the
    `.pte` refuses anything larger: its manifest says so, rather than the program's open range."""
    out, unbounded = [], {}
    for spec, (_, val) in zip(program_inputs(ep), tensor_inputs(ep)):
        dims = []
        for d, size in zip(spec.shape, val.shape):
            if d.dynamic and d.max is None and isinstance(size, torch.SymInt) and size.node.hint is not None:
                d = dataclasses.replace(d, max=int(size.node.hint))
                unbounded[d.name] = d.max
            dims.append(d)
        out.append(dataclasses.replace(spec, shape=tuple(dims)))
    return out, unbounded


def _check_dims_kept(edge: torch.export.ExportedProgram, inputs: list[InputSpec]) -> None:
    """LoweringError when ExecuTorch's lowering made a dynamic input dim static: the `.pte` would take
    only the example's size while its manifest promised the range. Seen with transformers'
    `batched_mm` mixture-of-experts (the only MoE form that reaches the edge dialect): the edge program
    fixed an LM's prompt length at 2, so the `.pte` could take neither a prompt nor one decode token."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    lost = [f"{spec.name} dim {i} ({d.name}) fixed at {size}"
            for spec, (_, val) in zip(inputs, tensor_inputs(edge)) for i, (d, size) in enumerate(zip(spec.shape, val.shape))
            if d.dynamic and is_concrete_int(size)]  # an int, or a SymInt whose expression became a number
    if lost:
        raise LoweringError(
            f"ExecuTorch's lowering (to_edge_transform_and_lower) made dynamic dims static: {'; '.join(lost)} (one of "
            f"its decompositions specializes an op of the model on the example's size), so the .pte would take only "
            f"that size; nothing was written. Export with that dim static, or lower with qexport.compile / to_onnx")


@contextlib.contextmanager
def _bounded_at_example(program: torch.export.ExportedProgram) -> Iterator[None]:
    """Give each input dim without an upper bound its example's size as one while ExecuTorch plans memory.
    Its planner falls back to the example value for any size expression with no finite bound, so a
    tensor of `batch * seq` was planned at the example's seq too and the `.pte` refused a longer
    (bounded) seq; bounded here, it is planned at `batch_example * seq_max`, what `planned_inputs` says."""
    from torch.utils._sympy.numbers import int_oo
    from torch.utils._sympy.value_ranges import ValueRanges

    changed = []
    for node in program.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        for size in val.shape if isinstance(val, torch.Tensor) else ():
            if not isinstance(size, torch.SymInt) or size.node.hint is None:
                continue
            env, sym = size.node.shape_env, size.node.expr
            vr = env.var_to_range.get(sym)
            if vr is not None and vr.upper is int_oo and all(c[1] != sym for c in changed):
                changed.append((env, sym, vr))
                env.var_to_range[sym] = ValueRanges(vr.lower, int(size.node.hint))
    try:
        yield
    finally:
        for env, sym, vr in changed:
            env.var_to_range[sym] = vr


def _initialized_buffers(ep: Any) -> list:
    """ExecuTorch stores a mutated buffer's shape and dtype only, and the runtime starts it from whatever
    its memory held; eager starts from the buffer's value (a KV cache's zeros, which masked attention
    still multiplies by 0: garbage there can be NaN). Every mutated buffer keeps its initial value."""
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    sig = ep.graph_signature
    mutated = set(sig.buffers_to_mutate.values())
    names = [p for p, fqn in sig.inputs_to_buffers.items() if fqn in mutated]
    return [InitializedMutableBufferPass(names)] if names else []


def _writes_only_buffers_in_place(ep: torch.export.ExportedProgram) -> bool:
    """Whether ExecuTorch's reinplace pass may run: every op it would make in-place writes a mutated
    buffer (a KV cache). It rewrites any such op whose input nothing reads later, and on other inputs
    the result fails: an `index_put` on a delegate's output (an LM exported with cache="io": its clone of
    each cache input is delegated) failed lowering ("a leaf Variable that requires grad is being used in
    an in-place operation"), and one on a clone of an input failed at run time (the in-place kernel's
    special case: "values to match index length", executorch 1.5.1). Without it those write a copy."""
    from executorch.exir.passes.reinplace import DEFAULT_INPLACEABLE_OPS

    sig = ep.graph_signature
    mutated = set(sig.buffers_to_mutate.values())
    buffers = {p for p, fqn in sig.inputs_to_buffers.items() if fqn in mutated}
    return all(isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "placeholder" and n.args[0].name in buffers
               for n in ep.graph.nodes if n.op == "call_function" and n.target in DEFAULT_INPLACEABLE_OPS)


def _memory_planning() -> Any:
    """ExecuTorch's memory planning pass, with each view of an in-place op's result planned where that
    result lives. The reinplace pass makes the KV cache's `index_put` write its buffer in place, and the
    planner then gives the op's result the buffer's spec (`_alias_inplace_result_specs`), but a
    `memory.view` of that result made before (`ReplaceViewCopyWithViewPass`) keeps the result's old spec,
    which is planned as a slot of its own that nothing writes: a static view is elided to that slot, so
    attention left on portable kernels (a bf16 or fp16 model, backend="portable") read garbage instead of
    the cache (logits off by more than their size, or NaN; executorch 1.5.1). The views are re-based on
    their base's spec once the results are aliased, as the planner would alias them itself."""
    from executorch.exir.passes import MemoryPlanningPass

    try:
        from executorch.exir import memory
        from executorch.exir.memory_planning import _alias_inplace_result_specs, _is_inplace_node
        from executorch.exir.passes.replace_view_copy_with_view_pass import _ViewSpec
    except ImportError:  # an executorch that does not alias in-place results has no stale views either
        return MemoryPlanningPass()

    class ViewsFollowInplaceResults(MemoryPlanningPass):
        def run(self, graph_module: torch.fx.GraphModule, graph_signature: Any = None) -> Any:
            nodes = list(graph_module.graph.nodes)
            for node in nodes:
                if _is_inplace_node(node):
                    _alias_inplace_result_specs(node)
            for node in nodes:
                spec = node.meta.get("spec")
                base = node.args[0].meta.get("spec") if node.target is memory.view and node.args else None
                if isinstance(spec, _ViewSpec) and base is not None and spec._base is not base:
                    spec._base = base
            return super().run(graph_module, graph_signature)

    return ViewsFollowInplaceResults()


def to_executorch(
    program_or_path: "torch.export.ExportedProgram | str | PathLike[str]",
    output: "str | PathLike[str]",
    *,
    backend: str = "xnnpack",
    progress: bool = True,
) -> LoweringReport:
    """Lower a qexport program (or `.pt2`) to an ExecuTorch `.pte` at `output`; returns the report of
    where each region went. `backend="xnnpack"` delegates what XNNPACK takes; `"portable"` delegates
    nothing (every op runs on ExecuTorch's portable and quantized kernels). Stages that run over two
    seconds are named on stderr unless `progress=False`.

    A weight that a delegated region shares with the program (a tied embedding + LM head) is written
    once, to a data file beside `output` (same stem, `.ptd`), which the `.pte` names and checksums and
    every qexport opener reads with it; any other program is the one `.pte`."""
    from serializers.files import atomic_path, check_writable, replace_into

    if backend not in BACKENDS:
        raise LoweringError(f"backend={backend!r} is not one of {BACKENDS}")
    out = check_writable(output, ".pte")
    data_out = check_writable(out.with_suffix(pte.DATA_SUFFIX))
    ep = resolve_program(program_or_path, "to_executorch")
    _check_input_layouts(ep)
    try:
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
        import executorch.kernels.quantized  # noqa: F401  (registers the quantized_decomposed out-variants)
    except ImportError as e:
        raise missing_extra(e, "to_executorch") or BackendUnavailableError(f"to_executorch cannot import executorch ({e})") from None

    planned = plan(ep, backend)
    found = [p.region for p in planned]
    plans = {p.region.name: p for p in planned}
    import serializers

    inputs, unbounded = planned_inputs(ep)
    manifest = serializers.Manifest.from_program(ep, artifact="pte", backend=backend,
                                                 inputs=[i.to_json() for i in inputs])
    stage = Stages("to_executorch", enabled=progress)

    with stage(f"lowering {len(found)} regions to Q/DQ and reference ops"):
        ep = copy.deepcopy(ep)  # the caller's program stays as it was
        channels_last_inputs_as_contiguous(ep)
        replace_regions(ep, lambda site: plans[site.region.name].lowering(site), kernel_of=lambda r: plans[r.name].kernel)
        rshift_as_floor_divide(ep.graph_module)
        grouped_attention(ep)
        drop_unused_state(ep)
        shared = share_with_delegates(ep, plans) if backend == "xnnpack" else set()

    partitioners = []
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioners.append(XnnpackPartitioner())
        # A second pass takes the fp32 linears whose weight a fallback region dequantizes at run time;
        # partitioning is a large share of lowering time, so only when there is such a region.
        if any(r.op == "linear" and not plans[r.name].taken for r in found):
            partitioners.append(XnnpackPartitioner(force_non_static_weights_for_f32_linear=True))
    try:
        with _WhyNoPartition() as why, stage(f"to_edge_transform_and_lower ({backend})"):
            edge = to_edge_transform_and_lower(
                ep, partitioner=partitioners or None, constant_methods=pte.manifest_methods(manifest)
            )
        _check_dims_kept(edge.exported_program(), inputs)
        edge_gm = edge.exported_program().graph_module
        records = _records(planned, edge_gm, why)
        # The manifest carries what happened to each region, known only once the partitioners ran.
        pte.replace_manifest(edge, manifest.with_lowering(records))
        with stage("to_executorch (memory planning, serialization)"), _bounded_at_example(edge.exported_program()):
            # The KV cache's index_put writes the whole cache into a new tensor that is then copied back
            # into the buffer (two cache copies per layer and token); ExecuTorch's own reinplace pass makes
            # it index_put_ on the buffer (where that is all it would rewrite).
            et = edge.to_executorch(ExecutorchBackendConfig(
                run_reinplace_pass=_writes_only_buffers_in_place(edge.exported_program()),
                memory_planning_pass=_memory_planning(),
                passes=_initialized_buffers(edge.exported_program()),
                external_constants=(lambda n: SHARED_DATA_TAG if n.name in shared else None) if shared else False,
            ))
    except LoweringError:
        raise
    except Exception as e:  # executorch raises many kinds; say which stage failed and keep the cause
        raise LoweringError(f"ExecuTorch lowering failed ({type(e).__name__}): {e}") from e

    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(edge_gm)
    with atomic_path(out) as tmp:
        data = pte.write(et, tmp)
        if data is not None:  # in place before the .pte that names it
            replace_into(tmp.with_suffix(pte.DATA_SUFFIX), data_out)
    extra: dict[str, Any] = {"delegated_subgraphs": info.num_delegated_subgraphs}
    if unbounded:
        extra["unbounded_dims"] = unbounded
    if data is not None:
        extra["data_file"] = {"path": str(data_out), "bytes": data.size, "sha256": data.sha256}
    return LoweringReport(
        target=f"executorch/{backend}", path=str(out),
        regions=[RegionReport.from_record(p.region.name, p.region.scheme, rec) for p, rec in zip(planned, records)],
        delegated_nodes=info.num_delegated_nodes,
        total_nodes=info.num_delegated_nodes + info.num_non_delegated_nodes,
        bytes=out.stat().st_size + (data.size if data is not None else 0),
        extra=extra,
    )
