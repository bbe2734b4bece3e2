"""The runtime's trainable tokens, layer replication, grouped convolutions and nn.MultiheadAttention: their
refusals (each before the model changes) and their lifecycle (merge, unload, delete)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorasurg.errors import ConfigError, UnsupportedError
from lorasurg.runtime import delete_adapter, inject, merge_and_unload, unload
from lorasurg.runtime.tokens import TrainableTokens
from tests.parity.peft_models import Conv2dGroups, EmbConv1D, Mha, build, peft_input
from tests.runtime.models import llama, make_config, output, perturb, token_input

REPLICATION = dict(target_modules=["up_proj"], layer_replication=[[0, 2], [1, 2]])


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_second_adapter_reuses_the_replicated_stack_and_another_map_is_refused():
    model = inject(llama(), make_config(**REPLICATION))
    inject(model, make_config(**REPLICATION), "again")  # same map: the stack is not replicated twice
    assert len(model.model.layers) == 3 and set(model.model.layers[2].mlp.up_proj.r) == {"default", "again"}
    with pytest.raises(UnsupportedError, match=r"already replicated by layer_replication=\[\[0, 2\], \[1, 2\]\]"):
        inject(model, make_config(target_modules=["up_proj"], layer_replication=[[0, 1]]), "other")


def test_replication_refusals_name_what_is_wrong():
    with pytest.raises(ConfigError, match=r"\[1, 3\) is not a range of the model's 2 layers"):
        inject(llama(), make_config(target_modules=["up_proj"], layer_replication=[[0, 2], [1, 3]]))
    with pytest.raises(UnsupportedError, match="needs the model's stack of layers"):
        inject(build(EmbConv1D), make_config(target_modules=["lin0"], layer_replication=[[0, 1]]))


def test_attention_refusals():
    with pytest.raises(UnsupportedError, match=r"mha.out_proj: the out_proj of a MultiheadAttention.*target 'mha'"):
        inject(build(Mha), make_config(target_modules=["out_proj"]))
    with pytest.raises(UnsupportedError, match="DoRA on a MultiheadAttention"):
        inject(build(Mha), make_config(target_modules=["mha"], use_dora=True))
    with pytest.raises(UnsupportedError, match="kdim/vdim"):
        inject(nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4)), make_config(target_modules=["0"]))


def test_grouped_conv_refusals_say_what_works():
    with pytest.raises(ConfigError, match=r"multiple of its groups \(8, 16, 32, ...\).*'conv2d' \(Conv2d, groups=8\) "
                                          r"has rank 1"):
        inject(build(Conv2dGroups), make_config(target_modules=["conv2d"], r=1))
    assert isinstance(inject(build(Conv2dGroups), make_config(target_modules=["conv2d"], r=16)), nn.Module)
    with pytest.raises(UnsupportedError, match="init_lora_weights='pissa' on a grouped convolution"):
        inject(build(Conv2dGroups), make_config(target_modules=["conv2d"], init_lora_weights="pissa"))


def test_attention_merges_and_unloads_to_the_same_outputs():
    model = inject(build(Mha), make_config(target_modules=["mha", "lin0"], init_lora_weights=False))
    perturb(model)
    x = peft_input()
    with torch.no_grad():
        expected = output(model, x)
        merged = merge_and_unload(model)
        assert type(merged.mha) is nn.MultiheadAttention and type(merged.mha.out_proj) is not nn.Module
        torch.testing.assert_close(output(merged, x), expected, rtol=1e-5, atol=1e-6)
    model = inject(build(Mha), make_config(target_modules=["mha"], init_lora_weights=False))
    assert _same_state(unload(model), build(Mha))


def test_trainable_tokens_merge_unload_and_delete():
    model = inject(llama(tie=True), make_config(target_modules=["q_proj"], trainable_token_indices=[1, 3]))
    assert isinstance(model.lm_head, TrainableTokens) and model.lm_head.token_adapter.tied
    perturb(model)
    x = token_input()
    with torch.no_grad():
        expected = output(model, x)
        rows = model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].clone()
        merged = merge_and_unload(model)
        assert torch.equal(merged.model.embed_tokens.weight[[1, 3]], rows)
        assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still tied
        torch.testing.assert_close(output(merged, x), expected, rtol=1e-5, atol=1e-6)
    model = inject(llama(tie=True), make_config(target_modules=["q_proj"], trainable_token_indices=[1, 3]))
    perturb(model)
    assert _same_state(unload(model), llama(tie=True))
    model = inject(llama(), make_config(target_modules=["q_proj"], trainable_token_indices=[1, 3]))
    delete_adapter(model, "default")
    assert type(model.model.embed_tokens) is nn.Embedding
