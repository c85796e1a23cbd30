"""ONNX lowerings of regions, one per scheme family: what each region becomes in the ONNX graph.

A region is emitted in the order its reference math runs (`schemes/_region.py`): quantize the input as
the scheme says, dequantize the weight, run the op, quantize the output (static schemes). Those steps
are expressed with ONNX's own quantization operators wherever ONNX has them, because runtimes
(onnxruntime's QDQ transformers, TensorRT, QNN...) recognise QuantizeLinear/DequantizeLinear around
MatMul/Conv/Gemm and run integer kernels; where ONNX has no operator for a format (NormalFloat4, or
4-bit blocks before opset 21) the weight is dequantized with ordinary float operators, and the region's
record says so. Dynamic int8 linears are the exception to QDQ: per-token ones are integer
MatMuls (`per_token_int8_linear`), because no runtime fuses per-row dynamic QDQ, and so are per-tensor
dynamic ones (`per_tensor_int8_linear`), in the form onnxruntime fuses into DynamicQuantizeMatMul.

The ONNX form of each step is written against the scheme's fields, mirroring `activation.py` and the
families' `dequantize_weight`; the numerics tests hold it to `math_for(scheme).tolerance` of the eager
reference. Adding a family means registering one `FamilyLowering` (`register_onnx_lowering`, which
registers it with the backend contract on backend "onnx"; its RegionPlan's `lowering` is the `Lowering`).

Weights of linear regions are stored transposed ([in, out]), the layout of ONNX MatMul's B input, so
no Transpose stands between a weight's DequantizeLinear and its MatMul (onnxruntime's QDQ and
MatMulNBits fusions match DQ -> MatMul directly); fp8 keeps [out, in] for Gemm (`gemm_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from ..errors import LoweringError
from ..regions import Region
from ._contract import PlanContext, RegionPlan, register_backend, register_lowering
from ..schemes import Scheme
from ..schemes.activation import EPS, FP8_E4M3_MAX, INT8_MAX, INT8_MIN
from ..schemes.packing import unpack_uint4

#: first opset with blocked (block_size) DequantizeLinear, 4-bit types and QuantizeLinear(output_dtype)
BLOCKED_QDQ_OPSET = 21


@dataclass(frozen=True)
class OnnxTarget:
    """The CPUs an ONNX file is written for: decides how int8 weights meet int8 activations.

    onnxruntime's fused x86 u8 x s8 kernels (QGemm, QLinearConv, MatMulInteger) multiply with
    `vpmaddubsw`, which saturates the 16-bit sum of two products on CPUs without VNNI: (255, 255) .
    (127, 127) gives 32767, not 64770 (FINDINGS.md; MLP int8_static 0.13 relative error on an AVX2
    CPU). Its u8 x u8 kernels widen to 16 bits first and are exact everywhere, but run ~2x slower. So
    the portable form stores int8 weights as uint8 codes + 128 with zero point 128 (the same grid, the
    same numbers, a kernel that cannot saturate), except where the region's codes all lie within
    +-NON_SATURATING_CODE: then no pair sum can saturate and signed weights are exact on every CPU too.
    Targets with `signed_int8_weights` keep them signed whatever the codes (their kernels are exact).
    """

    name: str
    #: int8 weights stay int8 (u8 x s8 kernels); False stores them as uint8 with zero point 128
    signed_int8_weights: bool
    exact_on: str


ONNX_TARGETS: dict[str, OnnxTarget] = {t.name: t for t in (
    OnnxTarget("portable", False, "every CPU onnxruntime runs on (x86-64 with or without VNNI, ARM64)"),
    OnnxTarget("x86_vnni", True, "x86-64 CPUs with AVX512-VNNI or AVX-VNNI only; AVX2-only CPUs saturate and give wrong results"),
    OnnxTarget("arm64", True, "ARM64 CPUs only (their int8 kernels accumulate u8 x s8 exactly)"),
)}
DEFAULT_TARGET = "portable"

#: the largest |int8 weight code| for which a u8 x s8 pair sum fits a signed 16-bit lane: 2 * 255 * 64 =
#: 32640 <= 32767 (65 gives 33150). 7-bit weights, what onnxruntime's `reduce_range` and qexport's int8
#: schemes' `reduce_range=True` (qmin=-64, qmax=64) quantize to.
NON_SATURATING_CODE = 64


class Emitter:
    """Records the nodes of one region (an `ir.tape.Tape` plus the constants a region needs).

    Constants are Constant nodes, not initializers, so the same recording can become a function body
    (ONNX functions cannot own initializers) or be spliced into the main graph.
    """

    def __init__(self) -> None:
        self.tape = ir.tape.Tape()

    def op(self, op_type: str, *inputs: ir.Value | None, **attributes: Any) -> ir.Value:
        attrs = {k: v for k, v in attributes.items() if v is not None}
        return self.tape.op(op_type, list(inputs), attributes=attrs or None)

    def op_multi(self, op_type: str, *inputs: ir.Value | None, num_outputs: int, **attributes: Any) -> list[ir.Value]:
        return list(self.tape.op_multi_out(op_type, list(inputs), attributes=attributes or None, num_outputs=num_outputs))

    def const(self, value: Any, dtype: Any = np.float32) -> ir.Value:
        return self.op("Constant", value=ir.tensor(np.asarray(value, dtype=dtype)))

    @property
    def nodes(self) -> tuple[ir.Node, ...]:
        return tuple(self.tape.nodes)


def _np(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy, float8 as ml_dtypes' float8 (numpy has none; bfloat16 is widened exactly)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.numpy()


def _as_kn(op: str, a: np.ndarray) -> np.ndarray:
    """Linear weights (and their per-row/per-block metadata) go to MatMul's [in, out] layout."""
    return np.ascontiguousarray(a.T) if op == "linear" and a.ndim == 2 else a


