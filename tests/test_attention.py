"""qexport.lower.attention.grouped_attention: sdpa over repeated KV heads -> batched matmuls over the
KV heads, the same numbers (masked-everywhere rows included) with the cache never copied."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qexport.lower.attention import grouped_attention

aten = torch.ops.aten
CACHE, HEADS, KV_HEADS, DIM = 12, 6, 2, 8


class Attention(nn.Module):
    """Attention over a cache as transformers writes it: repeat_kv (or enable_gqa) and a mask."""

    def __init__(self, kv_heads: int = KV_HEADS, how: str = "repeat_kv", mask: str = "bool") -> None:
        super().__init__()
        self.kv_heads, self.how, self.mask = kv_heads, how, mask
        g = torch.Generator().manual_seed(0)
        self.register_buffer("k", torch.randn(1, kv_heads, CACHE, DIM, generator=g))
        self.register_buffer("v", torch.randn(1, kv_heads, CACHE, DIM + 2, generator=g))

    def forward(self, q: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        k, v, n_rep = self.k, self.v, HEADS // self.kv_heads
        if self.how == "repeat_kv":  # transformers.models.llama.modeling_llama.repeat_kv
            k = k[:, :, None].expand(1, self.kv_heads, n_rep, CACHE, DIM).reshape(1, HEADS, CACHE, DIM)
            v = v[:, :, None].expand(1, self.kv_heads, n_rep, CACHE, DIM + 2).reshape(1, HEADS, CACHE, DIM + 2)
        if self.mask == "per_head":  # head h also hides key h: a head taking another's mask would differ
            allowed = allowed & (torch.arange(CACHE) != torch.arange(HEADS)[:, None, None])
        mask = allowed if self.mask != "float" else torch.where(allowed, 0.0, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3,
                                              enable_gqa=self.how == "enable_gqa")


def _inputs(t: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randn(1, HEADS, t, DIM, generator=torch.Generator().manual_seed(1))
    allowed = torch.arange(CACHE)[None, :] <= torch.arange(t)[:, None] + 4   # causal over a cache at 4
    if t > 1:
        allowed[-1] = False                                                  # the last row sees nothing
    return q, allowed[None, None]


def _export(model: nn.Module) -> torch.export.ExportedProgram:
    t = torch.export.Dim("t", min=1, max=CACHE)
    return torch.export.export(model, _inputs(), dynamic_shapes=({2: t}, {2: t}))


@pytest.mark.parametrize("kv_heads,how,mask", [
    (KV_HEADS, "repeat_kv", "bool"), (KV_HEADS, "repeat_kv", "float"), (KV_HEADS, "enable_gqa", "bool"),
    (KV_HEADS, "repeat_kv", "per_head"),
    (HEADS, "none", "float"),  # multi-head attention: nothing repeated, still no scaled copy of the keys
])
def test_same_numbers_and_no_sdpa_left(kv_heads, how, mask):
    model = Attention(kv_heads, how, mask)
    ep = _export(model)
    rewritten = copy.deepcopy(ep)
    assert grouped_attention(rewritten) == 1
    gm = rewritten.graph_module
    assert not gm.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default)
    # the cache is read as it is: nothing expands it
    assert not gm.graph.find_nodes(op="call_function", target=aten.expand.default)
    assert len(gm.graph.find_nodes(op="call_function", target=aten.bmm.default)) == 2
    for t in (1, 3, 7):
        q, allowed = _inputs(t)
        want = model(q, allowed)
        got = rewritten.module()(q, allowed)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if t > 1:  # the row the mask hides everywhere is 0, as torch's decomposition makes it
            assert torch.equal(got[:, :, -1], torch.zeros_like(got[:, :, -1]))


def test_left_alone_when_it_cannot_apply():
    class Dropout(nn.Module):
        def forward(self, q, k):
            return F.scaled_dot_product_attention(q, k, k, dropout_p=0.5)

    class Causal(nn.Module):
        def forward(self, q, k):
            return F.scaled_dot_product_attention(q, k, k, is_causal=True)

    x = torch.randn(1, 2, 4, 8)
    for model in (Dropout(), Causal()):
        ep = torch.export.export(model, (x, x))
        assert grouped_attention(ep) == 0
        assert ep.graph_module.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default)


def test_pte_of_a_grouped_query_lm_copies_no_cache(lm_pte):
    """The LM .pte (Llama, 4 query heads over 2 KV heads): every cache write in place (`index_put_`, no
    write-back copy), no repeat_kv copies of the cache, no scaling of it on portable kernels."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    path, _ = lm_pte
    plan = next(p for p in deserialize_pte_binary(path.read_bytes()).program.execution_plan if p.name == "forward")
    names = [f"{o.name}.{o.overload}" if o.overload else o.name for o in plan.operators]
    calls = [names[i.instr_args.op_index] for c in plan.chains for i in c.instructions
             if type(i.instr_args).__name__ == "KernelCall"]
    assert calls.count("aten::index_put_") == 4 and "aten::index_put.out" not in calls and "aten::copy_" not in calls
    assert calls.count("aten::expand_copy.out") <= 1  # the mask's, built once for both layers
    assert "aten::mul.Scalar_out" not in calls
