"""Which checkpoint tensors are buffers (not weights): Checkpoint.is_buffer / buffer_names on the buffer fixtures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lorasurg.io.checkpoint import Checkpoint

BUFFERS = Path(__file__).resolve().parents[2] / "fixtures" / "buffers"


@pytest.mark.parametrize("name, side, expected", [
    ("bert", "base", ["embeddings.position_ids"]),
    ("bert", "tuned", []),
    ("llama", "base", ["model.rotary_emb.inv_freq"]),
    ("llama", "tuned", ["model.layers.0.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq"]),
    ("gpt2", "base", ["transformer.h.0.attn.bias", "transformer.h.0.attn.masked_bias"]),
    ("gpt2", "tuned", []),
])
def test_buffer_names_of_the_fixtures(name, side, expected):
    with Checkpoint.open(BUFFERS / name / side) as ckpt:
        assert sorted(ckpt.buffer_names()) == sorted(expected)
        assert not [n for n in ckpt.names() if n.endswith(".weight") and ckpt.is_buffer(n)]


def test_a_name_the_checkpoint_lacks_is_still_known(tmp_path):
    """The tuned side of a pair is asked about the base side's buffers (BERT: meta model; Llama: fast path)."""
    with Checkpoint.open(BUFFERS / "bert" / "tuned") as bert, Checkpoint.open(BUFFERS / "llama" / "base") as llama, \
            Checkpoint.open(BUFFERS / "gpt2" / "tuned") as gpt2:
        assert bert.is_buffer("embeddings.position_ids") and bert.is_buffer("embeddings.token_type_ids")
        assert not bert.is_buffer("embeddings.position_embeddings.weight")
        assert llama.describe().source == "names and shapes (known architecture)"
        assert llama.is_buffer("model.layers.0.self_attn.rotary_emb.inv_freq")
        assert not llama.is_buffer("model.layers.0.self_attn.q_proj.weight")
        assert gpt2.is_buffer("transformer.h.0.attn.masked_bias") and gpt2.is_buffer("transformer.h.0.attn.bias")
        assert not gpt2.is_buffer("transformer.h.0.attn.c_attn.bias")  # a parameter, whose name ends alike


def test_without_a_config_no_name_is_a_buffer(tmp_path):
    shutil.copy(BUFFERS / "bert" / "base" / "model.safetensors", tmp_path / "model.safetensors")
    with Checkpoint.open(tmp_path) as ckpt:
        assert ckpt.config is None
        assert ckpt.buffer_names() == [] and not ckpt.is_buffer("embeddings.position_ids")
