"""Injection from a config and model-level adapter control (no PEFT needed)."""

from __future__ import annotations

import math

import pytest
import torch

from lorasurg.errors import ConfigError, UnsupportedError
from lorasurg.runtime import (
    delete_adapter,
    disable_adapters,
    inject,
    merge_adapter,
    merge_and_unload,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge_adapter,
)
from lorasurg.runtime.base import LoraLayer
from lorasurg.runtime.modules_to_save import ModulesToSave
from tests.conftest import tol
from tests.runtime.models import llama, make_config, net, net_input, output, perturb, token_input

ALL_NET = ["emb", "conv1", "conv2", "conv3", "point", "lin", "nobias"]


def _wrapped(model) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_default_init_is_a_no_op_and_only_lora_trains():
    base, model = net(), inject(net(), make_config(r=2, target_modules=ALL_NET))
    x = net_input()
    torch.testing.assert_close(output(model, x), output(base, x))
    assert set(_wrapped(model)) == set(ALL_NET)
    assert _trainable(model) and all(".lora_" in n for n in _trainable(model))


def test_gaussian_and_false_inits():
    gauss = inject(net(), make_config(r=4, target_modules=["lin"], init_lora_weights="gaussian"))
    A = gauss.lin.lora_A["default"].weight
    assert torch.all(gauss.lin.lora_B["default"].weight == 0) and A.std() < 0.5
    rand = inject(net(), make_config(r=4, target_modules=["lin", "emb"], init_lora_weights=False))
    x = net_input()
    assert not torch.allclose(output(rand, x), output(net(), x))


@pytest.mark.parametrize("rslora", [False, True])
def test_scale_from_rank_alpha_and_patterns(rslora):
    cfg = make_config(r=4, lora_alpha=8, target_modules=["lin", "nobias", "conv1"], use_rslora=rslora,
                      rank_pattern={"conv1": 2}, alpha_pattern={"nobias": 3})
    layers = _wrapped(inject(net(), cfg))
    scale = (lambda a, r: a / math.sqrt(r)) if rslora else (lambda a, r: a / r)
    assert layers["lin"].scaling["default"] == pytest.approx(scale(8, 4))
    assert layers["nobias"].scaling["default"] == pytest.approx(scale(3, 4))
    assert layers["conv1"].r["default"] == 2 and layers["conv1"].scaling["default"] == pytest.approx(scale(8, 2))
    assert layers["conv1"].lora_A["default"].weight.shape == (2, 8, 3)


def test_layers_to_transform_and_exclude_modules():
    model = inject(llama(), make_config(target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                        layers_pattern="layers"))
    assert set(_wrapped(model)) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    model = inject(llama(), make_config(target_modules="all-linear", exclude_modules=["down_proj", "o_proj"]))
    names = set(_wrapped(model))
    assert "model.layers.0.mlp.up_proj" in names and "lm_head" not in names
    assert not any(n.endswith(("down_proj", "o_proj")) for n in names)


def test_modules_to_save_trains_a_copy():
    model = inject(net(), make_config(r=2, target_modules=["lin"], modules_to_save=["head"]))
    assert isinstance(model.head, ModulesToSave)
    assert {n for n in _trainable(model) if "head" in n} == {"head.modules_to_save.default.weight",
                                                            "head.modules_to_save.default.bias"}
    x = net_input()
    before = output(model, x)
    with torch.no_grad():
        model.head.modules_to_save["default"].bias.add_(1.0)
    torch.testing.assert_close(output(model, x), before + 1.0)
    assert model.head.weight is model.head.modules_to_save["default"].weight  # attributes follow the copy


@pytest.mark.parametrize("bias,expected", [
    ("none", set()),
    ("lora_only", {"lin.base_layer.bias", "conv1.base_layer.bias"}),
    ("all", {"lin.base_layer.bias", "conv1.base_layer.bias", "conv3.bias", "point.bias", "head.bias"}),
])
def test_bias_option_trains_the_right_biases(bias, expected):
    model = inject(net(), make_config(r=2, target_modules=["lin", "conv1", "nobias"], bias=bias))
    assert {n for n in _trainable(model) if ".lora_" not in n} == expected


def test_inference_mode_freezes_everything():
    model = inject(net(), make_config(r=2, target_modules=["lin"], inference_mode=True))
    assert trainable_parameters(model).trainable == 0


def test_trainable_parameters_counts_and_prints_like_peft():
    model = inject(net(), make_config(r=2, target_modules=["lin"]))
    count = trainable_parameters(model)
    assert count.trainable == 2 * 3 + 5 * 2
    assert count.total == sum(p.numel() for p in net().parameters()) + count.trainable
    assert str(count).startswith("trainable params: 16 || all params: ")


