"""``lorasurg.io.meta_facts``: module order and bias flags, found by building the model on the meta device."""

from __future__ import annotations

from pathlib import Path

from lorasurg.io.meta_facts import bias_flags, module_order
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
