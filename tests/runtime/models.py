"""Tiny models and configs shared by the runtime tests (unit and parity).

Every model is built from a seeded generator state, so two calls give identical weights.
"""

from __future__ import annotations

import torch
from torch import nn


def make_config(**kwargs):
    """lorasurg's LoraConfig (PEFT's field names and defaults)."""
    from lorasurg.config import LoraConfig

    return LoraConfig(**kwargs)


class Net(nn.Module):
    """Embedding, Conv1d, Conv2d, Conv3d (one 1x1x1) and Linear layers, each fed by the previous one."""

    def __init__(self, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.conv1 = nn.Conv1d(dim, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1, bias=False)
        self.conv3 = nn.Conv3d(4, 4, (2, 2, 2), padding=1)
        self.point = nn.Conv3d(4, 3, 1)
        self.lin = nn.Linear(3, 5)
        self.nobias = nn.Linear(5, 5, bias=False)
        self.head = nn.Linear(5, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).transpose(1, 2)  # (N, L) -> (N, dim, L)
        h = torch.tanh(self.conv1(h))  # (N, 6, L)
        h = h.unsqueeze(-1) * h.unsqueeze(-2)  # (N, 6, L, L)
        h = torch.tanh(self.conv2(h))  # (N, 4, L, L)
        h = torch.tanh(self.conv3(h.unsqueeze(2)))  # (N, 4, 1, L, L) -> (N, 4, 2, L+1, L+1)
        h = self.point(h).mean(dim=(2, 3, 4))  # (N, 3)
        return self.head(torch.tanh(self.nobias(torch.tanh(self.lin(h)))))  # (N, 2)


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def net_input(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(seed))


def llama(seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=32, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def gpt2(seed: int = 0, n_embd: int = 16):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=n_embd, n_layer=2 if n_embd < 64 else 1, n_head=4, vocab_size=50, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


def bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=50, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def token_input(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(seed))


def output(model, x: torch.Tensor) -> torch.Tensor:
    """The model's main output tensor (logits for transformers models)."""
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def perturb(model, scale: float = 0.1, seed: int = 2) -> None:
    """Add seeded noise to every trainable parameter (so a zero-initialised B or a fresh magnitude matters)."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