def test_several_adapters_set_disable_delete():
    x = net_input()
    base_out = output(net(), x)
    model = inject(net(), make_config(r=2, target_modules=["lin", "emb"], init_lora_weights=False))
    out_a = output(model, x)
    inject(model, make_config(r=4, target_modules=["lin", "conv2"], init_lora_weights=False), "b")
    torch.testing.assert_close(output(model, x), out_a)  # a new adapter is added inactive
    assert all(".b." not in n for n in _trainable(model))
    set_adapter(model, "b")
    out_b = output(model, x)
    assert not torch.allclose(out_b, out_a)
    assert _trainable(model) and all(".b." in n for n in _trainable(model))
    with disable_adapters(model):
        torch.testing.assert_close(output(model, x), base_out)
        assert not _trainable(model)
    torch.testing.assert_close(output(model, x), out_b)
    delete_adapter(model, "b")
    assert "conv2" not in _wrapped(model)  # a wrapper left with no adapter gives its layer back
    torch.testing.assert_close(output(model, x), out_a)  # the remaining adapter became active
    delete_adapter(model, "default")
    assert set(model.state_dict()) == set(net().state_dict())


def test_disable_adapters_unmerges_and_merges_back():
    model = inject(net(), make_config(r=2, target_modules=ALL_NET, init_lora_weights=False, use_dora=True))
    x = net_input()
    expected = output(model, x)
    merge_adapter(model)
    with disable_adapters(model):
        torch.testing.assert_close(model.lin.base_layer.weight, net().lin.weight, **tol(torch.float32))
    assert model.lin.merged
    torch.testing.assert_close(output(model, x), expected, **tol(torch.float32))
    unmerge_adapter(model)
    assert not model.lin.merged


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs(use_dora):
    targets = ALL_NET if use_dora else ALL_NET[1:]  # lora_bias excludes the embedding
    cfg = make_config(r=2, target_modules=targets, init_lora_weights=False, use_dora=use_dora,
                      lora_bias=not use_dora, modules_to_save=["head"])
    model = inject(net(), cfg)
    perturb(model)
    x = net_input()
    expected = output(model, x)
    merged = merge_and_unload(model)
    assert not _wrapped(merged) and not isinstance(merged.head, ModulesToSave)
    torch.testing.assert_close(output(merged, x), expected, **tol(torch.float32))
    keys = set(net().state_dict())
    assert set(merged.state_dict()) == keys | ({"nobias.bias", "conv2.bias"} if not use_dora else set())


def test_unload_gives_back_the_base_model():
    model = inject(net(), make_config(r=2, target_modules=ALL_NET, init_lora_weights=False, modules_to_save=["head"]))
    perturb(model)
    merge_adapter(model)
    plain = unload(model)
    reference = net()
    assert plain.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value, **tol(torch.float32))


def test_transformers_model_runs_with_lora_on_every_linear_and_the_embedding():
    model = inject(llama(), make_config(r=2, target_modules="all-linear", init_lora_weights=False))
    inject(model, make_config(r=2, target_modules=["embed_tokens"], init_lora_weights=False), "emb")
    set_adapter(model, "emb")
    out = output(model, token_input())
    assert out.shape == (2, 6, 50) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------- bad input
def test_injecting_twice_under_one_name_is_refused():
    model = inject(net(), make_config(target_modules=["lin"]))
    with pytest.raises(ConfigError, match="'default' is already injected.*delete_adapter"):
        inject(model, make_config(target_modules=["nobias"]))


def test_unknown_adapter_name():
    model = inject(net(), make_config(target_modules=["lin"]), "first")
    for call in (lambda: set_adapter(model, "frist"), lambda: delete_adapter(model, "other")):
        with pytest.raises(ConfigError, match=r"unknown adapter .*adapters \['first'\]"):
            call()
    with pytest.raises(ConfigError, match="did you mean 'first'"):
        set_adapter(model, "frist")


def test_target_modules_matching_nothing_lists_nearest_names():
    with pytest.raises(ConfigError, match="q_projj") as err:
        inject(llama(), make_config(target_modules=["q_projj"]))
    assert "q_proj" in str(err.value).replace("q_projj", "")


def test_unsupported_settings_are_refused_before_anything_changes():
    model = net()
    for kwargs, word in ((dict(init_lora_weights="eva"), "eva"), (dict(use_qalora=True), "use_qalora"),
                         (dict(init_lora_weights="lora_ga"), "lora_ga")):
        with pytest.raises(UnsupportedError, match=word):
            inject(model, make_config(target_modules=["lin"], **kwargs))
    with pytest.raises(UnsupportedError, match="emb: lora_bias on an embedding"):
        inject(model, make_config(target_modules=["emb", "lin"], lora_bias=True))
    assert not _wrapped(model) and trainable_parameters(model).trainable == trainable_parameters(net()).trainable
