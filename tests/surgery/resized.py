"""A tiny Llama pair whose fine-tune added tokens and trained a few embedding rows (a resized vocabulary).

``resized_pair(tmp_path)`` writes ``base/`` (vocabulary 50) and ``tuned/`` (vocabulary 53: 3 tokens added, 5 existing
rows of the embedding trained, the added rows of the untied ``lm_head`` trained, and a rank-2 change of one
``q_proj`` so that the adapter has a LoRA too) with transformers' ``save_pretrained``, seeded.
"""

from __future__ import annotations

from pathlib import Path

import torch

TRAINED_ROWS = (3, 7, 11, 20, 33)
ADDED = 3
VOCAB = 50


def resized_pair(root: Path, tie: bool = False) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32, tie_word_embeddings=tie)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(root / "base")
    tuned = LlamaForCausalLM.from_pretrained(root / "base").eval()
    tuned.resize_token_embeddings(VOCAB + ADDED)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        emb = tuned.model.embed_tokens.weight
        for i in TRAINED_ROWS:
            emb[i] += 0.1 * torch.randn(16, generator=gen)
        emb[VOCAB:] = 0.02 * torch.randn(ADDED, 16, generator=gen)
        if not tie:
            tuned.lm_head.weight[VOCAB:] = 0.02 * torch.randn(ADDED, 16, generator=gen)
        q = tuned.model.layers[0].self_attn.q_proj.weight
        q += 0.05 * torch.randn(16, 2, generator=gen) @ torch.randn(2, 16, generator=gen)  # (16, 2) @ (2, 16)
    tuned.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


def tuned_model(tuned: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tuned).eval()


def token_ids() -> torch.Tensor:
    """Every trained and added token, and two untouched ones."""
    return torch.tensor([[VOCAB, *TRAINED_ROWS[:2], VOCAB + 1, *TRAINED_ROWS[2:], VOCAB + 2, 1, 2]])
