"""Decoder language models, token by token: `export_lm` exports a (quantized) transformers causal LM
with a static KV cache, and `generate` runs greedy generation through any artifact made from it.

Two layouts, one program each, with T dynamic in [1, max_cache_len]: a prompt is one call (prefill),
each new token one call of T = 1 (decode).
- "static_cache" (default): `(input_ids [1, T], cache_position [T]) -> logits [1, vocab]` (the last
  position's); keys and values live in mutable buffers of `max_cache_len` positions. torch.export
  records the writes, and the .pt2, AOTInductor and ExecuTorch keep the buffers between calls.
- "static_cache_io": the same cache passed in and returned, `(input_ids, cache_position, k_0, v_0,
  ...) -> (logits, k_0', v_0', ...)`, for runtimes without state: ONNX.

What `generate` needs beyond the file's inputs (the layout, the cache length and shapes, the
vocabulary, the end-of-sequence ids) is a `GenerationSpec`, which travels in the program
(`graph_module.meta["custom"]`, kept by torch.export's serializer) into every artifact's manifest as
`extra["generation"]`.
"""

from __future__ import annotations

import inspect
import math
import numbers
import time
from dataclasses import dataclass
from os import PathLike
from typing import Any, Sequence

import torch
from torch import nn

from .errors import ArtifactError, CorruptArtifactError, ExportError, GenerationError, NotALanguageModelError
from serializers.manifest import GENERATION_META

#: the layouts `generate` can run; see the module docstring
LAYOUTS = ("static_cache", "static_cache_io")
#: the largest cache (all its tensors) a generation record may ask for: an 8B model's fp32 cache at 8k positions is 4 GiB
MAX_CACHE_BYTES = 8 << 30
#: export_lm's `cache=` choices and the layout each makes
CACHE_LAYOUTS = {"buffers": "static_cache", "io": "static_cache_io"}
SPEC_FORMAT = 1
_INT64_MAX = (1 << 63) - 1
#: the dynamic prompt-length dim's name, as the manifest's input table shows it
PROMPT_DIM = "prompt_len"


@dataclass(frozen=True)
class GenerationSpec:
    """What a generating runtime needs to know about a program, beyond its inputs."""

    max_cache_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    layout: str = "static_cache"
    #: "static_cache_io": the shape of each cache input (k_0, v_0, k_1, ...) and their dtype
    cache_shapes: tuple[tuple[int, ...], ...] = ()
    cache_dtype: str = "float32"
    format: int = SPEC_FORMAT
    #: a position at which generation recomputes the whole sequence instead of one token (see `_longrope_switch`)
    recompute_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"format": self.format, "layout": self.layout, "max_cache_len": self.max_cache_len,
               "vocab_size": self.vocab_size, "eos_token_ids": list(self.eos_token_ids)}
        if self.layout == "static_cache_io":
            out.update(cache_shapes=[list(s) for s in self.cache_shapes], cache_dtype=self.cache_dtype)
        if self.recompute_at is not None:
            out["recompute_at"] = self.recompute_at
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "the artifact") -> "GenerationSpec":
        """Raises UnsupportedVersionError for a newer format, CorruptArtifactError for a malformed record."""
        from .errors import UnsupportedVersionError

        if not isinstance(data, dict):
            raise CorruptArtifactError(f"{source}: the generation record is not an object")
        fmt = data.get("format")
        if isinstance(fmt, int) and fmt > SPEC_FORMAT:
            raise UnsupportedVersionError(f"{source}: generation record format {fmt} is newer than this qexport reads "
                                          f"({SPEC_FORMAT}); upgrade qexport")

        def count(key: str, low: int) -> int:
            v = data.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise CorruptArtifactError(f"{source}: generation record: {key} must be an int >= {low}, got {v!r}")
            return v

        eos = data.get("eos_token_ids", [])
        if not isinstance(eos, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
            raise CorruptArtifactError(f"{source}: generation record: eos_token_ids must be a list of ints, got {eos!r}")
        layout = data.get("layout")
        if layout not in LAYOUTS:
            raise CorruptArtifactError(f"{source}: generation record: layout {layout!r} is not one of {LAYOUTS}")
        shapes, dtype = data.get("cache_shapes", []), data.get("cache_dtype", "float32")
        if not isinstance(shapes, list) or not all(
                isinstance(sh, list) and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in sh)
                for sh in shapes) or (layout == "static_cache_io") != bool(shapes):
            raise CorruptArtifactError(f"{source}: generation record: cache_shapes {shapes!r} do not fit layout {layout!r}")
        if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise CorruptArtifactError(f"{source}: generation record: cache_dtype {dtype!r} is not a torch dtype")
        nbytes = sum(math.prod(sh) for sh in shapes) * getattr(torch, dtype).itemsize
        if nbytes > MAX_CACHE_BYTES:  # the record is the file's: `empty_cache` allocates what it says
            raise CorruptArtifactError(f"{source}: generation record: cache_shapes need {nbytes:,} bytes, more than the "
                                       f"{MAX_CACHE_BYTES:,} qexport allocates for a cache; not a record qexport writes")
        if count("vocab_size", 1) > _INT64_MAX:  # token ids travel as int64
            raise CorruptArtifactError(f"{source}: generation record: vocab_size {data['vocab_size']} is beyond int64; "
                                       f"not a record qexport writes")
        return cls(max_cache_len=count("max_cache_len", 1), vocab_size=count("vocab_size", 1),
                   eos_token_ids=tuple(eos), layout=layout, cache_shapes=tuple(tuple(sh) for sh in shapes),
                   cache_dtype=dtype, format=count("format", 1),
                   recompute_at=count("recompute_at", 1) if "recompute_at" in data else None)

    def empty_cache(self) -> list[torch.Tensor]:
        """The cache a "static_cache_io" program starts from (what it holds beyond a position is masked)."""
        return [torch.zeros(sh, dtype=getattr(torch, self.cache_dtype)) for sh in self.cache_shapes]


