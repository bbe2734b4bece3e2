"""``lorasurg.io.meta_facts``: module order and bias flags, found by building the model on the meta device."""

from __future__ import annotations

from pathlib import Path

from lorasurg.io.meta_facts import bias_flags, module_order
import pytest

from lorasurg.io.architecture import SHAPE_DESCRIBABLE_MODEL_TYPES
from lorasurg.io.checkpoint import Checkpoint

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def _flags(arch: str, config=...):
    with Checkpoint.open(FIXTURES / f"tiny-{arch}" / "base") as ckpt:
        shapes = {n: ckpt.shape(n) for n in ckpt.names()}
        return bias_flags(ckpt.config if config is ... else config, shapes)


def test_llama_attention_and_mlp_bias():
    flags = _flags("llama")
    assert set(flags) == {"attention_bias", "mlp_bias"}
    assert flags["attention_bias"] == {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"}
    assert flags["mlp_bias"] == {f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up", "down")}


def test_architectures_without_such_flags_and_no_config():
    assert _flags("qwen2") == {}  # o_proj and MLP are built without a bias whatever the config says
    assert _flags("gpt2") == {}
    assert _flags("llama", config=None) == {}
    assert _flags("llama", config={"architectures": ["NoSuchModel"], "model_type": "llama"}) == {}


def test_module_order_is_named_modules_order_not_file_order():
    with Checkpoint.open(FIXTURES / "tiny-llama" / "base") as ckpt:
        shapes = {n: ckpt.shape(n) for n in ckpt.names()}
        names = [n[: -len(".weight")] for n in ckpt.names() if n.startswith("model.layers.0.") and n.endswith("proj.weight")]
        assert names[0] == "model.layers.0.mlp.down_proj"  # safetensors stores names sorted
        order = module_order(ckpt.config, shapes, names)
    assert order == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + [
        f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]


def test_module_order_without_a_model_class_is_natural():
    names = ["layers.10.q", "layers.2.q", "layers.2.k", "embed"]
    assert module_order(None, {}, names) == ["embed", "layers.2.k", "layers.2.q", "layers.10.q"]


def _meta_order(model_type: str, tied: bool):
    """(config dict, shapes, module names with a weight in named_modules order) of a tiny model of ``model_type``."""
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    tiny = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64, head_dim=8, max_position_embeddings=64, pad_token_id=0)
    config = transformers.AutoConfig.for_model(model_type, **tiny, tie_word_embeddings=tied)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    order = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    return config.to_dict(), shapes, order


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("model_type", sorted(SHAPE_DESCRIBABLE_MODEL_TYPES))
def test_known_architectures_are_ordered_from_names_as_their_classes_order_them(model_type, tied, monkeypatch):
    import random

    from lorasurg.io import meta_facts

    config, shapes, order = _meta_order(model_type, tied)
    shuffled = list(order)
    random.Random(0).shuffle(shuffled)
    monkeypatch.setattr(meta_facts, "meta_model", lambda *a: pytest.fail("built the model for a known type"))
    assert module_order(config, shapes, shuffled) == order


def test_other_architectures_are_ordered_by_their_model_class():
    with Checkpoint.open(FIXTURES / "tiny-gpt2" / "base") as ckpt:
        shapes = {n: ckpt.shape(n) for n in ckpt.names()}
        names = ["transformer.h.1.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.0.attn.c_attn",
                 "transformer.wte", "transformer.h.1.attn.c_proj"]
        assert module_order(ckpt.config, shapes, names) == [
            "transformer.wte", "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj",
            "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc"]