@dataclass(frozen=True)
class Lowering:
    """What one region becomes: `native` when it is QDQ a runtime can turn into integer kernels."""

    region: Region
    family: "FamilyLowering"
    native: bool
    kernel: str
    reason: str = ""
    target: OnnxTarget = ONNX_TARGETS[DEFAULT_TARGET]
    #: int8 weights stored as uint8 + 128 for onnxruntime's u8 x u8 kernels (OnnxTarget)
    unsigned_int8_weights: bool = False
    #: JSON-safe facts for the region's manifest record (the weight codes' range and how they are stored)
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def scheme(self) -> Scheme:
        assert self.region.scheme is not None
        return self.region.scheme

    def weights(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, ir.Tensor]:
        """The region's tensors in their ONNX form, by name (suffix of `<module>.`)."""
        return self.family.weights(self, tensors)

    def emit(self, e: Emitter, x: ir.Value, w: Mapping[str, ir.Value]) -> ir.Value:
        """Record the region's nodes; `w` are the values of `weights()`. Returns the output value."""
        s, op, r = self.scheme, self.region.op, self.region
        if op != "embedding" and r.input_dtypes and r.input_dtypes[0] != "float32":
            x = e.op("Cast", x, to=ir.DataType.FLOAT)  # regions compute in float32 here (see reasons)
        if op == "embedding":
            # Gather the rows first, then dequantize only them: dequantizing the table would cost a
            # whole vocabulary (30522x384 for MiniLM) per call.
            ids = e.op("Reshape", x, e.const([-1], np.int64))
            rows = self.family.embedding_rows(e, self, w, ids)
            dim = e.const([r.weight_shape[1]], np.int64)
            y = e.op("Reshape", rows, e.op("Concat", e.op("Shape", x), dim, axis=0))
        else:
            weight = None if self.family.integer_linear(self) else self.family.dequantize(e, self, w)
            # Linear regions run on a [-1, in] view: onnxruntime turns 2-D MatMul+Add into Gemm and
            # its QDQ form into QGemm, while for 3-D inputs its MatMulAddFusion reshapes around cloned
            # QuantizeLinear nodes and then fails its own type check ("output_dtype INT8 does not
            # match y_zero_point type UINT8") on MiniLM. Per-tensor integer linears keep their shape:
            # DynamicQuantizeMatMul takes N-D inputs, and the view of an input other nodes also read
            # costs a copy.
            per_tensor_integer = self.family.integer_linear(self) and s.act_granularity != "per_token"
            flat = op == "linear" and len(r.input_shapes[0] if r.input_shapes else ()) != 2 and not per_tensor_integer
            xin = e.op("Reshape", x, e.const([-1, r.weight_shape[1]], np.int64)) if flat else x
            if per_tensor_integer:
                y = per_tensor_int8_linear(e, xin, w)
            elif self.family.integer_linear(self):
                y = per_token_int8_linear(e, xin, w)
            else:
                xq = quantize_input(e, s, op, xin, w, float_dequant=self.family.weight_to_matmul_nbits)
                y = apply_op(e, r, xq, weight, w.get("bias"), self.family.gemm_layout)
            if s.activation == "static":
                y = e.op("DequantizeLinear", e.op("QuantizeLinear", y, w["output_scale"], w["output_zero_point"]),
                         w["output_scale"], w["output_zero_point"])
            if flat:
                lead = e.op("Shape", x, end=-1)
                y = e.op("Reshape", y, e.op("Concat", lead, e.const([r.weight_shape[0]], np.int64), axis=0))
        out_dtype = r.output_dtypes[0] if r.output_dtypes else "float32"
        if out_dtype != "float32":
            y = e.op("Cast", y, to=ir.DataType.from_numpy(np.dtype(getattr(ml_dtypes, out_dtype, out_dtype))))
        return y


# -- shared steps (the ONNX form of schemes/_region.py and activation.py) ----------------------------
def quantize_input(e: Emitter, s: Scheme, op: str, x: ir.Value, w: Mapping[str, ir.Value], float_dequant: bool = False) -> ir.Value:
    if s.activation == "none":
        return x
    if s.activation == "static":
        scale, zp = w["input_scale"], w["input_zero_point"]
        return e.op("DequantizeLinear", e.op("QuantizeLinear", x, scale, zp), scale, zp)
    per_token = s.act_granularity == "per_token" and not op.startswith("conv")
    if s.act_dtype == "float8_e4m3fn":
        return _dynamic_fp8(e, x, per_token)
    if not per_token:
        # uint8 DynamicQuantizeLinear is int8_asym_qparams shifted by 128: same codes, same grid.
        q, scale, zp = e.op_multi("DynamicQuantizeLinear", x, num_outputs=3)
        return e.op("DequantizeLinear", q, scale, zp)
    # Only linear regions quantize per token, and they run on a [-1, in] view (Lowering.emit): a token
    # is a row, and per-row qparams are per-axis (axis 0) QuantizeLinear/DequantizeLinear.
    return _per_token_int8(e, x, float_dequant)