# -- export -------------------------------------------------------------------------------------------

class StaticCacheLM(nn.Module):
    """A transformers causal LM over a StaticCache: the module `TorchExportableModuleWithStaticCache`
    (transformers.integrations.executorch) builds, returning only the last position's logits
    (`logits_to_keep=1`: a prompt's other rows would cost a [T, hidden] x [hidden, vocab] GEMM that
    greedy decoding throws away). With `cache_io` the cache is passed in and returned instead of held
    in buffers (see the module docstring)."""

    def __init__(self, model: nn.Module, max_cache_len: int, cache_io: bool = False) -> None:
        super().__init__()
        from transformers.cache_utils import DummyLayer, StaticCache, StaticLayer, StaticSlidingWindowLayer
        from transformers.configuration_utils import get_head_shapes

        self.model, self.cache_io, self.max_cache_len = model, cache_io, max_cache_len
        self._takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        config = model.config.get_text_config()
        self.cache = StaticCache(max_cache_len=max_cache_len, config=config)
        for i, layer in enumerate(self.cache.layers):
            # as transformers' export module does: a sliding-window layer's update branches on data,
            # which export cannot capture; a full layer keeps every position and the attention mask still
            # applies the window (the same logits past it). A KV-sharing layer never reads its own cache
            if isinstance(layer, StaticSlidingWindowLayer):
                self.cache.layers[i] = StaticLayer(max_cache_len)
            elif isinstance(layer, DummyLayer):
                self.cache.layers[i] = StaticLayer(0)
        written = _written_kv(model, config)
        for layer, kv in zip(self.cache.layers, written):
            if kv is not None and layer.supports_early_init:
                layer.lazy_initialization(*kv)
        # layers that wrote nothing in the probe (KV sharing) from the config's shapes
        heads, head_dim = get_head_shapes(config)
        self.cache.early_initialization(1, heads, head_dim, _float_dtype(model), torch.device("cpu"))
        if not cache_io:
            for i, layer in enumerate(self.cache.layers):
                self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
                self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)

    def example_cache(self) -> list[torch.Tensor]:
        return [torch.zeros_like(t) for layer in self.cache.layers for t in (layer.keys, layer.values)]

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor, *cache: torch.Tensor) -> Any:
        for i, layer in enumerate(self.cache.layers):
            if self.cache_io:
                # copies: written in place, the inputs would be mutated, which ONNX cannot say
                layer.keys, layer.values = cache[2 * i].clone(), cache[2 * i + 1].clone()
            else:
                # Non-strict export swaps this module's buffers for fakes but not the cache layers' own
                # references to the same tensors, which it would lift as constants written in place
                # (AOTInductor: "mutating a non-functional tensor"); read them from the module.
                layer.keys, layer.values = getattr(self, f"key_cache_{i}"), getattr(self, f"value_cache_{i}")
            # where this call's tokens go, from the call itself: no state to reset between generations
            layer.cumulative_length = cache_position[0].clone()
        # Positions from the call too: a model that derives them from the cache's length and a mask of
        # ones (OPT's learned positions: cumsum, then a slice from that length) slices by a data-dependent
        # size, which export turns into a runtime assert that a one-token call fails.
        positions = {"position_ids": cache_position.unsqueeze(0)} if self._takes_positions else {}
        out = self.model(input_ids=input_ids, attention_mask=None, cache=self.cache, use_cache=True, logits_to_keep=1,
                         **positions)
        logits = out.logits[:, -1, :]
        if not self.cache_io:
            return logits
        return (logits, *(t for layer in self.cache.layers for t in (layer.keys, layer.values)))


