"""Trainable tokens and replicated layers offline, against PEFT 0.21.2 and transformers: extract of a fine-tune that
added 3 tokens and trained 5 rows, fuse of trainable tokens and of replicated layers, validate and inspect of both,
rerank and merge carrying tokens through."""

from __future__ import annotations

import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

from lorasurg import Adapter, extract_to_dir, fuse, inspect_adapter, merge_adapters, rerank, validate  # noqa: E402
from lorasurg.errors import UnsupportedError  # noqa: E402
from lorasurg.runtime import load_adapter  # noqa: E402
from tests.runtime.models import llama, perturb, token_input  # noqa: E402
from tests.surgery.resized import ADDED, VOCAB, resized_pair, token_ids, tuned_model  # noqa: E402

REPLICATION = dict(target_modules=["down_proj", "up_proj"], layer_replication=[[0, 1], [0, 2], [1, 2]])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _causal_lm(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_extract_of_added_tokens_loads_in_peft_with_the_tuned_outputs(tmp_path, tie):
    """TUNED added 3 tokens and trained 5 rows (and one q_proj): the extracted trainable tokens, loaded by PEFT into
    BASE resized to TUNED's vocabulary, give TUNED's outputs on those tokens; lorasurg's runtime and fuse too."""
    base, tuned = resized_pair(tmp_path, tie=tie)
    extract_to_dir(base, tuned, tmp_path / "adapter", r=4)
    x = token_ids()
    with torch.no_grad():
        expected = tuned_model(tuned)(x).logits
        model = _causal_lm(base)
        model.resize_token_embeddings(VOCAB + ADDED)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()
        assert _rel(theirs(x).logits, expected) < 1e-5
        ours = _causal_lm(base)
        ours.resize_token_embeddings(VOCAB + ADDED)
        load_adapter(ours, str(tmp_path / "adapter"))
        assert _rel(ours(x).logits, expected) < 1e-5
        report = fuse(base, tmp_path / "adapter", tmp_path / "fused")
        assert report.config_updates["vocab_size"] == VOCAB + ADDED
        assert _rel(_causal_lm(tmp_path / "fused")(x).logits, expected) < 1e-5
    assert [f.code for f in validate(tmp_path / "adapter", base)] == ["tokens-need-resize"] * (1 if tie else 2)
    assert validate(tmp_path / "adapter", tuned) == []


def _peft_saved(tmp_path, config: dict, base_factory=llama):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base_factory(), peft.LoraConfig(init_lora_weights=False, **config)).eval()
    perturb(model)
    base = base_factory()
    base.save_pretrained(tmp_path / "base")
    model.save_pretrained(str(tmp_path / "adapter"))
    return model


@pytest.mark.parametrize("layer_map, sources", [([[0, 1], [0, 2], [1, 2]], [0, 0, 1, 1]), ([[1, 2]], [1])])
def test_replicated_layers_fuse_into_a_checkpoint_transformers_loads_with_the_adapted_outputs(tmp_path, layer_map,
                                                                                              sources):
    """The second map leaves layer 0 out: layer 0 of the fused model is BASE's layer 1."""
    theirs = _peft_saved(tmp_path, dict(REPLICATION, layer_replication=layer_map))
    assert validate(tmp_path / "adapter", tmp_path / "base") == []
    report = inspect_adapter(tmp_path / "adapter", base=tmp_path / "base")
    assert report.replication == dict(map=layer_map, stack="model.layers", layers=len(sources), sources=sources)
    fused = fuse(tmp_path / "base", tmp_path / "adapter", tmp_path / "fused")
    assert fused.config_updates["num_hidden_layers"] == len(sources)
    x = token_input()
    with torch.no_grad():
        model = _causal_lm(tmp_path / "fused")
        assert len(model.model.layers) == len(sources)
        assert _rel(model(x).logits, theirs(x).logits) < 1e-5


def test_a_replication_map_past_the_base_is_refused_by_name(tmp_path):
    _peft_saved(tmp_path, REPLICATION)
    bad = Adapter.load(tmp_path / "adapter")
    bad.config.layer_replication = [[0, 1], [1, 3]]
    from lorasurg.errors import InputError

    with pytest.raises(InputError, match=r"\[1, 3\) is not a range of the model's 2 layers"):
        fuse(tmp_path / "base", bad, tmp_path / "fused")
    assert not (tmp_path / "fused").exists()


def test_a_new_lora_bias_beside_replicated_layers_is_refused_by_name(tmp_path):
    _peft_saved(tmp_path, dict(REPLICATION, lora_bias=True))  # no MLP bias in Llama: 2 x 4 copies need one
    with pytest.raises(UnsupportedError, match=r"lora_B bias on 8 layer\(s\).*replicates layers"):
        fuse(tmp_path / "base", tmp_path / "adapter", tmp_path / "fused")
    assert not (tmp_path / "fused").exists()


@pytest.mark.parametrize("tie", [True, False])
def test_peft_trainable_tokens_fuse_with_the_adapted_outputs(tmp_path, tie):
    config = dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 3, 5], "lm_head": [2, 3]})
    theirs = _peft_saved(tmp_path, config, lambda: llama(tie=tie))
    assert validate(tmp_path / "adapter", tmp_path / "base") == []
    report = fuse(tmp_path / "base", tmp_path / "adapter", tmp_path / "fused")
    x = token_input()
    with torch.no_grad():
        model = _causal_lm(tmp_path / "fused")
        assert _rel(model(x).logits, theirs(x).logits) < 1e-5
    assert report.config_updates.get("tie_word_embeddings") is (False if tie else None)  # other rows: untied


def test_rerank_and_merge_carry_trainable_tokens_to_peft(tmp_path):
    theirs = _peft_saved(tmp_path, dict(target_modules=["q_proj", "v_proj"], trainable_token_indices=[1, 3, 5]))
    reranked, _ = rerank(tmp_path / "adapter", r=2)
    merged, _ = merge_adapters([tmp_path / "adapter", tmp_path / "adapter"], [0.5, 0.5], method="svd")
    rows = Adapter.load(tmp_path / "adapter").token_rows()
    for result in (reranked, merged):
        assert result.config.trainable_token_indices == [1, 3, 5] or result.config.trainable_token_indices == {
            "model.embed_tokens": [1, 3, 5]}
        assert torch.equal(result.token_rows()["model.embed_tokens"], rows["model.embed_tokens"])
    merged.save(tmp_path / "merged")
    x = token_input()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "merged")).eval()
        assert _rel(loaded(x).logits, theirs(x).logits) < 1e-5  # the same delta (svd of twice the half) and rows


def test_grouped_convolution_lora_is_refused_offline_by_name(tmp_path):
    from tests.parity.peft_models import Conv2dGroups, build

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(build(Conv2dGroups), peft.LoraConfig(target_modules=["conv2d"],
                                                                          init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(UnsupportedError, match=r"grouped convolutions \(conv2d\).*cannot be re-ranked"):
        rerank(tmp_path / "adapter", r=4)
    assert inspect_adapter(tmp_path / "adapter").problems == []
