"""Tiny transformers models built from configs (no hub access): what users bring, at test size."""

from __future__ import annotations

import torch

import transformers

VOCAB = 96


def _seeded(build):
    def wrapper(*a, **kw):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return build(*a, **kw).eval()
    wrapper.__name__ = build.__name__
    return wrapper


@_seeded
def gpt2(tie: bool = True):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0, use_cache=False, tie_word_embeddings=tie)
    return transformers.GPT2LMHeadModel(cfg)


@_seeded
def llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, use_cache=False)
    return transformers.LlamaForCausalLM(cfg)


@_seeded
def bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=32)
    return transformers.BertModel(cfg, add_pooling_layer=False)


@_seeded
def vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, num_labels=5)
    return transformers.ViTForImageClassification(cfg)


@_seeded
def resnet():
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                    layer_type="basic", num_labels=5)
    return transformers.ResNetForImageClassification(cfg)


def token_ids(seq: int = 8, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def pixels(batch: int = 1, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