def _written_kv(model: nn.Module, config: Any) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per cache layer, empty keys and values ([1, kv_heads, 0, head_dim]) shaped and typed as the model's
    attention writes them, from one eager token over a DynamicCache; None where a layer wrote nothing.
    transformers' `get_head_shapes` reads the shapes from the config, which misses architectures that
    derive them otherwise: Falcon-7B/40B (`multi_query`) write one KV head where the config says
    num_attention_heads, and their export failed inside the cache's `index_copy_`."""
    from transformers.cache_utils import DynamicCache

    probe = DynamicCache(config=config)
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long), attention_mask=None, cache=probe, use_cache=True,
                  logits_to_keep=1)
    except Exception as e:  # noqa: BLE001 - the model's own forward: say which step failed, keep its message
        raise ExportError(f"export_lm: {type(model).__name__}'s own forward on one token (run to read its cache's "
                          f"shapes) failed: {type(e).__name__}: {e}") from e
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for layer in probe.layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        ok = all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-2] > 0 for t in (k, v))
        out.append((k[:1, :, :0].clone(), v[:1, :, :0].clone()) if ok else None)
    return out


#: how far (relative to the largest logit) the static-cache module's logits may sit from the model's own:
#: both run the same eager layers, so only the attention's summation order differs (~1e-7), which can move
#: one per-token int8 rounding (~1e-3 on real models, 1-3 % on the tests' random ones)
STATIC_CACHE_RTOL = 5e-2


def _check_static_cache(wrapper: StaticCacheLM, text: Any) -> None:
    """ExportError unless the wrapper's logits for a short prompt and then one token, over its static
    cache, equal the model's own over a DynamicCache. An architecture whose attention does not follow
    transformers' static cache either computes other logits without a word (GPT-Neo slices its causal
    mask by the cache's length, so each call attended to the empty positions: every token parted from
    the model's; transformers marks it `_can_compile_fullgraph = False`) or fails only when generating
    (Falcon with ALiBi: a runtime assert). The cache is left empty again."""
    from transformers.cache_utils import DynamicCache

    model = wrapper.model
    vocab = int(getattr(text, "vocab_size", 0) or 2)
    n = min(3, wrapper.max_cache_len - 1)
    calls = [(torch.tensor([[min(t, vocab - 1) for t in range(1, n + 1)]]), 0), (torch.tensor([[min(5, vocab - 1)]]), n)]
    reference = DynamicCache(config=text)
    state = wrapper.example_cache() if wrapper.cache_io else []
    name = type(model).__name__
    try:
        with torch.no_grad():
            for ids, start in calls:
                want = model(input_ids=ids, cache=reference, use_cache=True, logits_to_keep=1).logits[:, -1]
                out = wrapper(ids, torch.arange(start, start + ids.shape[1]), *state)
                got, state = (out[0], list(out[1:])) if wrapper.cache_io else (out, state)
                err = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)
                if not err <= STATIC_CACHE_RTOL:
                    raise ExportError(
                        f"export_lm: {name} over a static KV cache computes other logits than over its own cache "
                        f"({'prompt' if start == 0 else 'next token'}: max difference {err:.3g} of the largest logit): its "
                        f"attention does not follow transformers' StaticCache"
                        + (" (transformers marks it _can_compile_fullgraph = False)" if not getattr(model, "_can_compile_fullgraph", True) else "")
                        + "; export_lm cannot export this architecture for token-by-token generation")
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own code over the static cache: name the step, keep its message
        raise ExportError(f"export_lm: {name} does not run over transformers' StaticCache ({type(e).__name__}: {e}); "
                          f"export_lm cannot export this architecture for token-by-token generation") from e
    finally:
        for layer in wrapper.cache.layers:
            layer.keys.zero_()
            layer.values.zero_()


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


