"""Tied weights in ONNX: one initializer per tensor, whatever layout each region reads it in.

`quantize` stores a tied weight once (GPT-2's `wte` embedding and `lm_head` linear share one int8
table), but the ONNX lowering lays linear weights out as MatMul's [in, out] and embedding tables as
[rows, dim], so the file would carry the table twice. This pass keeps the first and feeds the other
uses through a Transpose of it (onnxruntime folds it when the session is created), and merges
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
        by_shape: dict[tuple, list[ir.Value]] = {}
        for v in graph.initializers.values():
            t = v.const_value
            if t is not None and len(t.shape) == 2 and t.size >= MIN_ELEMENTS:
                by_shape.setdefault((t.dtype, tuple(t.shape)), []).append(v)
        modified = False
        for (dtype, (rows, cols)), values in list(by_shape.items()):
            if rows == cols and (dtype, (rows, cols)) not in by_shape:
                continue
            for v in values:
                if v.name not in graph.initializers or not v.uses():
                    continue
                kept = next((o for o in by_shape.get((dtype, (cols, rows)), ()) if o is not v
                             and o.name in graph.initializers and _is_transpose(o, v)), None)
                if kept is None:
                    continue
                node = ir.node("Transpose", [kept], attributes={"perm": [1, 0]})
                graph.insert_before(next(iter(graph)), node)
                node.outputs[0].name = f"{v.name}__transposed"
                v.replace_all_uses_with(node.outputs[0])
                del graph.initializers[v.name]
                modified = True
        return ir.passes.PassResult(model, modified)


def _is_transpose(a: ir.Value, b: ir.Value) -> bool:
    return np.array_equal(a.const_value.numpy().T, b.const_value.numpy())


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
