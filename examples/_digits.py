"""A small CNN for scikit-learn's 8x8 handwritten digits: data, model, training, accuracy.

Shared by examples/digits_cnn.py and its test; training takes a few seconds on a laptop CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

IMAGE_SHAPE = (1, 8, 8)


@dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor  # [N, 1, 8, 8] float32 in [0, 1]
    y_train: torch.Tensor  # [N] int64
    x_test: torch.Tensor
    y_test: torch.Tensor

    def calibration_batches(self, n: int = 8, batch: int = 64) -> list[tuple[torch.Tensor]]:
        """Training images to calibrate static activation ranges with (never the test set)."""
        return [(self.x_train[i * batch:(i + 1) * batch],) for i in range(n)]


def load(test_size: float = 0.25, seed: int = 0) -> Digits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return Digits(xtr, ytr, xte, yte)


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def _batches(d: Digits, batch: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(d.y_train), generator=gen)
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        yield d.x_train[idx], d.y_train[idx]


def train(d: Digits, epochs: int = 15, seed: int = 0) -> DigitsCNN:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for x, y in _batches(d, 64, gen):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Percent of `x` whose argmax logit is `y`; `predict` maps a batch of images to logits."""
    with torch.no_grad():
        logits = predict(x)
    return 100.0 * (logits.argmax(-1) == y).float().mean().item()