def _per_token_qparams(e: Emitter, rows: ir.Value, unsigned: bool = False) -> tuple[ir.Value, ir.Value, ir.Value]:
    """int8_asym_qparams per row: the range always covers 0, scale floored at eps, zero point saturated.

    Returns (scale, zero point, zero point as float32). unsigned=True gives the same grid as uint8
    (codes and zero point + 128), the activation type of onnxruntime's integer GEMMs: there
    clip(-128 - round(mn / s), -128, 127) + 128 is computed as clip(-round(mn / s), 0, 255) (Round
    is half-to-even, so it commutes with negation), one node fewer per region.
    """
    axes = e.const([1], np.int64)
    zero = e.const(0.0)
    mn = e.op("Min", e.op("ReduceMin", rows, axes, keepdims=0), zero)
    mx = e.op("Max", e.op("ReduceMax", rows, axes, keepdims=0), zero)
    scale = e.op("Max", e.op("Div", e.op("Sub", mx, mn), e.const(float(INT8_MAX - INT8_MIN))), e.const(EPS))
    if unsigned:
        zp = e.op("Clip", e.op("Neg", e.op("Round", e.op("Div", mn, scale))), zero, e.const(float(INT8_MAX - INT8_MIN)))
        return scale, e.op("Cast", zp, to=ir.DataType.UINT8), zp
    zp = e.op("Sub", e.const(float(INT8_MIN)), e.op("Round", e.op("Div", mn, scale)))
    zp = e.op("Clip", zp, e.const(float(INT8_MIN)), e.const(float(INT8_MAX)))
    return scale, e.op("Cast", zp, to=ir.DataType.INT8), zp


def _per_token_int8(e: Emitter, rows: ir.Value, float_dequant: bool = False) -> ir.Value:
    scale, zp, zp_float = _per_token_qparams(e, rows)
    q = e.op("QuantizeLinear", rows, scale, zp, axis=0)
    if not float_dequant:
        return e.op("DequantizeLinear", q, scale, zp, axis=0)
    # (q - zp) * scale with Sub/Mul, the same values: onnxruntime fuses a weight's DequantizeLinear ->
    # MatMul into MatMulNBits only when the activation does not come from a DequantizeLinear too.
    one = e.const([1], np.int64)
    centred = e.op("Sub", e.op("Cast", q, to=ir.DataType.FLOAT), e.op("Unsqueeze", zp_float, one))
    return e.op("Mul", centred, e.op("Unsqueeze", scale, one))


def per_token_int8_linear(e: Emitter, rows: ir.Value, w: Mapping[str, ir.Value]) -> ir.Value:
    """DQ(x) @ DQ(w) + b for per-token asymmetric int8 x and per-channel symmetric int8 w, in integers:
    (q - zp) @ w = q @ w - zp * colsum(w), so MatMulInteger needs no per-row zero point, then
    y = acc * s_x[row] * s_w[col] + (-(zp * s_x)[row] * (colsum * s_w)[col] + b[col]); the last term is a
    rank-2 Gemm ([zp * s_x, 1] @ weight_affine), one pass over the output where the integer correction
    and the bias took three (MiniLM: 18 elementwise [M, N] passes of 36 regions were half the run time).

    Why not QDQ: onnxruntime fuses QDQ MatMuls only with constant activation scales (static) or
    per-tensor DynamicQuantizeLinear; a per-token QDQ MatMul dequantizes the weight on every call
    (330x slower than fp32 on MLP 1024-2048-2048-256 here).
    """
    scale, zp, zp_float = _per_token_qparams(e, rows, unsigned=True)
    q = e.op("QuantizeLinear", rows, scale, zp, axis=0)
    # uint8-stored weights carry zero point 128 (OnnxTarget): MatMulInteger subtracts it exactly
    acc = e.op("MatMulInteger", q, w["weight"], None, w.get("weight_zero_point"))
    one = e.const([1], np.int64)
    col_scale = e.op("Unsqueeze", scale, one)
    # Cast(acc) * Mul(s_x, s_w) is the pattern onnxruntime fuses into MatMulIntegerToFloat (the scaling
    # done in the GEMM's output pass instead of three passes over [M, N]); its kernel takes per-row
    # [M, 1] scales, but with a constant bias Add after the Mul it would scale the bias too, so the
    # bias stays in the Gemm below.
    y = e.op("Mul", e.op("Cast", acc, to=ir.DataType.FLOAT), e.op("Mul", col_scale, w["weight_scale"]))
    zp_scaled = e.op("Mul", e.op("Unsqueeze", zp_float, one), col_scale)
    zp_and_one = e.op("Pad", zp_scaled, e.const([0, 0, 0, 1], np.int64), e.const(1.0))  # [zp * s_x, 1]
    return e.op("Gemm", zp_and_one, w["weight_affine"], y)


def per_tensor_int8_linear(e: Emitter, rows: ir.Value, w: Mapping[str, ir.Value]) -> ir.Value:
    """DQ(x) @ DQ(w) + b for per-tensor asymmetric int8 x (DynamicQuantizeLinear: the scheme's qparams on
    the uint8 grid) and int8 w, as DynamicQuantizeLinear -> MatMulInteger -> Cast * (s_x * s_w) + b:
    the pattern onnxruntime fuses into DynamicQuantizeMatMul (or MatMulIntegerToFloat where regions share
    their input), one kernel that quantizes, multiplies and applies the scales and the bias (exact with
    per-channel weight scales). As QDQ the weight would be dequantized on every call instead."""
    q, scale, zp = e.op_multi("DynamicQuantizeLinear", rows, num_outputs=3)
    acc = e.op("MatMulInteger", q, w["weight"], zp, w.get("weight_zero_point"))
    y = e.op("Mul", e.op("Cast", acc, to=ir.DataType.FLOAT), e.op("Mul", scale, w["weight_scale"]))
    return y if "bias" not in w else e.op("Add", y, w["bias"])


