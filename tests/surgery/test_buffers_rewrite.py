"""``fuse`` and ``residualize`` on checkpoints that carry buffers: BASE's buffers come through as stored.

The pairs are fixtures/buffers/{bert,llama,gpt2} (fixtures/make.py, fixtures/README.md): BERT's
``embeddings.position_ids`` (int64) in base only; Llama's per-layer ``rotary_emb.inv_freq`` in tuned only and the
model-level one in both (float32 in base, bfloat16 in tuned); GPT-2's ``attn.bias`` (bool causal mask) and
``attn.masked_bias`` in base only. Either side may be the BASE of a command, and an adapter extracted from the pair
may be fused into either: a buffer present on one side only is never a refusal, and every buffer BASE holds is
written with its name, dtype, shape and bytes, also when ``dtype`` casts the weights (a bfloat16 ``inv_freq`` would
move the rotary frequencies, and a cast mask or position table means nothing).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorasurg import Adapter, extract_to_dir, fuse, residualize, validate
from lorasurg.io.checkpoint import Checkpoint

BUFFERS = Path(__file__).resolve().parents[2] / "fixtures" / "buffers"
PAIRS = ("bert", "llama", "gpt2")
SIDES = ("base", "tuned")
CASES = [(name, side, dtype) for name in PAIRS for side in SIDES for dtype in ("auto", "bfloat16")]


def test_the_fixtures_hold_buffers_on_one_side():
    """What the tests below are about (fixtures/README.md): buffers on one side only, and one in both that differs."""
    held = {}
    for name in PAIRS:
        for side in SIDES:
            with Checkpoint.open(BUFFERS / name / side) as ckpt:
                held[name, side] = set(ckpt.buffer_names())
    assert held["bert", "base"] == {"embeddings.position_ids"} and held["bert", "tuned"] == set()
    assert held["gpt2", "base"] == {"transformer.h.0.attn.bias", "transformer.h.0.attn.masked_bias"}
    assert held["gpt2", "tuned"] == set() and held["llama", "base"] < held["llama", "tuned"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """An adapter extracted from each pair (base -> tuned), buffers and all on its inputs."""
    root = tmp_path_factory.mktemp("buffer-adapters")
    for name in PAIRS:
        extract_to_dir(BUFFERS / name / "base", BUFFERS / name / "tuned", root / name, r=4, device="cpu")
    return {name: root / name for name in PAIRS}


def _assert_buffers_copied(base: Path, written: Path) -> list[str]:
    """Every buffer of ``base`` is in ``written``, bit for bit, and no other; returns their names."""
    with Checkpoint.open(base) as b, Checkpoint.open(written) as w:
        names = b.buffer_names()
        for name in names:
            assert name in w.names(), name
            stored, copied = b.get(name), w.get(name)
            assert copied.dtype == stored.dtype and copied.shape == stored.shape, name
            assert torch.equal(copied, stored), name
        assert [n for n in w.names() if w.is_buffer(n)] == names  # and no buffer of the other side is added
    return names


@pytest.mark.parametrize("name, side, dtype", CASES)
def test_fuse_copies_base_buffers(name, side, dtype, adapters, tmp_path):
    base = BUFFERS / name / side
    report = fuse(base, adapters[name], tmp_path / "fused", dtype=dtype, device="cpu")
    assert report.modules  # something was merged: this is not a plain copy
    _assert_buffers_copied(base, tmp_path / "fused")
    if dtype == "bfloat16":  # the weights were cast all the same
        with Checkpoint.open(tmp_path / "fused") as f:
            weights = [n for n in f.names() if n.endswith(".weight")]
            assert {f.dtype(n) for n in weights} == {torch.bfloat16}


@pytest.mark.parametrize("name, side, dtype", CASES)
def test_residualize_copies_base_buffers(name, side, dtype, tmp_path):
    base = BUFFERS / name / side
    residualize(base, tmp_path / "r", init="pissa", r=4, dtype=dtype, device="cpu")
    _assert_buffers_copied(base, tmp_path / "r" / "model")
    adapter = Adapter.load(tmp_path / "r" / "adapter")
    with Checkpoint.open(base) as b:
        buffers = b.buffer_names()
    assert adapter.modules and not [m for m in adapter.modules if any(x.startswith(m + ".") for x in buffers)]
    assert adapter.extra == {}  # no buffer saved whole either
    findings = validate(tmp_path / "r" / "adapter", tmp_path / "r" / "model")
    assert [f.code for f in findings] == []


def test_gpt2_attn_is_not_a_target(tmp_path):
    """GPT-2's ``transformer.h.0.attn`` holds the ``bias`` buffer (a bool mask) and ``masked_bias``, no weight: not a
    LoRA target of residualize's all-linear, and ``attn.bias`` is not read as a layer's bias."""
    report = residualize(BUFFERS / "gpt2" / "base", tmp_path / "g", init="olora", r=4, device="cpu")
    assert sorted(Adapter.load(tmp_path / "g" / "adapter").modules) == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj"]
    assert report.model is not None


def test_module_absent_from_base_is_not_a_target(tmp_path):
    """BERT's architecture has ``pooler.dense``; this BASE was saved without a pooler: residualize says so and
    leaves it out of the targets instead of failing on the missing weight."""
    report = residualize(BUFFERS / "bert" / "base", tmp_path / "b", init="pissa", r=4, device="cpu")
    assert "pooler.dense" not in Adapter.load(tmp_path / "b" / "adapter").modules
    assert [n for n in report.notes if "no weight in BASE" in n and "pooler.dense" in n]
