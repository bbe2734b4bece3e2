"""Saving and loading injected adapters; every bad adapter is refused before the model changes."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lorasurg.errors import ConfigError, InputError, OutputExistsError, ShapeMismatchError
from lorasurg.runtime import inject, load_adapter, save_adapter, trainable_parameters
from lorasurg.runtime.base import LoraLayer
from tests.conftest import tol
from tests.runtime.models import Net, gpt2, make_config, net, net_input, output, perturb

ALL_NET = ["emb", "conv1", "conv2", "conv3", "point", "lin", "nobias"]


def _saved(tmp_path, name="saved", **cfg):
    model = inject(net(), make_config(**{"r": 2, "target_modules": ALL_NET, "init_lora_weights": False, **cfg}))
    perturb(model)
    save_adapter(model, str(tmp_path / name))
    return model, tmp_path / name


@pytest.mark.parametrize("cfg", [
    dict(),
    dict(use_dora=True, modules_to_save=["head"]),
    dict(target_modules=ALL_NET[1:], lora_bias=True, bias="all", rank_pattern={"conv2": 3}),
])
def test_save_then_load_reproduces_the_model(tmp_path, cfg):
    model, path = _saved(tmp_path, **cfg)
    loaded = load_adapter(net(), str(path))
    x = net_input()
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():  # lossless: every tensor bit for bit
        assert torch.equal(loaded.state_dict()[key], value), key
    # the same weights in the same modules; the forward's kernels may round differently by memory layout
    torch.testing.assert_close(output(loaded, x), output(model, x), **tol(torch.float32))
    assert trainable_parameters(loaded).trainable == 0  # loaded for inference, like PEFT's from_pretrained
    trainable = load_adapter(net(), str(path), trainable=True)
    assert trainable_parameters(trainable).trainable == trainable_parameters(model).trainable


def test_saved_config_is_marked_for_inference_and_keeps_fields(tmp_path):
    _, path = _saved(tmp_path, rank_pattern={"conv2": 3}, lora_alpha=5)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["inference_mode"] is True and config["rank_pattern"] == {"conv2": 3} and config["lora_alpha"] == 5


def test_second_adapter_is_saved_alone(tmp_path):
    model, _ = _saved(tmp_path)
    inject(model, make_config(r=3, target_modules=["lin"], init_lora_weights=False), "other")
    save_adapter(model, str(tmp_path / "other"), "other")
    loaded = load_adapter(net(), str(tmp_path / "other"), "x")
    layers = [n for n, m in loaded.named_modules() if isinstance(m, LoraLayer)]
    assert layers == ["lin"] and loaded.lin.r == {"x": 3}
    torch.testing.assert_close(loaded.lin.lora_A["x"].weight, model.lin.lora_A["other"].weight)


def test_save_refuses_a_non_empty_directory_and_an_unknown_adapter(tmp_path):
    model, path = _saved(tmp_path)
    with pytest.raises(OutputExistsError):
        save_adapter(model, str(path))
    save_adapter(model, str(path), force=True)
    with pytest.raises(ConfigError, match="unknown adapter 'nope'"):
        save_adapter(model, str(tmp_path / "x"), "nope")


def test_a_pissa_adapter_decomposes_the_original_base_unless_it_is_residual(tmp_path):
    """PEFT's default: the init the config names runs on the base before the tensors are loaded."""
    _, path = _saved(tmp_path, target_modules=["lin"])
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    model = net()
    weight = model.lin.weight.clone()
    load_adapter(model, str(path))
    assert not torch.equal(model.lin.base_layer.weight, weight)  # the residual of its rank-2 PiSSA part
    residual = net()
    load_adapter(residual, str(path), base_is_residual=True)
    assert torch.equal(residual.lin.base_layer.weight, weight)
    assert torch.equal(residual.lin.lora_A["default"].weight, model.lin.lora_A["default"].weight)


# ------------------------------------------------------------------------------------------------- bad input
def _unchanged(model: nn.Module) -> bool:
    no_wrapper = not any(isinstance(m, LoraLayer) for m in model.modules())
    return no_wrapper and all(p.requires_grad for p in model.parameters())


def test_adapter_whose_shapes_do_not_fit(tmp_path):
    _, path = _saved(tmp_path, target_modules=["lin", "conv1"])
    torch.manual_seed(0)
    other = Net(dim=12)  # conv1 sees 12 input channels instead of 8
    with pytest.raises(ShapeMismatchError) as err:
        load_adapter(other, str(path))
    message = str(err.value)
    assert "conv1" in message and "(2, 8, 3)" in message and "(2, 12, 3)" in message and "lin" not in message
    assert _unchanged(other)


def test_adapter_for_another_architecture(tmp_path):
    _, path = _saved(tmp_path, target_modules=["lin", "conv1"])
    model = gpt2()
    with pytest.raises((InputError, ConfigError)) as err:
        load_adapter(model, str(path))
    assert "lin" in str(err.value) or "conv1" in str(err.value)
    assert _unchanged(model)


def test_adapter_modules_missing_from_the_model_are_named(tmp_path):
    _, path = _saved(tmp_path, target_modules=["lin", "conv1"])
    model = net()
    model.conv1 = nn.Identity()  # same names otherwise: the adapter's conv1 has nowhere to go
    model.lin2 = model.lin
    del model.lin
    with pytest.raises(InputError, match=r"not in the model.*'lin'.*nearest model modules: \['lin2'\]\); "
                                         r"modules of another kind: conv1 \(adapter: conv1d LoRA, model: Identity\)"):
        load_adapter(model, str(path))
    assert _unchanged(model)


def test_adapter_with_extra_tensors_the_model_lacks_is_rolled_back(tmp_path):
    _, path = _saved(tmp_path, target_modules=["lin"], modules_to_save=["head"])
    model = net()
    model.head = nn.Linear(5, 4)  # the saved head has 2 outputs
    with pytest.raises(InputError, match=r"head\.weight \(2, 5\) \(model: \(4, 5\)\)"):
        load_adapter(model, str(path))
    assert _unchanged(model) and isinstance(model.head, nn.Linear)


def test_loading_twice_under_one_name_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    model = load_adapter(net(), str(path))
    with pytest.raises(ConfigError, match="already injected"):
        load_adapter(model, str(path))
    load_adapter(model, str(path), "second")
    assert model.lin.adapter_names == ["default", "second"]