def _dynamic_fp8(e: Emitter, x: ir.Value, per_token: bool) -> ir.Value:
    """activation.dynamic_fp8: scale amax/448 (floored at eps) per row or per tensor, saturating cast."""
    amax = e.op("ReduceMax", e.op("Abs", x), e.const([1], np.int64) if per_token else None, keepdims=0)
    scale = e.op("Max", e.op("Div", amax, e.const(FP8_E4M3_MAX)), e.const(EPS))
    axis = 0 if per_token else None
    q = e.op("QuantizeLinear", x, scale, axis=axis, output_dtype=ir.DataType.FLOAT8E4M3FN, saturate=1)
    return e.op("DequantizeLinear", q, scale, axis=axis)


def apply_op(e: Emitter, r: Region, x: ir.Value, w: ir.Value, bias: ir.Value | None, gemm_layout: bool = False) -> ir.Value:
    p = r.op_params
    if r.op == "linear" and gemm_layout:  # w is [out, in] as stored; x is the 2-D view
        return e.op("Gemm", x, w, bias, transB=1)
    if r.op == "linear":
        y = e.op("MatMul", x, w)
        if bias is None:
            return y
        # Weight-only regions add the bias with Sum (same broadcasting): onnxruntime fuses
        # DQ -> MatMul into MatMulNBits only if its MatMul+Add->Gemm(+Relu) fusions have not taken
        # the MatMul first, which they do for Add (MLP 1024-2048-2048-256 here: 16 ms with Add, 0.1 ms
        # with Sum). Quantized activations keep Add, which QGemm needs, except in front of 4-bit
        # weights, which only MatMulNBits takes (int8_dynamic_int4_weight: per-token activations, which
        # no QGemm fusion takes either).
        to_nbits = r.scheme is not None and (r.scheme.activation == "none" or r.scheme.weight_dtype == "uint4")
        return e.op("Sum" if to_nbits else "Add", y, bias)
    if r.op in ("conv1d", "conv2d"):
        kernel = list(r.weight_shape[2:]) if r.weight_shape else [1] * (1 if r.op == "conv1d" else 2)
        attrs: dict[str, Any] = dict(strides=list(p["stride"]), dilations=list(p["dilation"]), group=int(p["groups"]))
        pad = p["padding"]
        if pad == "same":  # torch puts the odd pixel at the end, as SAME_UPPER does
            attrs["auto_pad"] = "SAME_UPPER"
        else:
            begin = [0] * len(kernel) if pad == "valid" else list(pad)
            attrs["pads"] = begin + begin
        attrs["kernel_shape"] = kernel
        return e.op("Conv", x, w, bias, **attrs)
    raise LoweringError(f"region {r.name}: op {r.op!r} has no ONNX lowering")


# -- families ---------------------------------------------------------------------------------------
class FamilyLowering:
    """How one scheme family's weights are stored and dequantized in ONNX."""

    #: linear weights kept [out, in] and run as Gemm(transB=1) instead of MatMul on [in, out]
    gemm_layout: bool = False
    #: the weight's DequantizeLinear -> MatMul is meant for onnxruntime's MatMulNBits fusion
    weight_to_matmul_nbits: bool = False

    def plan(self, ctx: PlanContext, opset: int, target: OnnxTarget) -> Lowering:
        """The region's form (`ctx.region`; `ctx.tensor(role)` reads its tensors where the form depends on them)."""
        raise NotImplementedError

    def weights(self, lw: Lowering, t: Mapping[str, torch.Tensor]) -> dict[str, ir.Tensor]:
        raise NotImplementedError

    def dequantize(self, e: Emitter, lw: Lowering, w: Mapping[str, ir.Value]) -> ir.Value:
        raise NotImplementedError

    def integer_linear(self, lw: Lowering) -> bool:
        """Whether the region's linear runs as integer ops (per_token_int8_linear, per_tensor_int8_linear) instead of QDQ."""
        return False

    def embedding_rows(self, e: Emitter, lw: Lowering, w: Mapping[str, ir.Value], ids: ir.Value) -> ir.Value:
        """The dequantized table rows `ids` (1-D) of an embedding region, [len(ids), dim] float."""
        raise NotImplementedError