def _check_lm(model: Any, max_cache_len: Any) -> Any:
    """The model's text config; ExportError for what `export_lm` cannot take."""
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None or not hasattr(config, "get_text_config"):
        raise ExportError(
            f"export_lm takes a transformers causal LM (e.g. LlamaForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel), "
            f"got {type(model).__name__}; for other models use qexport.export"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ExportError(f"{type(model).__name__} is an encoder-decoder model; export_lm takes decoder-only LMs")
    if not any(base.__name__ == "GenerationMixin" for base in type(model).__mro__):
        raise ExportError(f"{type(model).__name__} does not generate text (no language-modelling head); "
                          f"export_lm takes a *ForCausalLM / *LMHeadModel")
    if not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or max_cache_len < 2:
        raise ExportError(f"max_cache_len must be an int >= 2, got {max_cache_len!r}")
    text = config.get_text_config()
    positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if positions is not None and max_cache_len > positions:
        raise ExportError(
            f"max_cache_len={max_cache_len} is beyond the {positions} positions {type(model).__name__} was configured "
            f"for (max_position_embeddings); choose max_cache_len <= {positions}"
        )
    return text


def _longrope_switch(text: Any, max_cache_len: int) -> int | None:
    """The position at which generation must recompute the whole sequence, for a LongRoPE model (Phi-3
    128k, Phi-3.5, Phi-4-mini): each call rotates its keys with the short or the long factors by its
    largest position, so the keys cached below `original_max_position_embeddings` keep the short ones once
    positions pass it. transformers' generate (Phi-3's prepare_inputs_for_generation) drops the cache at
    that point and runs the whole sequence again; without that the tokens parted from its own there."""
    rope = getattr(text, "rope_parameters", None) or {}
    per_type = rope.values() if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
    for params in per_type:
        if isinstance(params, dict) and params.get("rope_type") == "longrope":
            switch = params.get("original_max_position_embeddings") or getattr(text, "original_max_position_embeddings", None)
            if isinstance(switch, int) and 1 <= switch < max_cache_len:
                return switch
    return None


def _eos_ids(model: nn.Module, text: Any) -> tuple[int, ...]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(text, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def export_lm(
    model: nn.Module, *, max_cache_len: int = 256, cache: str = "buffers", strict: bool = False
) -> torch.export.ExportedProgram:
    """Export a transformers decoder-only LM (quantized with `qexport.quantize` first, or float) for
    token-by-token generation over a static KV cache of `max_cache_len` positions: `(input_ids [1, T],
    cache_position [T]) -> logits [1, vocab]`, T dynamic in [1, max_cache_len].

    `cache="buffers"` (default) keeps the cache in mutable buffers of the program (the .pt2, AOTI
    and ExecuTorch keep them between calls); `cache="io"` passes it in and out as tensors, for ONNX.
    Every quantized projection is one region, as with `qexport.export`. The program records what
    `generate` needs (`GenerationSpec`), and `save`, `compile`, `to_executorch`, `to_onnx` carry it
    into their artifact's manifest. The model itself is left as it was."""
    text = _check_lm(model, max_cache_len)
    try:
        from transformers.cache_utils import StaticCache  # noqa: F401
        from transformers.configuration_utils import get_head_shapes  # noqa: F401
    except ImportError as e:
        from .errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"export_lm needs transformers 5 (its StaticCache with early_initialization and get_head_shapes; tested "
            f"with 5.24): {e}. pip install 'transformers>=5.24'"
        ) from None
    if cache not in CACHE_LAYOUTS:
        raise ExportError(f"cache={cache!r} is not one of {sorted(CACHE_LAYOUTS)} ('io' for ONNX)")
    from .export import export

    modes = {m: m.training for m in model.modules()}
    try:
        wrapper = StaticCacheLM(model.eval(), max_cache_len, cache_io=cache == "io")
        _check_static_cache(wrapper, text)
        prompt = torch.export.Dim(PROMPT_DIM, min=1, max=max_cache_len)
        states = wrapper.example_cache() if cache == "io" else []
        args = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2), *states)
        dims = ({1: prompt}, {0: prompt}, *([(None,) * len(states)] if states else []))  # *cache is one vararg tuple
        # Without grad: the cache writes would otherwise record a leaf that requires grad being written
        # in place (norm weights are Parameters), which ExecuTorch's passes refuse.
        with torch.no_grad():
            ep = export(wrapper, args, dynamic_shapes=dims, strict=strict)
    finally:
        for m, training in modes.items():
            m.training = training
    logits = next(n for n in ep.graph.nodes if n.op == "output").args[0][0].meta["val"]
    spec = GenerationSpec(max_cache_len=max_cache_len, vocab_size=int(logits.shape[-1]), eos_token_ids=_eos_ids(model, text),
                          layout=CACHE_LAYOUTS[cache], cache_shapes=tuple(tuple(t.shape) for t in states),
                          cache_dtype=str(states[0].dtype).removeprefix("torch.") if states else "float32",
                          recompute_at=_longrope_switch(text, max_cache_len))
    ep.graph_module.meta.setdefault("custom", {})[GENERATION_META] = spec.to_dict()
    return ep


