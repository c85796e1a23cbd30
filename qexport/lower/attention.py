"""Attention for ExecuTorch: `scaled_dot_product_attention` as batched matmuls over the KV heads.

`to_edge` decomposes `aten.scaled_dot_product_attention` with torch's math decomposition, which on a
decoder with a static KV cache costs more per token than the quantized projections (125 M Llama,
XNNPACK, 1 thread: 2.4 of 8.4 ms per decoded token in `expand_copy` alone):

* grouped-query attention reaches it through transformers' `repeat_kv` (`unsqueeze(2)` → `expand` →
  `reshape`), which copies the whole cache n_rep times per layer and token;
* the decomposition scales both q and kᵀ by √scale (`mul.Scalar`, which XNNPACK does not take, so the
  whole cache is scaled on portable kernels) and copies kᵀ and v again through `expand` before `bmm`;
* its "safe softmax" (a row that is masked everywhere gives 0, not NaN) runs on the scores between the
  two matmuls, splitting the delegate.

`grouped_attention` rewrites each such node into what XNNPACK runs in one delegate: q's query heads
grouped under their KV head (a view: head h reads KV head h // n_rep), `bmm(q·scale, kᵀ)`, `+ mask`,
`softmax`, `bmm(·, v)`, with the cache read once per layer and never copied. A row the mask hides
everywhere is set to 0 after the second matmul (from the mask alone, once per mask), which is the
decomposition's result.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._graph import call_before

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def _static_shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape):
        return None
    return tuple(val.shape)


def repeated_kv(node: torch.fx.Node) -> tuple[torch.fx.Node, int]:
    """(source, n_rep) where `node` is transformers' `repeat_kv(source, n_rep)`: source [B, Hkv, S, D]
    unsqueezed at 2, expanded to [B, Hkv, n_rep, S, D] and reshaped to [B, Hkv·n_rep, S, D]; else (node, 1)."""
    if node.op != "call_function" or node.target not in _RESHAPES:
        return node, 1
    expand = node.args[0]
    if isinstance(expand, torch.fx.Node) and expand.target is aten.clone.default:
        expand = expand.args[0]
    if not isinstance(expand, torch.fx.Node) or expand.target is not aten.expand.default:
        return node, 1
    unsqueeze = expand.args[0]
    if not isinstance(unsqueeze, torch.fx.Node) or unsqueeze.target is not aten.unsqueeze.default or unsqueeze.args[1] != 2:
        return node, 1
    source, sizes, out = unsqueeze.args[0], expand.args[1], _static_shape(node)
    shape = _static_shape(source)
    if shape is None or out is None or len(shape) != 4 or not all(isinstance(d, int) for d in sizes) or len(sizes) != 5:
        return node, 1
    b, hkv, s, d = shape
    n_rep = sizes[2]
    if [sizes[0], sizes[1], sizes[3], sizes[4]] != [b, hkv, s, d] or out != (b, hkv * n_rep, s, d):
        return node, 1
    return source, n_rep


def _plan(node: torch.fx.Node) -> dict[str, Any] | None:
    """What the rewrite of one sdpa node needs, or None to leave it as it is."""
    defaults = [None, None, None, None, 0.0, False]
    q, k, v, mask, dropout, causal = list(node.args) + defaults[len(node.args):]
    mask = node.kwargs.get("attn_mask", mask)
    dropout, causal = node.kwargs.get("dropout_p", dropout), node.kwargs.get("is_causal", causal)
    if dropout or causal:  # random, or a mask the decomposition builds itself: left to torch
        return None
    qv = q.meta.get("val") if isinstance(q, torch.fx.Node) else None
    if not isinstance(qv, torch.Tensor) or qv.dim() != 4 or not qv.dtype.is_floating_point:
        return None
    if node.kwargs.get("enable_gqa", False):
        k0, kr, v0, vr = k, None, v, None
    else:
        (k0, kr), (v0, vr) = repeated_kv(k), repeated_kv(v)
    ks, vs = _static_shape(k0), _static_shape(v0)
    b, hq, d = qv.shape[0], qv.shape[1], qv.shape[3]
    if ks is None or vs is None or len(ks) != 4 or len(vs) != 4 or not all(isinstance(x, int) for x in (b, hq, d)):
        return None
    hkv, s = ks[1], ks[2]
    if kr is None:
        kr = vr = hq // hkv if hq % hkv == 0 else 0
    if kr != vr or kr < 1 or hkv * kr != hq or ks[0] != b or vs[:3] != (b, hkv, s) or ks[3] != d:
        return None
    if isinstance(mask, torch.fx.Node):
        mv = mask.meta.get("val")
        if not isinstance(mv, torch.Tensor) or not 2 <= mv.dim() <= 4 or mv.dtype not in (torch.bool, qv.dtype):
            return None
        # broadcast to [B, Hq, T, S]: static batch, head and key dims, a head dim of 1 or Hq
        mb, mh, _, ms = (1,) * (4 - mv.dim()) + tuple(mv.shape)
        if not all(isinstance(x, int) for x in (mb, mh, ms)) or ms != s or mh not in (1, hq) or mb not in (1, b):
            return None
    elif mask is not None:
        return None
    scale = node.kwargs.get("scale")
    return {"q": q, "k": k0, "v": v0, "mask": mask, "b": b, "hkv": hkv, "n_rep": kr, "s": s, "d": d, "dv": vs[3],
            "scale": float(scale) if scale is not None else 1.0 / math.sqrt(d)}


def _mask_terms(anchor: torch.fx.Node, mask: torch.fx.Node, p: dict[str, Any]) -> tuple[torch.fx.Node, torch.fx.Node]:
    """(additive mask as [B|1, Hkv|1, n_rep|1, T|1, S], rows it hides everywhere as [.., 1]) for one mask."""
    def call(target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        return call_before(anchor, target, *args, **kwargs)

    m = mask
    while m.meta["val"].dim() < 4:
        m = call(aten.unsqueeze.default, m, 0)
    bm, hm = m.meta["val"].shape[:2]
    if hm == 1:
        m5 = call(aten.unsqueeze.default, m, 2)
    else:
        m5 = call(aten.reshape.default, m, [bm, p["hkv"], p["n_rep"], -1, p["s"]])  # -1: T may be symbolic
    if m5.meta["val"].dtype == torch.bool:
        seen = call(aten.any.dim, m5, -1, True)
        zero = call(aten.scalar_tensor.default, 0.0, dtype=p["q"].meta["val"].dtype)
        hidden = call(aten.scalar_tensor.default, float("-inf"), dtype=p["q"].meta["val"].dtype)
        additive = call(aten.where.self, m5, zero, hidden)
    else:
        seen = call(aten.any.dim, call(aten.ne.Scalar, m5, float("-inf")), -1, True)
        additive = m5
    return additive, call(aten.logical_not.default, seen)


def grouped_attention(ep: torch.export.ExportedProgram) -> int:
    """Rewrite every `scaled_dot_product_attention` (no dropout, no causal flag, float or boolean mask
    broadcast over heads) as grouped batched matmuls (see the module docstring); returns how many.
    The same numbers up to float rounding (q is scaled instead of q and kᵀ by √scale)."""
    graph = ep.graph_module.graph
    masks: dict[torch.fx.Node, tuple[torch.fx.Node, torch.fx.Node]] = {}
    done = 0
    for node in list(graph.find_nodes(op="call_function", target=_SDPA)):
        p = _plan(node)
        if p is None:
            continue

        def call(target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
            return call_before(node, target, *args, **kwargs)

        b, hkv, n_rep, s, d, dv = p["b"], p["hkv"], p["n_rep"], p["s"], p["d"], p["dv"]
        q = call(aten.view.default, call(aten.mul.Tensor, p["q"], p["scale"]), [b, hkv, n_rep, -1, d])
        q = call(aten.reshape.default, q, [b * hkv, -1, d])
        k = call(aten.transpose.int, call(aten.reshape.default, p["k"], [b * hkv, s, d]), 1, 2)
        scores = call(aten.view.default, call(aten.bmm.default, q, k), [b, hkv, n_rep, -1, s])
        hidden = None
        if p["mask"] is not None:
            if p["mask"] not in masks:
                masks[p["mask"]] = _mask_terms(node, p["mask"], p)
            additive, hidden = masks[p["mask"]]
            scores = call(aten.add.Tensor, scores, additive)
        probs = call(aten.view.default, call(aten._softmax.default, scores, -1, False), [b * hkv, -1, s])
        out = call(aten.bmm.default, probs, call(aten.reshape.default, p["v"], [b * hkv, s, dv]))
        out = call(aten.view.default, out, [b, hkv, n_rep, -1, dv])
        if hidden is not None:
            out = call(aten.where.self, hidden, call(aten.scalar_tensor.default, 0.0, dtype=out.meta["val"].dtype), out)
        out = call(aten.view.default, out, [b, hkv * n_rep, -1, dv])
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        done += 1
    if done:
        graph.eliminate_dead_code()
        ep.graph_module.recompile()
    return done