def _activation_weights(lw: Lowering, t: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Bias and static activation qparams.

    Static activations are emitted as uint8 with the zero point shifted by 128: the same grid as the
    scheme's int8 codes (q_u8 = q_s8 + 128), so identical numerics. Why: onnxruntime's CPU kernels take
    uint8 activations and rewrite int8 QDQ to uint8 itself, but on opset 21 that rewrite misses the
    Q nodes its QDQ propagation inserts ("output_dtype INT8 does not match y_zero_point type UINT8"
    on a transformer block).
    """
    out: dict[str, np.ndarray] = {}
    if "bias" in t:
        out["bias"] = _np(t["bias"]).astype(np.float32)
    for side in ("input", "output"):
        if f"{side}_scale" in t:
            out[f"{side}_scale"] = _np(t[f"{side}_scale"]).astype(np.float32).reshape(())
            zp = _np(t[f"{side}_zero_point"]).astype(np.int32).reshape(()) - INT8_MIN
            out[f"{side}_zero_point"] = zp.astype(np.uint8)
    return out


def _describe_activation(s: Scheme, op: str) -> str:
    if s.activation == "static":
        return "static int8 activations (QuantizeLinear/DequantizeLinear on input and output)"
    if s.activation == "dynamic":
        per_token = s.act_granularity == "per_token" and not op.startswith("conv")
        if s.act_dtype == "float8_e4m3fn":
            return f"dynamic {'per-token' if per_token else 'per-tensor'} float8 activations"
        if per_token:
            return "dynamic per-token int8 activations (per-row QuantizeLinear with computed scales)"
        return "dynamic per-tensor int8 activations (DynamicQuantizeLinear)"
    return "float activations"


_OP_NAMES = {"linear": "MatMul", "conv1d": "Conv", "conv2d": "Conv", "embedding": "Gather"}


class Int8Lowering(FamilyLowering):
    """int8 weights: per-axis (or per-tensor) DequantizeLinear, opset 13+."""

    def plan(self, ctx: PlanContext, opset: int, target: OnnxTarget) -> Lowering:
        region = ctx.region
        s = region.scheme
        assert s is not None
        gran = "per-channel" if s.granularity == "per_channel" else "per-tensor"
        kernel = f"QDQ {_OP_NAMES[region.op]}: {gran} int8 weights, {_describe_activation(s, region.op)}"
        if region.op == "embedding":
            kernel = f"Gather int8 rows -> DequantizeLinear ({gran}; only the looked-up rows)"
        if region.op == "linear" and s.activation == "dynamic" and s.act_granularity == "per_token":
            kernel = f"MatMulInteger: per-token int8 activations (QuantizeLinear with computed scales) x {gran} int8 weights, int32 accumulation"
        elif region.op == "linear" and s.activation == "dynamic" and s.act_dtype == "int8":
            kernel = f"MatMulInteger: per-tensor int8 activations (DynamicQuantizeLinear) x {gran} int8 weights, int32 accumulation"
        reason = ""
        if s.compute_dtype != "float32" and s.activation == "none":
            reason = f"computes in float32 where the scheme says {s.compute_dtype} (onnxruntime's CPU MatMul has no bfloat16 kernel)"
        if not self.meets_int8_activations(region):
            return Lowering(region, self, native=True, kernel=kernel, reason=reason, target=target)
        # The codes decide, not the scheme's qmin/qmax: they are what the kernel multiplies (a hand-made
        # region or another tool's codes need not keep to the scheme's range).
        codes = ctx.tensor("weight")
        widest = int(codes.to(torch.int16).abs().max()) if codes.numel() else 0
        fits = widest <= NON_SATURATING_CODE
        unsigned = not (target.signed_int8_weights or fits)
        details = {"weight_codes_max_abs": widest, "int8_weights_stored_as": "uint8+128" if unsigned else "int8"}
        if unsigned:
            kernel += "; weights stored as uint8 (+128, zero point 128) for u8 x u8 kernels exact on every CPU"
            reason = (f"weight codes reach +-{widest} (> +-{NON_SATURATING_CODE}); 7-bit weights (scheme reduce_range=True) "
                      f"would run onnxruntime's faster u8 x s8 kernels, exact on every CPU")
        elif not target.signed_int8_weights:
            kernel += "; int8 weights kept signed for u8 x s8 kernels"
            reason = (f"every weight code is within +-{NON_SATURATING_CODE} (read from the codes: max |code| {widest}), so "
                      f"onnxruntime's u8 x s8 kernels cannot saturate a 16-bit pair sum: exact on every CPU")
        if region.op.startswith("conv") and s.activation == "dynamic":
            # its optimized graph keeps DynamicQuantizeLinear -> DQ -> Conv <- DQ(weight): no QDQ fusion
            # takes a dynamically quantized conv (QLinearConv needs a static output scale)
            reason = "; ".join(filter(None, (reason, (
                "onnxruntime has no fused kernel for a dynamically quantized conv: it runs the activation's "
                "quantize/dequantize and a float Conv, the weight dequantized on every call (int8_static "
                "runs as QLinearConv)"))))
        return Lowering(region, self, native=True, kernel=kernel, reason=reason, target=target,
                        unsigned_int8_weights=unsigned, details=details)

    @staticmethod
    def meets_int8_activations(region: Region) -> bool:
        """Whether the region's weights meet u8 activations in an integer GEMM (the case OnnxTarget is
        about); float activations never reach an integer kernel."""
        s = region.scheme
        return (s is not None and s.activation in ("dynamic", "static") and s.act_dtype == "int8"
                and (region.op == "linear" or region.op.startswith("conv")))

    def weights(self, lw: Lowering, t: Mapping[str, torch.Tensor]) -> dict[str, ir.Tensor]:
        op = lw.region.op
        scale = _np(t["weight_scale"]).astype(np.float32)
        if lw.scheme.granularity == "per_tensor":
            scale = scale.reshape(())
        # Explicit zeros, although symmetric codes need none: onnxruntime's QDQ selectors fuse
        # DQ(weight) into QGemm/QLinearConv only when the zero point is there (without it the DQ runs
        # on every call, ~350x slower on a 2048x2048 layer here).
        codes = _as_kn(op, _np(t["weight"]))
        out = {"weight": codes, "weight_scale": scale, "weight_zero_point": np.zeros(scale.shape, np.int8)}
        out.update(_activation_weights(lw, t))
        unsigned = lw.unsigned_int8_weights
        if unsigned:
            out["weight"] = (codes.astype(np.int16) - INT8_MIN).astype(np.uint8)
            out["weight_zero_point"] = np.full(scale.shape, -INT8_MIN, np.uint8)
        if self.integer_linear(lw):
            # MatMulInteger takes B's zero point as one scalar (none for signed weights)
            out["weight_zero_point"] = np.array(-INT8_MIN, np.uint8)
            if not unsigned:
                del out["weight_zero_point"]
        if self.integer_linear(lw) and lw.scheme.act_granularity == "per_token":
            # the zero-point correction and the bias become one [2, out] matrix (per_token_int8_linear)
            colsum = codes.astype(np.int64).sum(0)
            bias = out.pop("bias", np.zeros(colsum.shape, np.float32))
            out["weight_affine"] = np.stack([-(colsum * scale.reshape(-1)).astype(np.float32), bias])
        return {k: ir.tensor(v) for k, v in out.items()}

    def dequantize(self, e: Emitter, lw: Lowering, w: Mapping[str, ir.Value]) -> ir.Value:
        per_tensor = lw.scheme.granularity == "per_tensor"
        # the output-channel axis: last for MatMul's [in, out], first for conv and embedding rows
        axis = None if per_tensor else (1 if lw.region.op == "linear" else 0)
        return e.op("DequantizeLinear", w["weight"], w["weight_scale"], w["weight_zero_point"], axis=axis)

    def embedding_rows(self, e: Emitter, lw: Lowering, w: Mapping[str, ir.Value], ids: ir.Value) -> ir.Value:
        rows = e.op("Gather", w["weight"], ids, axis=0)
        if lw.scheme.granularity == "per_tensor":
            return e.op("DequantizeLinear", rows, w["weight_scale"], w["weight_zero_point"])
        scale, zp = (e.op("Gather", w[k], ids, axis=0) for k in ("weight_scale", "weight_zero_point"))
        return e.op("DequantizeLinear", rows, scale, zp, axis=0)

    def integer_linear(self, lw: Lowering) -> bool:
        s = lw.scheme
        return lw.region.op == "linear" and s.activation == "dynamic" and s.act_dtype == "int8"


def _blocked_float(
    e: Emitter, values: ir.Value, scale: ir.Value, zero_point: ir.Value | None, op: str, gs: int, shape: tuple[int, ...]
) -> ir.Value:
    """(values - zero_point) * scale, per block of `gs` along the reduction dim (float decomposition).

    Linear weights are [K, N] with per-block tensors [K/gs, N]; embedding rows [M, D] with [M, D/gs].
    """
    rows, k = shape[0], shape[1]
    blocked, unsq, full = ([k // gs, gs, rows], [1], [k, rows]) if op == "linear" else ([-1, k // gs, gs], [2], [-1, k])
    v = e.op("Reshape", values, e.const(blocked, np.int64))
    if zero_point is not None:
        v = e.op("Sub", v, e.op("Unsqueeze", e.op("Cast", zero_point, to=ir.DataType.FLOAT), e.const(unsq, np.int64)))
    v = e.op("Mul", v, e.op("Unsqueeze", scale, e.const(unsq, np.int64)))
    return e.op("Reshape", v, e.const(full, np.int64))


def _unpack_rows(e: Emitter, packed: ir.Value, dim: int) -> ir.Value:
    """[M, D/2] bytes in the schemes' packing (schemes/packing.py: even element in the high nibble)
    -> [M, D] uint8 codes. Embedding tables keep that byte layout because ONNX Gather has no 4-bit types."""
    hi = e.op("BitShift", packed, e.const(4, np.uint8), direction="RIGHT")
    lo = e.op("BitwiseAnd", packed, e.const(15, np.uint8))
    axis = e.const([2], np.int64)
    pairs = e.op("Concat", e.op("Unsqueeze", hi, axis), e.op("Unsqueeze", lo, axis), axis=2)
    return e.op("Reshape", pairs, e.const([-1, dim], np.int64))


def _embedding_4bit_weights(lw: Lowering, t: Mapping[str, torch.Tensor], roles: tuple[str, ...]) -> dict[str, ir.Tensor]:
    return {r: ir.tensor(_np(t[r]).astype(np.float32) if r == "weight_scale" else _np(t[r])) for r in roles}


class Int4Lowering(FamilyLowering):
    """uint4 weights with per-block scales and zero points: blocked DequantizeLinear (opset 21)."""

    weight_to_matmul_nbits = True

    def plan(self, ctx: PlanContext, opset: int, target: OnnxTarget) -> Lowering:
        region = ctx.region
        s = region.scheme
        assert s is not None
        note = f"computes in float32 where the scheme says {s.compute_dtype} (onnxruntime's CPU MatMul has no bfloat16 kernel)"
        if region.op == "embedding":
            return Lowering(region, self, False, "Gather packed rows -> unpack (BitShift/BitwiseAnd) -> float dequantization",
                            "ONNX Gather has no 4-bit types: the looked-up rows are gathered as packed bytes and "
                            "dequantized with Sub/Mul in float32")
        if opset >= BLOCKED_QDQ_OPSET and s.activation == "dynamic":
            return Lowering(region, self, True, (
                f"per-token int8 activations (QuantizeLinear, then Sub/Mul) x blocked DequantizeLinear (uint4, block "
                f"{s.group_size}) -> MatMul, which onnxruntime fuses into MatMulNBits"), (
                "onnxruntime's default MatMulNBits accuracy level (4, int8 compute) re-quantizes the activations per "
                "block: set session.qdq_matmulnbits_accuracy_level=0 for the reference's exact numbers"))
        if opset >= BLOCKED_QDQ_OPSET:
            return Lowering(region, self, True, f"blocked DequantizeLinear (uint4, block {s.group_size}) -> {_OP_NAMES[region.op]}", note)
        return Lowering(
            region, self, False, f"float dequantization (uint8 codes) -> {_OP_NAMES[region.op]}",
            f"opset {opset} has no 4-bit types or blocked DequantizeLinear (opset {BLOCKED_QDQ_OPSET}+); "
            f"codes are stored one per byte and dequantized with Sub/Mul; export with opset>={BLOCKED_QDQ_OPSET} for QDQ",
        )

    def weights(self, lw: Lowering, t: Mapping[str, torch.Tensor]) -> dict[str, ir.Tensor]:
        op = lw.region.op
        if op == "embedding":
            return _embedding_4bit_weights(lw, t, ("weight", "weight_scale", "weight_zero_point"))
        codes = _as_kn(op, unpack_uint4(t["weight"]).numpy())
        zp = _as_kn(op, _np(t["weight_zero_point"]))
        scale = _as_kn(op, _np(t["weight_scale"]).astype(np.float32))
        if lw.native:
            out = {"weight": ir.tensor(codes.astype(ml_dtypes.uint4)), "weight_zero_point": ir.tensor(zp.astype(ml_dtypes.uint4))}
        else:
            out = {"weight": ir.tensor(codes), "weight_zero_point": ir.tensor(zp)}
        out["weight_scale"] = ir.tensor(scale)
        out.update({k: ir.tensor(v) for k, v in _activation_weights(lw, t).items()})
        return out

    def dequantize(self, e: Emitter, lw: Lowering, w: Mapping[str, ir.Value]) -> ir.Value:
        gs = lw.scheme.group_size
        axis = 0 if lw.region.op == "linear" else 1
        if lw.native:
            return e.op("DequantizeLinear", w["weight"], w["weight_scale"], w["weight_zero_point"], axis=axis, block_size=gs)
        codes = e.op("Cast", w["weight"], to=ir.DataType.FLOAT)
        return _blocked_float(e, codes, w["weight_scale"], w["weight_zero_point"], lw.region.op, gs, tuple(lw.region.weight_shape))

    def embedding_rows(self, e: Emitter, lw: Lowering, w: Mapping[str, ir.Value], ids: ir.Value) -> ir.Value:
        shape = tuple(lw.region.weight_shape)
        codes = e.op("Cast", _unpack_rows(e, e.op("Gather", w["weight"], ids, axis=0), shape[1]), to=ir.DataType.FLOAT)
        scale, zp = (e.op("Gather", w[k], ids, axis=0) for k in ("weight_scale", "weight_zero_point"))
        return _blocked_float(e, codes, scale, zp, "embedding", lw.scheme.group_size, shape)


class Nf4Lowering(FamilyLowering):
    """NormalFloat4: ONNX has no such type, so codes index the 16-entry codebook (Gather) and are
    scaled by their block's absmax (float decomposition)."""

    def plan(self, ctx: PlanContext, opset: int, target: OnnxTarget) -> Lowering:
        region = ctx.region
        codes = "uint4" if opset >= BLOCKED_QDQ_OPSET else "uint8"
        if region.op == "embedding":
            return Lowering(region, self, False, "Gather packed rows -> unpack -> Gather codebook, Mul absmax",
                            "ONNX has no NormalFloat4 type or operator: the looked-up rows are dequantized with "
                            "Gather/Mul in float32")
        return Lowering(
            region, self, False, f"float dequantization ({codes} codes -> Gather codebook, Mul absmax) -> {_OP_NAMES[region.op]}",
            "ONNX has no NormalFloat4 type or operator: the weight is dequantized with Gather/Mul in float32 "
            "and runs as a float op",
        )

    def weights(self, lw: Lowering, t: Mapping[str, torch.Tensor]) -> dict[str, ir.Tensor]:
        op = lw.region.op
        if op == "embedding":
            return _embedding_4bit_weights(lw, t, ("weight", "weight_scale", "weight_codebook"))
        codes = _as_kn(op, unpack_uint4(t["weight"]).numpy())
        out = {
            "weight": ir.tensor(codes.astype(ml_dtypes.uint4) if "uint4" in lw.kernel else codes),
            "weight_scale": ir.tensor(_as_kn(op, _np(t["weight_scale"]).astype(np.float32))),
            "weight_codebook": ir.tensor(_np(t["weight_codebook"]).astype(np.float32)),
        }
        out.update({k: ir.tensor(v) for k, v in _activation_weights(lw, t).items()})
        return out

    def dequantize(self, e: Emitter, lw: Lowering, w: Mapping[str, ir.Value]) -> ir.Value:
        gs = lw.scheme.group_size
        shape = tuple(lw.region.weight_shape)
        idx = e.op("Cast", w["weight"], to=ir.DataType.INT32)
        values = e.op("Gather", w["weight_codebook"], idx, axis=0)
        return _blocked_float(e, values, w["weight_scale"], None, lw.region.op, gs, shape)

    def embedding_rows(self, e: Emitter, lw: Lowering, w: Mapping[str, ir.Value], ids: ir.Value) -> ir.Value:
        shape = tuple(lw.region.weight_shape)
        codes = e.op("Cast", _unpack_rows(e, e.op("Gather", w["weight"], ids, axis=0), shape[1]), to=ir.DataType.INT32)
        values = e.op("Gather", w["weight_codebook"], codes, axis=0)
        return _blocked_float(e, values, e.op("Gather", w["weight_scale"], ids, axis=0), None, "embedding", lw.scheme.group_size, shape)


