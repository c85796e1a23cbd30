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
def llama(tie: bool = True):
    """Its head tied to the token embedding, as Llama 3.2 1B/3B have it."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, use_cache=False, tie_word_embeddings=tie)
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
def t5_encoder():
    """T5's encoder: its `shared` embedding is tied to `encoder.embed_tokens`, which the forward calls."""
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
    return transformers.T5EncoderModel(cfg)


@_seeded
def resnet():
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                    layer_type="basic", num_labels=5)
    return transformers.ResNetForImageClassification(cfg)


def token_ids(seq: int = 8, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def pixels(batch: int = 1, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


#: decoder LMs for generation tests: hidden 64, two layers, grouped-query attention where the
#: architecture has it. initializer_range 0.3 so random weights give varied greedy tokens (at
#: transformers' default 0.02 they repeat one token, which would not exercise the cache)
LM_VOCAB = 96
LM_POSITIONS = 64
_LM = dict(vocab_size=LM_VOCAB, bos_token_id=0, eos_token_id=1, initializer_range=0.3)


@_seeded
def causal_lm(arch: str = "llama"):
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=LM_POSITIONS, **_LM))
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=LM_POSITIONS, **_LM))
    if arch == "mistral":  # a sliding window shorter than the tests' generations
        return transformers.MistralForCausalLM(transformers.MistralConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            sliding_window=8, max_position_embeddings=LM_POSITIONS, **_LM))
    if arch == "phi3_longrope":  # switches to its long RoPE factors past position 16, within the tests' generations
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
            original_max_position_embeddings=16, max_position_embeddings=LM_POSITIONS, pad_token_id=2, **_LM))
    if arch == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=LM_POSITIONS, **_LM))
    if arch == "opt":  # learned positions derived from a mask of ones unless given; biases; tied head
        return transformers.OPTForCausalLM(transformers.OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
            max_position_embeddings=LM_POSITIONS, pad_token_id=2, init_std=0.3, **_LM))
    if arch in ("falcon", "falcon_alibi"):  # Falcon-7B's layout: one KV head (multi_query), which its config does not say
        return transformers.FalconForCausalLM(transformers.FalconConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True, alibi=arch == "falcon_alibi",
            max_position_embeddings=LM_POSITIONS, **_LM))
    if arch == "gpt_neo":  # masks by slicing a causal table at the cache's length: no static cache
        return transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
            hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8,
            max_position_embeddings=LM_POSITIONS, **_LM))
    raise ValueError(arch)


def greedy_tokens(model, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy generation (its dynamic cache, eager): the reference."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
