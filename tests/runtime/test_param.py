"""LoRA on nn.Parameters (``target_parameters``): the engine's layout math, the wrappers, and every refusal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorasurg.engine.param_factors import param_adapted, param_delta, param_layout, param_merged, param_unmerged
from lorasurg.errors import ConfigError, ShapeMismatchError, UnsupportedError
from lorasurg.runtime import delete_adapter, inject, load_adapter, merge_adapter, save_adapter, unload
from lorasurg.runtime.param import LoraParameter
from tests.conftest import assert_close_ulps, tol
from tests.runtime.models import make_config
from tests.runtime.param_models import mlp, mlp_input, mlp_params, qwen3_moe, token_input


# ------------------------------------------------------------------------------------------------------- engine
def _factors(gen, E: int, r: int, inp: int, out: int, dtype=torch.float64):
    return torch.randn(r * E, inp, generator=gen, dtype=dtype), torch.randn(out, r * E, generator=gen, dtype=dtype)


@pytest.mark.parametrize("shape,transposed,E,inp,out", [
    ((5, 7), False, 1, 7, 5), ((5, 7), True, 1, 7, 5),  # 2-D: (out, in), is_transposed ignored (as PEFT)
    ((3, 5, 7), False, 3, 7, 5), ((3, 7, 5), True, 3, 7, 5),
])
def test_layout_and_delta_follow_the_per_expert_definition(gen, shape, transposed, E, inp, out):
    layout = param_layout(shape, transposed)
    assert (layout.experts, layout.in_features, layout.out_features) == (E, inp, out)
    r = 2
    A, B = _factors(gen, E, r, inp, out)
    delta = param_delta(A, B, 0.5, layout)
    assert delta.shape == shape
    for e in range(E):
        A_e = A[e * r:(e + 1) * r]  # rows e*r .. e*r + r - 1
        B_e = B[:, [k * E + e for k in range(r)]]  # columns k*E + e
        expected = 0.5 * B_e @ A_e
        got = delta if len(shape) == 2 else delta[e]
        torch.testing.assert_close(got.T if transposed and len(shape) == 3 else got, expected, **tol(torch.float64))


@pytest.mark.parametrize("shape,transposed", [((5, 7), False), ((3, 5, 7), False), ((3, 7, 5), True)])
def test_adapted_merged_and_unmerged_agree(gen, shape, transposed):
    layout = param_layout(shape, transposed)
    W = torch.randn(shape, generator=gen)
    A, B = _factors(gen, layout.experts, 2, layout.in_features, layout.out_features, torch.float32)
    A.requires_grad_(True)
    adapted = param_adapted(W, A, B, 0.7, layout)
    merged = param_merged(W, A.detach(), B, 0.7, layout)
    torch.testing.assert_close(adapted.detach(), merged, **tol(torch.float32))
    adapted.sum().backward()
    assert A.grad is not None and A.grad.abs().max() > 0
    restored = param_unmerged(merged, A.detach(), B, 0.7, layout)
    assert_close_ulps(restored, W, 8, magnitude=W.abs() + merged.abs())


def test_engine_refusals():
    with pytest.raises(UnsupportedError, match="1-D parameter.*only 2-D"):
        param_layout((4,))
    with pytest.raises(ShapeMismatchError, match=r"expected A \(r\*3, 7\)"):
        param_delta(torch.zeros(6, 5), torch.zeros(5, 6), 1.0, param_layout((3, 5, 7)))


# ------------------------------------------------------------------------------------------------------ runtime
MOE = dict(r=2, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"],
           init_lora_weights=False)


def test_two_parameters_of_one_module_nest_with_the_first_registered_innermost():
    model = inject(qwen3_moe(), make_config(**MOE))
    outer = model.model.layers[0].mlp.experts
    assert isinstance(outer, LoraParameter) and outer.parameter_name == "down_proj"
    assert isinstance(outer.base_layer, LoraParameter) and outer.base_layer.parameter_name == "gate_up_proj"
    assert outer.lora_A["default"].weight.shape == (2 * 4, 12) and outer.lora_B["default"].weight.shape == (32, 8)
    inner = outer.base_layer
    assert inner.lora_A["default"].weight.shape == (8, 32) and inner.lora_B["default"].weight.shape == (24, 8)
    assert outer.module is inner.module and outer.num_experts == 4  # attributes still reach the experts module
    assert isinstance(outer.module.gate_up_proj, nn.Parameter)  # outside a forward: the base parameter


def test_training_changes_only_the_lora_tensors_and_keeps_the_parameters():
    model = inject(qwen3_moe(), make_config(**MOE))
    model.train()
    x = token_input()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(x, labels=x).loss
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == changed
    assert all(isinstance(m._parameters["gate_up_proj"], nn.Parameter) for m in model.modules()
               if "gate_up_proj" in m._parameters)
    with torch.no_grad():
        assert model(x, labels=x).loss < loss


def test_delete_and_unload_give_the_original_modules_back():
    model = qwen3_moe()
    experts = model.model.layers[1].mlp.experts
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject(model, make_config(**MOE))
    delete_adapter(model, "default")
    assert model.model.layers[1].mlp.experts is experts
    inject(model, make_config(**MOE))
    merge_adapter(model)
    unload(model)
    assert model.model.layers[1].mlp.experts is experts
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("config,match", [
    (dict(target_parameters=["lin0.bias"]), "lin0.bias: LoRA on a 1-D parameter"),
    (dict(target_modules=["lin1"], target_parameters=["lin1.weight"]), "also targeted with target_modules"),
    (dict(target_parameters=["lin9.weight"]), "matches none of the model's parameters.*lin0.weight"),
    (dict(target_parameters=["lin0.weight"], lora_dropout=0.1, lora_bias=True), "lora_dropout.*\n.*lora_bias"),
])
def test_refusals_on_a_plain_model(config, match):
    model = mlp_params() if "lin1" not in str(config.get("target_modules")) else mlp()
    with pytest.raises((ConfigError, UnsupportedError), match=match):
        inject(model, make_config(**config))
    assert not any(isinstance(m, LoraParameter) for m in model.modules())


def test_a_parameter_of_the_top_level_module_is_refused():
    model = nn.Linear(3, 4)
    with pytest.raises(UnsupportedError, match="top-level module"):
        inject(model, make_config(target_parameters=["weight"]))


def test_a_module_with_parameters_in_its_submodules_is_refused():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3, 3))
            self.proj = nn.Linear(3, 3)

    model = nn.Sequential(Holder())
    with pytest.raises(UnsupportedError, match="0.scale: its module \\(Holder\\) has submodules with parameters"):
        inject(model, make_config(target_parameters=["scale"]))


def test_target_modules_none_on_a_transformers_model_is_refused_and_empty_works():
    with pytest.raises(ConfigError, match="target_modules=\\[\\]"):
        inject(qwen3_moe(), make_config(target_parameters=["experts.down_proj"]))
    inject(qwen3_moe(), make_config(target_modules=[], target_parameters=["experts.down_proj"]))
    inject(mlp_params(), make_config(target_parameters=["lin0.weight"]))  # not a transformers model: as PEFT


def test_base_mutating_inits_are_refused_on_3d_parameters():
    with pytest.raises(UnsupportedError, match="'pissa' is not possible on a 3-D parameter"):
        inject(qwen3_moe(), make_config(**{**MOE, "init_lora_weights": "pissa"}))


def test_a_wrapped_parameter_module_cannot_also_get_module_lora():
    model = inject(mlp(), make_config(target_parameters=["lin1.weight"]))
    with pytest.raises(UnsupportedError, match="lin1: its parameters carry LoRA of another adapter"):
        inject(model, make_config(target_modules=["lin1"]), "other")


def test_an_adapter_of_another_rank_is_refused_naming_the_parameter(tmp_path):
    model = inject(qwen3_moe(), make_config(**MOE))
    save_adapter(model, str(tmp_path))
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace('"r": 2', '"r": 3'))
    with pytest.raises(ShapeMismatchError, match=r"mlp.experts.base_layer \(LoRA on model.layers.0.mlp.experts."
                                                 r"gate_up_proj.*r=3\): lora_A is \(8, 32\)"):
        load_adapter(qwen3_moe(), str(tmp_path))


def test_a_2d_parameter_of_a_linear_gives_the_linear_lora():
    ours = inject(mlp(), make_config(target_parameters=["lin0.weight"], init_lora_weights=False))
    plain = inject(mlp(), make_config(target_modules=["lin0"], init_lora_weights=False))
    plain.load_state_dict(ours.state_dict())
    x = mlp_input()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), plain(x), **tol(torch.float32))