class Fp8Lowering(FamilyLowering):
    """float8_e4m3fn weights and dynamic float8 activations: QDQ with FLOAT8E4M3FN (opset 21)."""

    # No CPU runtime fuses float8 QDQ, so the weight is dequantized on every call; onnxruntime does
    # that ~20x faster along axis 0 of [out, in] than along axis 1 of [in, out].
    gemm_layout = True

    def plan(self, ctx: PlanContext, opset: int, target: OnnxTarget) -> Lowering:
        region = ctx.region
        s = region.scheme
        assert s is not None
        if opset < BLOCKED_QDQ_OPSET:
            raise LoweringError(
                f"region {region.name}: {s.name} needs opset>={BLOCKED_QDQ_OPSET} (QuantizeLinear with "
                f"output_dtype=FLOAT8E4M3FN for its dynamic activations); export with opset={BLOCKED_QDQ_OPSET} or newer"
            )
        return Lowering(
            region, self, True, f"QDQ Gemm: float8_e4m3fn weights, {_describe_activation(s, region.op)}",
            f"computes in float32 where the scheme says {s.compute_dtype}; onnxruntime's CPU provider has no "
            f"float8 GEMM, so it dequantizes the weight on every call (slow there; GPU runtimes fuse float8 QDQ)",
        )

    def weights(self, lw: Lowering, t: Mapping[str, torch.Tensor]) -> dict[str, ir.Tensor]:
        scale = _np(t["weight_scale"]).astype(np.float32)
        out = {"weight": _np(t["weight"]),
               "weight_scale": scale.reshape(()) if lw.scheme.granularity == "per_tensor" else scale}
        out.update(_activation_weights(lw, t))
        return {k: ir.tensor(v) for k, v in out.items()}

    def dequantize(self, e: Emitter, lw: Lowering, w: Mapping[str, ir.Value]) -> ir.Value:
        axis = None if lw.scheme.granularity == "per_tensor" else 0
        return e.op("DequantizeLinear", w["weight"], w["weight_scale"], axis=axis)