# -- generate -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationResult:
    """Greedy generation's output: the new tokens (the prompt not included) and its speed."""

    tokens: list[int]
    #: seconds of the prompt's call (the first token included)
    prefill_s: float
    #: tokens per second over the single-token calls (None when only one token was generated)
    decode_tokens_per_s: float | None
    prompt_len: int = 0
    #: whether generation stopped on an end-of-sequence token before max_new_tokens
    stopped_at_eos: bool = False


def generation_spec(artifact: Any) -> GenerationSpec:
    """The GenerationSpec of an artifact path, a `runners.Runner`, or an ExportedProgram;
    NotALanguageModelError when it has none."""
    from . import runners

    from .signature import InputSpec, program_inputs

    if isinstance(artifact, torch.export.ExportedProgram):
        record, source = artifact.graph_module.meta.get("custom", {}).get(GENERATION_META), "the program"
        inputs: Any = lambda: program_inputs(artifact)  # noqa: E731
    else:
        import serializers

        path = artifact.path if isinstance(artifact, runners.Runner) else artifact
        source = str(path)
        extra = serializers.inspect(path).extra
        record, raw = extra.get("generation"), extra.get("inputs")
        inputs = lambda: [InputSpec.from_json(d) for d in raw] if isinstance(raw, list) else []  # noqa: E731
    if record is None:
        raise NotALanguageModelError(
            f"{source}: not a generating language model (its manifest has no generation record); export the "
            f"model with qexport.export_lm(model, max_cache_len=...) and save/compile/lower that program"
        )
    spec = GenerationSpec.from_dict(record, source)
    try:
        specs = inputs()
    except ValueError as e:
        raise CorruptArtifactError(f"{source}: its input signature is unreadable ({e}); re-export it") from None
    _check_record(spec, specs, source)
    return spec


def _check_record(spec: GenerationSpec, inputs: Sequence[Any], source: str) -> None:
    """CorruptArtifactError unless the record fits the input signature recorded beside it: generation
    trusts the record's cache length and vocabulary, and a position past the program's cache or a
    token past its embedding's rows aborts an AOTI package's process (a bounds check throwing inside
    an OpenMP region) and raises IndexError elsewhere. The signature is what export_lm wrote: token ids
    [1, T] with T dynamic in [1, max_cache_len], and the rows they index (`InputSpec.values`)."""
    ids = inputs[0] if inputs and inputs[0].shape else None
    length = ids.shape[-1] if ids is not None else None
    if length is None or not length.dynamic or length.max is None:
        raise CorruptArtifactError(f"{source}: its generation record has no input signature beside it that bounds the "
                                   f"prompt length (token ids [1, T], T dynamic up to max_cache_len); re-export it with "
                                   f"qexport.export_lm")
    if spec.max_cache_len > length.max:
        raise CorruptArtifactError(f"{source}: its generation record's max_cache_len {spec.max_cache_len} is beyond the "
                                   f"{length.max} positions its program takes; not a record qexport writes, re-export it")
    if ids.values is not None and not ids.values[0] <= 0 <= spec.vocab_size - 1 <= ids.values[1]:
        raise CorruptArtifactError(f"{source}: its generation record's vocab_size {spec.vocab_size} is beyond the "
                                   f"{ids.values[1] + 1} rows its token ids index (input {ids.name}); generated tokens "
                                   f"are fed back as ids; not a record qexport writes, re-export it")


