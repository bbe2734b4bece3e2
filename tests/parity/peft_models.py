"""The custom models of PEFT 0.21.2's ``tests/test_custom_models.py`` that its LoRA TEST_CASES for trainable tokens,
grouped convolutions and ``nn.MultiheadAttention`` run on, rebuilt with the same layers and shapes, and their
inputs (PEFT's ``X = arange(90).view(9, 10)``). Each factory seeds torch's RNG first, as PEFT's
``MockTransformerWrapper.from_pretrained`` does, so two calls give the same weights.
"""

from __future__ import annotations

import torch
from torch import nn


class EmbConv1D(nn.Module):
    """Embedding (100, 5) -> GPT-2 Conv1D (5 -> 1) -> Linear (10 -> 2)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1d(self.emb(x))).flatten(1)  # (N, 10, 5) -> (N, 10, 1) -> (N, 10)
        return torch.log_softmax(self.lin0(h), dim=-1)


class Conv2dGroups(nn.Module):
    """Linear (90 -> 288) -> Conv2d (16 -> 16, 3x3, groups=8) -> Linear (16 -> 2); the batch is folded into 2."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.lin1 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin0(x.float().flatten()).reshape(2, 16, 3, 3)  # (810,) -> (288,) -> (2, 16, 3, 3)
        h = torch.relu(self.conv2d(h)).flatten(1)  # (2, 16, 1, 1) -> (2, 16)
        return torch.log_softmax(self.lin1(h), dim=-1)


class Conv2dGroups2(nn.Module):
    """Conv2d (16 -> 32, 3x3, padding 1, groups=2) on a fixed (9, 16, 20, 20) input, then Linear (12800 -> 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.lin0 = nn.Linear(12800, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        del x  # as in PEFT's model: the input is replaced by a fixed one of the shape the conv needs
        h = torch.arange(9 * 16 * 20 * 20, dtype=torch.float32).view(9, 16, 20, 20) / 1000.0
        h = torch.relu(self.conv2d(h)).flatten(1)  # (9, 32, 20, 20) -> (9, 12800)
        return torch.log_softmax(self.lin0(h), dim=-1)


class Mha(nn.Module):
    """nn.MultiheadAttention (10, 2 heads) over the input as query, key and value, then Linear (10 -> 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() / 90.0
        h, _ = self.mha(h, h, h)  # (9, 10) unbatched: 9 positions of width 10
        return torch.log_softmax(self.lin0(h), dim=-1)


def build(cls: type) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def peft_input() -> torch.Tensor:
    """PEFT's test input: ``arange(90).view(9, 10)``."""
    return torch.arange(90).view(9, 10)
