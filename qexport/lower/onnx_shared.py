"""Tied weights in ONNX: one initializer per tensor, whatever layout and code type each region reads it in.

`quantize` stores a tied weight once (GPT-2's `wte` embedding and `lm_head` linear share one int8
table), but the ONNX lowering lays linear weights out as MatMul's [in, out] and embedding tables as
[rows, dim], and the portable target stores an integer GEMM's int8 codes as uint8 + 128
(onnx_regions.OnnxTarget) while a Gather keeps them int8, so the file would carry the table twice.
This pass keeps one and rebuilds each other use from it with a Transpose and, for the int8 codes of a
uint8 + 128 table, a shift (onnxruntime folds both when the session is created), and merges
byte-identical initializers (the shared scales) with onnx-ir's own deduplication.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

#: initializers smaller than this are not worth a node (scales, biases)
MIN_ELEMENTS = 1024


class ShareTransposedInitializersPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_size: dict[tuple[int, int], list[ir.Value]] = {}
        for v in graph.initializers.values():
            t = v.const_value
            if t is not None and len(t.shape) == 2 and t.size >= MIN_ELEMENTS:
                by_size.setdefault(tuple(sorted(t.shape)), []).append(v)
        modified = False
        for values in by_size.values():
            for v in values:
                if v.name not in graph.initializers or not v.uses():
                    continue
                for kept in values:
                    if kept is v or kept.name not in graph.initializers:
                        continue
                    steps = _rebuild_steps(kept, v)
                    if steps is None:
                        continue
                    nodes = _rebuild(kept, steps)
                    graph.insert_before(next(iter(graph)), nodes)
                    nodes[-1].outputs[0].name = f"{v.name}__from_{kept.name}"
                    v.replace_all_uses_with(nodes[-1].outputs[0])
                    del graph.initializers[v.name]
                    modified = True
                    break
        return ir.passes.PassResult(model, modified)


def _rebuild_steps(kept: ir.Value, v: ir.Value) -> tuple[bool, bool] | None:
    """(transpose, shift): how `v`'s values come from `kept`'s (shift: int8 codes from uint8 + 128
    ones), or None. The same values in the same layout are left to the deduplication."""
    a, b = kept.const_value.numpy(), v.const_value.numpy()
    shift = a.dtype == np.uint8 and b.dtype == np.int8
    if a.dtype != b.dtype and not shift:
        return None
    for transpose in (True, False):
        if not (transpose or shift):
            continue
        src = a.T if transpose else a
        if src.shape == b.shape and np.array_equal(src.astype(np.int16) - 128 if shift else src, b):
            return transpose, shift
    return None


def _rebuild(kept: ir.Value, steps: tuple[bool, bool]) -> list[ir.Node]:
    transpose, shift = steps
    nodes: list[ir.Node] = []
    value = kept
    if transpose:
        nodes.append(ir.node("Transpose", [value], attributes={"perm": [1, 0]}))
        value = nodes[-1].outputs[0]
    if shift:  # int32: onnxruntime's CPU Sub has no 16-bit kernel
        offset = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(128, np.int32))})
        wide = ir.node("Cast", [value], attributes={"to": ir.DataType.INT32})
        nodes += [offset, wide, ir.node("Sub", [wide.outputs[0], offset.outputs[0]])]
        nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], attributes={"to": ir.DataType.INT8}))
    return nodes


def _contiguous_initializers(model: ir.Model) -> None:
    """torch.onnx folds `weight.T` of a float weight (Falcon's `x @ W.T` layers) into an initializer
    holding a transposed numpy view, and onnx-ir's hashing deduplication refuses it ("ndarray is not
    C-contiguous", onnx-ir 1.1): give those a contiguous copy."""
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is not None and isinstance(t.raw, np.ndarray) and not t.raw.flags.c_contiguous:
            v.const_value = ir.Tensor(np.ascontiguousarray(t.raw), dtype=t.dtype, name=t.name)


def share_tied_initializers(model: ir.Model) -> bool:
    """Run both passes; True if the model changed."""
    first = ShareTransposedInitializersPass()(model).modified
    _contiguous_initializers(model)
    return common_passes.DeduplicateHashedInitializersPass()(model).modified or first