def _is_int(v: Any) -> bool:
    """An integer, Python's or numpy's (a tokenizer's `return_tensors="np"` ids), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _prompt(prompt_ids: Any) -> list[int]:
    if not isinstance(prompt_ids, torch.Tensor) and hasattr(prompt_ids, "__array__") and hasattr(prompt_ids, "dtype"):
        # a numpy array (a tokenizer's return_tensors="np"): checked as the tensor it converts to
        try:
            prompt_ids = torch.as_tensor(prompt_ids)
        except (TypeError, RuntimeError, ValueError):
            raise GenerationError(f"prompt_ids must be integer token ids, got an array of {prompt_ids.dtype}") from None
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
            prompt_ids = prompt_ids[0]
        if prompt_ids.dim() != 1 or prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
            raise GenerationError(f"prompt_ids must be one sequence of integer token ids ([T] or [1, T]), got a "
                                  f"{prompt_ids.dtype} tensor of shape {list(prompt_ids.shape)}")
        return [int(t) for t in prompt_ids.tolist()]
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
        raise GenerationError(f"prompt_ids must be a list of token ids (ints), got {type(prompt_ids).__name__}; "
                              f"tokenize text first")
    if not all(_is_int(t) for t in prompt_ids):
        raise GenerationError(f"prompt_ids must be ints, got {[type(t).__name__ for t in prompt_ids][:3]}...")
    return [int(t) for t in prompt_ids]


def check_request(spec: GenerationSpec, prompt: list[int], max_new_tokens: Any, source: str = "the artifact") -> None:
    """GenerationError unless `prompt` and `max_new_tokens` fit the artifact's vocabulary and cache."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not prompt:
        raise GenerationError("the prompt is empty; give at least one token id")
    bad = [t for t in prompt if not 0 <= t < spec.vocab_size]
    if bad:
        raise GenerationError(f"token ids {bad[:5]} are outside {source}'s vocabulary [0, {spec.vocab_size})")
    # the prompt takes positions 0..P-1 and each new token but the last one more position
    need = len(prompt) + max_new_tokens - 1
    if need > spec.max_cache_len:
        fits = spec.max_cache_len - len(prompt) + 1
        raise GenerationError(
            f"a prompt of {len(prompt)} tokens and {max_new_tokens} new tokens need {need} cache positions; {source} "
            f"holds {spec.max_cache_len}. " + (f"Ask for at most {fits} new tokens" if fits >= 1 else "Shorten the prompt")
            + " or export with a larger max_cache_len"
        )


def generate(
    artifact_or_runner: "str | PathLike[str] | Any",
    prompt_ids: "Sequence[int] | torch.Tensor",
    max_new_tokens: int = 32,
    *,
    stop_at_eos: bool = True,
    expected_sha256: str | None = None,
    spec: GenerationSpec | None = None,
    cuda_graph: bool = True,
) -> GenerationResult:
    """Greedy generation through an artifact of `export_lm`: a `.pt2`, an AOTInductor package, a
    `.pte`, an `.onnx` (path), a `qexport.runners.Runner` already loaded, or the ExportedProgram itself.

    The prompt is one call (its time is `prefill_s`), each further token one call of one token
    (`decode_tokens_per_s`). Stops after `max_new_tokens` tokens, or at an end-of-sequence token of the
    model's generation config when `stop_at_eos` (that token is returned). The request is checked
    against the artifact's vocabulary and cache length before anything runs (GenerationError), and an
    artifact that is not a generating LM is refused (NotALanguageModelError). A runner keeps its cache
    between calls; each generation overwrites it from position 0, so one runner serves many prompts
    (one at a time). `spec` stands in for the manifest's record when the runner's file has none (a
    program with the same signature lowered by another tool). On a CUDA AOTI package the cache stays
    on the GPU and, with `cuda_graph` (default), the single-token step is captured in a CUDA graph once
    per runner and replayed per token (`CudaGraphDecoder`)."""
    from serializers.files import pinned_digest

    from . import runners

    expected_sha256 = pinned_digest(expected_sha256)
    prompt = _prompt(prompt_ids)
    spec = spec if spec is not None else generation_spec(artifact_or_runner)
    source = "the program" if isinstance(artifact_or_runner, torch.export.ExportedProgram) else str(
        artifact_or_runner.path if isinstance(artifact_or_runner, runners.Runner) else artifact_or_runner)
    check_request(spec, prompt, max_new_tokens, source)
    if isinstance(artifact_or_runner, runners.Runner):
        runner = artifact_or_runner
    elif isinstance(artifact_or_runner, torch.export.ExportedProgram):
        runner = runners.program_runner(artifact_or_runner)
    else:
        runner = runners.load(artifact_or_runner, expected_sha256=expected_sha256)
    return _greedy(runner, spec, prompt, int(max_new_tokens), stop_at_eos, cuda_graph)


