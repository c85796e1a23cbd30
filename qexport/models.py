"""Small built-in models for the demo and the CLI (`qexport export qexport.models:TinyNet ...`).

Weights are initialised from a fixed seed so every run (and every machine) sees the same model.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """An MLP classifier, 256 -> 512 -> 512 -> 10: three Linear regions. Input: float [batch, 256]."""

    example_input_spec = "1x256"

    def __init__(self, dims: tuple[int, ...] = (256, 512, 512, 10), seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():  # a fixed model without disturbing the caller's RNG stream
            torch.manual_seed(seed)
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class TinyTransformer(nn.Module):
    """A 2-block pre-norm transformer over token ids (embedding, attention, MLP, LM head).

    Input: int64 token ids [batch, seq] in [0, vocab)."""

    example_input_spec = "1x16:int64"

    def __init__(self, vocab: int = 256, dim: int = 128, heads: int = 4, layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.emb = nn.Embedding(vocab, dim)
            self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.gelu(self.up(self.ln2(x))))


__all__ = ["TinyNet", "TinyTransformer"]
