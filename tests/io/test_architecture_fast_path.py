"""The names-and-shapes description of known causal LMs equals the one from the model built on the meta device.

For every model type in SHAPE_DESCRIBABLE_MODEL_TYPES, a tiny causal LM (tied and untied where the type allows)
is saved with transformers; both descriptions of its checkpoint must agree on every module that has weights:
layer kind, fan_in_fan_out, weight shape and bias, and on the tied parameters and output layers; and on which
names are buffers, with the model's buffers (and their older per-layer names) added to the checkpoint as older
transformers versions wrote them.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lorasurg.io.architecture import (
    FAST_PATH_BUFFERS,
    LEGACY_BUFFERS,
    SHAPE_DESCRIBABLE_MODEL_TYPES,
    _from_model,
    describe_checkpoint,
    is_shape_describable,
    meta_model,
)
from lorasurg.io.checkpoint import Checkpoint

TINY = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=64, head_dim=8, max_position_embeddings=64, pad_token_id=0,
)


def _save_tiny(model_type: str, tied: bool, path) -> None:
    config = transformers.AutoConfig.for_model(model_type, **TINY, tie_word_embeddings=tied)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    cls = getattr(transformers, config.architectures[0])
    torch.manual_seed(0)
    cls(config).save_pretrained(path)


def _weights_view(description):
    return {
        name: (info.kind, info.fan_in_fan_out, info.weight_shape, info.has_bias)
        for name, info in description.modules.items()
        if info.weight_shape is not None
    }


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("model_type", sorted(SHAPE_DESCRIBABLE_MODEL_TYPES))
def test_fast_description_equals_meta_model(tmp_path, model_type, tied):
    _save_tiny(model_type, tied, tmp_path)
    with Checkpoint.open(tmp_path) as ckpt:
        shapes = {name: ckpt.shape(name) for name in ckpt.names()}
        config = ckpt.config
    assert is_shape_describable(config)
    fast = describe_checkpoint(shapes, config)
    assert fast.source == "names and shapes (known architecture)"
    full = _from_model(meta_model(config), shapes, None)
    assert _weights_view(fast) == _weights_view(full)
    assert fast.tied == full.tied
    assert fast.output_layers == full.output_layers
    # the rule for a config that leaves tie_word_embeddings out (transformers omits class defaults)
    config = {k: v for k, v in config.items() if k != "tie_word_embeddings"}
    assert describe_checkpoint(shapes, config).tied == full.tied


@pytest.mark.parametrize("model_type", sorted(SHAPE_DESCRIBABLE_MODEL_TYPES))
def test_fast_path_knows_the_buffers_of_the_meta_model(tmp_path, model_type):
    _save_tiny(model_type, False, tmp_path)
    with Checkpoint.open(tmp_path) as ckpt:
        shapes = {name: ckpt.shape(name) for name in ckpt.names()}
        config = ckpt.config
    model = meta_model(config)
    buffers = [name for name, _ in model.named_buffers()]  # persistent and non-persistent
    tails = {".".join(name.split(".")[-2:]) for name in buffers}
    assert buffers and tails == FAST_PATH_BUFFERS[model_type]
    per_layer = [f"model.layers.{i}.self_attn.{tail}" for i in range(2) for tail in tails if "rotary" in tail]
    old = {**shapes, **{name: (4,) for name in buffers + per_layer}}  # as older transformers versions saved it
    fast, full = describe_checkpoint(old, config), _from_model(model, old, None)
    verdict = {name: name in full.buffers for name in old}
    assert {name: name in fast.buffers for name in old} == verdict
    assert {name for name, is_buffer in verdict.items() if is_buffer} == set(buffers) | set(per_layer)
    assert _weights_view(fast) == _weights_view(full)  # buffers are not modules
    assert "model.layers.0.self_attn.q_proj.weight" not in fast.buffers


@pytest.mark.parametrize("model_type, buffers", sorted(LEGACY_BUFFERS.items()))
def test_legacy_buffers_are_not_parameters_of_the_current_model(model_type, buffers):
    """Each legacy suffix names no parameter of today's causal LM of that type (tiny config, meta device)."""
    config = transformers.AutoConfig.for_model(model_type, n_embd=32, n_layer=2, n_head=4, hidden_size=32,
                                               num_hidden_layers=2, num_attention_heads=4, num_layers=2,
                                               num_heads=4, intermediate_size=48, vocab_size=64, rotary_dim=4,
                                               attention_types=[[["global", "local"], 1]])
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    model = meta_model(config.to_dict())
    parameters = [name for name, _ in model.named_parameters()]
    assert not [p for p in parameters for s in buffers if p == s or p.endswith("." + s)]
    description = _from_model(model, {p: (1,) for p in parameters}, None)
    assert not [p for p in parameters if p in description.buffers]
    layer = "transformer.h.0" if model_type != "gpt_neox" else "gpt_neox.layers.0"
    module = {"gpt2": "attn", "gptj": "attn", "gpt_neo": "attn.attention", "gpt_neox": "attention"}[model_type]
    assert f"{layer}.{module}.masked_bias" in description.buffers


def test_other_architectures_and_tasks_use_the_model(tmp_path):
    assert not is_shape_describable({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    assert not is_shape_describable({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]})
    _save_tiny("llama", False, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    with Checkpoint.open(tmp_path) as ckpt:
        shapes = {name: ckpt.shape(name) for name in ckpt.names()}
    assert describe_checkpoint(shapes, config, task_type="SEQ_CLS").source.startswith("architecture:")