def _check_inputs(runner: Any, spec: GenerationSpec) -> None:
    """The record must describe the program it sits beside (before its cache shapes are allocated)."""
    if runner.inputs is None:  # AOTI packages do not list their inputs
        return
    found = [tuple(i.shape) for i in runner.inputs[2:]]
    if len(runner.inputs) != 2 + len(spec.cache_shapes) or any(
            a != b for a, b in zip(found, spec.cache_shapes)):
        raise CorruptArtifactError(
            f"{runner.path}: its generation record ({spec.layout}, {len(spec.cache_shapes)} cache tensors) does not "
            f"describe its inputs ({len(runner.inputs)}: {[i.name for i in runner.inputs][:4]}...); re-export it"
        )


def _greedy(runner: Any, spec: GenerationSpec, prompt: list[int], n: int, stop_at_eos: bool,
            cuda_graph: bool = True) -> GenerationResult:
    eos = set(spec.eos_token_ids) if stop_at_eos else set()
    _check_inputs(runner, spec)
    device = getattr(runner, "device", "cpu")
    cache = [t.to(device) for t in spec.empty_cache()]

    def next_token(ids: list[int], start: int) -> int:
        nonlocal cache
        out = runner.call([torch.tensor([ids], dtype=torch.long, device=device),
                           torch.arange(start, start + len(ids), dtype=torch.long, device=device), *cache])
        if len(out) != 1 + len(cache) or out[0].shape[-1] != spec.vocab_size:
            raise ArtifactError(f"{runner.path}: returned {[list(o.shape) for o in out][:3]} where its generation record "
                                f"promises logits over {spec.vocab_size} tokens and {len(cache)} cache tensors")
        cache = out[1:]
        return int(_argmax_pick(out[0]))

    t0 = time.perf_counter()
    tokens = [next_token(prompt, 0)]
    prefill_s = time.perf_counter() - t0
    # the position whose call runs the whole sequence again (None: none in this generation); see _longrope_switch
    recompute = spec.recompute_at if spec.recompute_at is not None and len(prompt) <= spec.recompute_at < len(prompt) + n - 1 \
        else None
    t1 = time.perf_counter()
    if device == "cuda" and cuda_graph and spec.layout == "static_cache" and n > 1 and tokens[-1] not in eos and recompute is None:
        tokens += _graph_decoder(runner, spec).run(tokens[-1], len(prompt), n - 1, eos)
    while len(tokens) < n and tokens[-1] not in eos:
        position = len(prompt) + len(tokens) - 1
        tokens.append(next_token(prompt + tokens, 0) if position == recompute else next_token(tokens[-1:], position))
    decoded = len(tokens) - 1
    rate = decoded / (time.perf_counter() - t1) if decoded else None
    return GenerationResult(tokens, prefill_s, rate, len(prompt), bool(eos) and tokens[-1] in eos)


def _argmax_pick(logits: torch.Tensor) -> torch.Tensor:
    """The greedy token of `logits`' last row, as a [1] int64 tensor on its device (torch.argmax: the
    first maximum)."""
    return logits.reshape(-1, logits.shape[-1])[-1].argmax().reshape(1)


_PICKS: dict[tuple, Any] = {}
#: the greedy picks timed on the GPU: ATen's argmax, one Triton program, one program per block of logits
_PICK_KINDS = ("aten", ("one", 32, 4096), ("blocks", 4, 1024), ("blocks", 8, 2048))


def _pick(kind: Any, vocab: int, device: torch.device) -> Any:
    if kind == "aten":
        return _argmax_pick
    from .lower.kernels import cuda as kernels

    if kind[0] == "one":
        return lambda x: kernels.greedy_token(x, num_warps=kind[1], block=kind[2])
    return kernels.GreedyBlocks(vocab, device, block=kind[2], num_warps=kind[1])


