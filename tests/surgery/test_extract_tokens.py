"""``extract --embeddings auto|tokens``: embedding layers whose rows changed, as trainable tokens or LoRA by size;
a resized vocabulary; the refusals, through the library and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lorasurg.cli import main
from lorasurg.errors import InputError
from lorasurg.io.checkpoint import Checkpoint
from lorasurg.surgery.extract import extract
from tests.surgery.resized import ADDED, TRAINED_ROWS, VOCAB, resized_pair

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LLAMA = (FIXTURES / "tiny-llama" / "base", FIXTURES / "tiny-llama" / "tuned")


def _choices(report) -> dict:
    return {c.tensor: c for c in report.embeddings}


def test_auto_takes_tokens_where_they_are_smaller_and_reports_both_sizes():
    """tiny Llama: 32 of 256 embedding rows changed (32 * 64 = 2048 numbers < r * (256 + 64) = 2560 at r=8), every
    lm_head row changed (LoRA smaller)."""
    adapter, report = extract(*LLAMA, r=8)
    emb, head = _choices(report)["model.embed_tokens.weight"], _choices(report)["lm_head.weight"]
    assert (emb.chosen, emb.changed, emb.tokens_bytes, emb.lora_bytes) == ("tokens", 32, 32 * 64 * 4, 8 * 320 * 4)
    assert (head.chosen, head.changed) == ("lora", 256) and head.lora_bytes < head.tokens_bytes
    assert "lm_head" in adapter.modules and "model.embed_tokens" not in adapter.modules
    tuned = Checkpoint.open(LLAMA[1]).get("model.embed_tokens.weight")
    assert torch.equal(adapter.token_rows()["model.embed_tokens"], tuned[16:48])  # the rows, exact
    text = report.render()
    assert "embedding layers" in text and "8.0 KiB" in text and "10.0 KiB" in text
    # at r=4 the LoRA (5 KiB) is smaller than the tokens (8 KiB): auto takes it
    _, small = extract(*LLAMA, r=4)
    assert _choices(small)["model.embed_tokens.weight"].chosen == "lora"


def test_tokens_mode_and_the_other_modes():
    adapter, report = extract(*LLAMA, r=4, embeddings="tokens")
    assert set(adapter.token_rows()) == {"model.embed_tokens", "lm_head"}
    assert adapter.config.trainable_token_indices["lm_head"] == list(range(256))
    lora, _ = extract(*LLAMA, r=4, embeddings="lora")
    assert lora.modules["model.embed_tokens"].embedding and not lora.token_rows()


@pytest.mark.parametrize("consumer", ["vllm", "llama.cpp"])
def test_a_consumer_that_cannot_read_tokens_gets_the_lora_or_the_drop(consumer):
    adapter, report = extract(*LLAMA, r=8, consumers=consumer)
    assert not adapter.token_rows()
    adapter, report = extract(*LLAMA, r=8, consumers=consumer, embeddings="tokens")
    assert not adapter.token_rows()
    emb = _choices(report)["model.embed_tokens.weight"]
    assert emb.chosen == "dropped" and emb.reason.startswith(f"--for {consumer}")


def test_a_resized_vocabulary_becomes_tokens_with_the_added_rows(tmp_path):
    base, tuned = resized_pair(tmp_path)
    adapter, report = extract(base, tuned, r=4)
    indices = adapter.config.trainable_token_indices
    assert indices["model.embed_tokens"] == [*TRAINED_ROWS, *range(VOCAB, VOCAB + ADDED)]
    assert indices["lm_head"] == list(range(VOCAB, VOCAB + ADDED))
    emb = _choices(report)["model.embed_tokens.weight"]
    assert (emb.changed, emb.added, emb.lora_bytes, emb.chosen) == (5, 3, None, "tokens")
    assert any(f"model.resize_token_embeddings({VOCAB + ADDED})" in n for n in report.notes)
    assert "model.layers.0.self_attn.q_proj" in adapter.modules and not adapter.problems()


def test_a_resized_vocabulary_is_refused_for_lora_by_name(tmp_path):
    base, tuned = resized_pair(tmp_path)
    with pytest.raises(InputError, match=r"(lm_head|model.embed_tokens).weight: TUNED has 53 rows, BASE 50 "
                                         r"\(3 added\).*"
                                         r"--embeddings tokens"):
        extract(base, tuned, r=4, embeddings="lora")
    result = CliRunner().invoke(main, ["extract", str(base), str(tuned), "--embeddings", "lora", "-o",
                                       str(tmp_path / "out")])
    assert result.exit_code == 2 and "resize_token_embeddings(53)" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_vocabulary_cannot_shrink(tmp_path):
    base, tuned = resized_pair(tmp_path)
    result = CliRunner().invoke(main, ["extract", str(tuned), str(base), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "TUNED has fewer rows" in result.output


def test_only_token_rows_changed_needs_allow_empty(tmp_path):
    from safetensors.torch import save_file

    emb = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    lin = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    tuned_emb = emb.clone()
    tuned_emb[3] += 1.0
    for side, e in (("b", emb), ("t", tuned_emb)):
        (tmp_path / side).mkdir()
        save_file({"embed_tokens.weight": e, "proj.weight": lin}, str(tmp_path / side / "model.safetensors"))
    with pytest.raises(InputError, match="only the rows of embed_tokens changed.*--allow-empty"):
        extract(tmp_path / "b", tmp_path / "t", r=2)
    adapter, report = extract(tmp_path / "b", tmp_path / "t", r=2, allow_empty=True)
    assert adapter.config.trainable_token_indices == {"embed_tokens": [3]}
    assert torch.count_nonzero(adapter.modules["proj"].B) == 0