def _entry(family: FamilyLowering):
    """A family's ONNX form as a backend-contract entry: options "opset" and "target" (ONNX_TARGETS)."""

    def plan(ctx: PlanContext) -> RegionPlan | None:
        if ctx.region.weight_shape is None:
            return None
        target = ONNX_TARGETS[ctx.options.get("target", DEFAULT_TARGET)]
        lw = family.plan(ctx, ctx.options.get("opset", BLOCKED_QDQ_OPSET), target)
        reason = "; ".join(filter(None, (lw.reason, _shared_weight_caveat(ctx, lw))))
        return RegionPlan(lw.native, lw.kernel, reason, details={"target": target.name, **lw.details}, lowering=lw)

    return plan


def _shared_weight_caveat(ctx: PlanContext, lw: Lowering) -> str:
    """onnxruntime fuses a weight's DequantizeLinear -> MatMul into MatMulNBits only where that weight
    initializer is read once (tried: two DQ nodes of one initializer, or one DQ feeding two MatMuls,
    both stay DQ + MatMul): a module called several times (ALBERT's shared layer) dequantizes its
    weight on every call. The form is still right for other runtimes; the report says what onnxruntime does."""
    s, r = lw.scheme, lw.region
    if not (lw.native and r.op == "linear" and (s.activation == "none" or s.weight_dtype == "uint4")):
        return ""
    from ..regions import is_region_node

    weight = ctx.node.args[1 + r.roles.index("weight")]
    calls = sum(1 for u in weight.users if is_region_node(u))
    if calls < 2:
        return ""
    return (f"its weight is read by {calls} regions (one module called {calls} times), and onnxruntime fuses "
            f"DequantizeLinear -> MatMul into MatMulNBits only for a weight read once: here it dequantizes the "
            f"weight on every call (correct, at that cost). int8_dynamic or int8_static read a shared "
            f"weight as it is (MatMulIntegerToFloat, QGemm)")


def register_onnx_lowering(family: str, lowering: FamilyLowering) -> None:
    """Give a scheme family (a user's) an ONNX form: `register_lowering(family, "onnx", op)` for every
    op ONNX has a form for here; regions of other families run their reference math as torch.onnx
    translates it."""
    for op in _OP_NAMES:
        register_lowering(family, "onnx", op, _entry(lowering), name="family_lowering")


def _reference(ctx: PlanContext, reasons: list[str], registered: bool) -> RegionPlan:
    r = ctx.region
    family = r.scheme.family if r.scheme else r.scheme_name
    why = "; ".join(reasons) or (
        f"no ONNX lowering for scheme family {family!r} {r.op} (qexport.lower.onnx_regions.register_onnx_lowering("
        f"family, FamilyLowering) adds one); its reference math runs as float ops")
    return RegionPlan(False, "reference math (torch.onnx's translation of the region subgraph)", why)


register_backend("onnx", title="ONNX (onnxruntime)", fallback=_reference, lowering_type=Lowering)
for _family, _lowering in {"int8": Int8Lowering(), "int4": Int4Lowering(), "nf4": Nf4Lowering(), "fp8": Fp8Lowering()}.items():
    register_onnx_lowering(_family, _lowering)