def _fastest_pick(logits: torch.Tensor) -> Any:
    """A new instance of the fastest greedy pick for one row like `logits` on this GPU, the kind timed
    once per (GPU, vocabulary, dtype) as graph replays: ATen's argmax reduces one long row in one block
    for some lengths (H200: 15.4 µs for 32000 logits, 40.6 for 128256) and several for others (12.4 for
    151936), where one Triton program took 7.0 / 13.0 / 14.7 (benchmarks/cuda_lab_argmax.py); one
    program per block of logits spreads the row over the GPU. Each instance holds its own workspace."""
    vocab = logits.shape[-1]
    key = (torch.cuda.get_device_name(logits.device), vocab, logits.dtype)
    if key not in _PICKS:
        from .lower.kernels import cuda as kernels
        from .lower.kernels.cuda_tune import bench_us

        want = int(_argmax_pick(logits))
        times = {"aten": bench_us(lambda: _argmax_pick(logits))}
        if kernels.triton is not None:
            for kind in _PICK_KINDS[1:]:
                try:
                    fn = _pick(kind, vocab, logits.device)
                    if int(fn(logits)) == want:
                        times[kind] = bench_us(lambda fn=fn: fn(logits))
                except Exception:  # noqa: BLE001 - a Triton that cannot build it here: ATen's argmax is always right
                    pass
        _PICKS[key] = min(times, key=times.get)
    return _pick(_PICKS[key], vocab, logits.device)


class CudaGraphDecoder:
    """Greedy single-token steps of a CUDA program that keeps its cache in buffers, as replays of one
    captured CUDA graph: the step (the program on one token, the argmax, the token fed back as the next
    input and recorded at its position) is captured once per runner and replayed per token, so the
    host neither launches the program's kernels nor waits for a token before queueing the next step;
    it reads the tokens once at the end (every `EOS_CHECK` steps when it must stop at an end of sequence).
    Replays run at most the steps asked for, so positions never pass the cache."""

    #: steps queued between end-of-sequence checks (the steps after one are wasted, never returned)
    EOS_CHECK = 8

    def __init__(self, runner: Any, spec: GenerationSpec) -> None:
        self.runner, self.vocab = runner, spec.vocab_size
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=runner.device)
        self.pos = torch.zeros((1,), dtype=torch.long, device=runner.device)
        #: hist[p] = the token generated for position p
        self.hist = torch.zeros(spec.max_cache_len + 1, dtype=torch.long, device=runner.device)
        self.graph: Any = None
        self._keep: list[torch.Tensor] = []  # the captured step's outputs, in the graph's memory pool
        #: the greedy pick captured in the step: torch.argmax, or one kernel where that is faster here
        self.pick: Any = _argmax_pick

    def _step(self) -> None:
        out = self.runner.call([self.ids, self.pos])
        token = self.pick(out[0])
        self.pos.add_(1)
        self.hist.index_copy_(0, self.pos, token)
        self.ids.copy_(token.reshape(1, 1))
        self._keep = out

    def run(self, token: int, position: int, steps: int, eos: set[int]) -> list[int]:
        """The `steps` tokens after `token`, which sits at `position` (fewer if one is in `eos`)."""
        self.ids.fill_(token)
        self.pos.fill_(position)
        done = 0
        if self.graph is None:
            # The first step runs for real on a side stream (as torch.cuda.graph asks: allocations and
            # lazy initialisation happen outside the capture); capturing the same step records it
            # without running it, so ids and pos are left where the real step put them.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                self._step()
            torch.cuda.current_stream().wait_stream(side)
            done = 1
            self.pick = _fastest_pick(self._keep[0].reshape(-1, self.vocab)[-1:])
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                self._step()
            self.graph = graph
        out: list[int] = []
        while True:
            if eos or done >= steps:
                for t in self.hist[position + 1 + len(out): position + 1 + done].tolist():
                    out.append(t)
                    if t in eos:
                        return out
            if done >= steps:
                return out
            chunk = min(steps - done, self.EOS_CHECK) if eos else steps - done
            for _ in range(chunk):
                self.graph.replay()
            done += chunk


def _graph_decoder(runner: Any, spec: GenerationSpec) -> CudaGraphDecoder:
    key = f"generation.decoder {spec.max_cache_len} {spec.vocab_size}"
    if key not in runner.cache:
        runner.cache[key] = CudaGraphDecoder(runner, spec)
    return runner.cache[key]


__all__ = ["CudaGraphDecoder", "GenerationResult", "GenerationSpec", "StaticCacheLM", "check_request", "export_lm", "generate", "generation_spec"]
