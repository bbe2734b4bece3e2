"""The runtime's LoRA on nn.Parameters (``target_parameters``) against PEFT 0.21.2's ``lora.ParamWrapper``.

Cases: PEFT's own "MLP using nn.Parameter" test cases (``tests/test_custom_models.py``: ``MlpUsingParameters`` with
``target_parameters=["lin0.weight"]``; ``MLP`` with ``target_modules=["lin0"]`` and ``target_parameters=
["lin1.weight"]``) and its two-adapter cases ("LoRA targeting nn.Parameter Same" / "Different"), plus tiny
transformers-5 Qwen3-MoE, Mixtral and gpt-oss models with LoRA on the fused experts (3-D, gpt-oss transposed),
two nested wrappers per experts module, routers (2-D) and attention layers.
"""

from __future__ import annotations

import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

from lorasurg.errors import ConfigError  # noqa: E402
from lorasurg.runtime import (  # noqa: E402
    disable_adapters,
    inject,
    load_adapter,
    merge_adapter,
    merge_and_unload,
    save_adapter,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge_adapter,
)
from lorasurg.runtime.param import LoraParameter  # noqa: E402
from tests.conftest import assert_close_ulps  # noqa: E402
from tests.parity.test_runtime_parity import _rel_diff  # noqa: E402
from tests.runtime.models import make_config, output, perturb  # noqa: E402
from tests.runtime.param_models import gpt_oss, mixtral, mlp, mlp_input, mlp_params, qwen3_moe, token_input  # noqa: E402

PREFIX = "base_model.model."
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
MODELS = {"mlp_params": (mlp_params, mlp_input), "mlp": (mlp, mlp_input), "qwen3_moe": (qwen3_moe, token_input),
          "mixtral": (mixtral, token_input), "gpt_oss": (gpt_oss, token_input)}
CASES = {
    # PEFT's TEST_CASES "MLP 1 using nn.Parameter LoRA" and "MLP 2 using nn.Parameter LoRA"
    "mlp_1_using_parameter": ("mlp_params", dict(target_parameters=["lin0.weight"])),
    "mlp_2_using_parameter": ("mlp", dict(target_modules=["lin0"], target_parameters=["lin1.weight"])),
    "mlp_params_both_rslora_bias": ("mlp_params", dict(r=3, lora_alpha=5, use_rslora=True, bias="all",
                                                       target_parameters=["lin0.weight", "lin1.weight"])),
    "qwen3_moe": ("qwen3_moe", dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                    target_parameters=EXPERTS + ["mlp.gate.weight"])),
    "qwen3_moe_experts_only_patterns": ("qwen3_moe", dict(
        r=2, target_modules=[], target_parameters=["gate_up_proj", "down_proj"],
        rank_pattern={"layers.1.mlp.experts.down_proj": 3}, alpha_pattern={r".*\.gate_up_proj": 6})),
    "mixtral": ("mixtral", dict(r=2, lora_alpha=4, target_modules=["o_proj"], target_parameters=EXPERTS + ["gate.weight"])),
    "gpt_oss": ("gpt_oss", dict(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS)),
    "gpt_oss_experts_only": ("gpt_oss", dict(r=3, target_modules=[], target_parameters=["experts.down_proj"])),
}


def _base(case: str):
    return MODELS[CASES[case][0]][0]()


def _input(case: str):
    return MODELS[CASES[case][0]][1]()


def _config(case: str, **overrides):
    return make_config(**{**CASES[case][1], **overrides})


def _peft_model(case: str, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(_base(case), peft.LoraConfig(**{**CASES[case][1], **overrides})).eval()


def _pair(case: str):
    """PEFT's model and ours with the same (perturbed) tensors."""
    theirs = _peft_model(case, init_lora_weights=False)
    perturb(theirs)
    ours = inject(_base(case), _config(case, init_lora_weights=False))
    ours.load_state_dict(theirs.base_model.model.state_dict())
    return theirs, ours


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_same_seed_gives_peft_state_dict_key_for_key_and_bit_for_bit(case, init):
    theirs = _peft_model(case, init_lora_weights=init).base_model.model.state_dict()
    ours = inject(_base(case), _config(case, init_lora_weights=init)).state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_2d_parameter_inits_give_peft_tensors_and_residual(init):
    config = dict(r=2, target_modules=["lin0"], target_parameters=["lin1.weight"], init_lora_weights=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(mlp(), peft.LoraConfig(**config)).base_model.model.state_dict()
    ours = inject(mlp(), make_config(**config)).state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("case", sorted(CASES))
def test_trainable_parameters_match_peft(case):
    ours = inject(_base(case), _config(case))
    theirs = _peft_model(case)
    count = trainable_parameters(ours)
    assert (count.trainable, count.total) == theirs.get_nb_trainable_parameters()
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n.removeprefix(PREFIX) for n, p in theirs.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_disabled_forward_match_peft(case):
    theirs, ours = _pair(case)
    x = _input(case)
    with torch.no_grad():
        adapted = output(ours, x)
        assert _rel_diff(adapted, output(theirs, x)) < 1e-6
        assert _rel_diff(adapted, output(_base(case), x)) > 1e-3  # the LoRA does something
        with disable_adapters(ours), theirs.disable_adapter():
            if CASES[case][1].get("bias", "none") == "none":  # else the trained biases stay
                assert torch.equal(output(ours, x), output(_base(case), x))
            assert _rel_diff(output(ours, x), output(theirs, x)) < 1e-6
        assert torch.equal(output(ours, x), adapted)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_equals_unmerged_and_unmerge_restores_the_parameters(case):
    _, ours = _pair(case)
    x = _input(case)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    with torch.no_grad():
        expected = output(ours, x)
        merge_adapter(ours)
        assert all(layer.merged for _, layer in ours.named_modules() if isinstance(layer, LoraParameter))
        assert _rel_diff(output(ours, x), expected) < 1e-5
        unmerge_adapter(ours)
        assert _rel_diff(output(ours, x), expected) < 1e-5
    for _, layer in ours.named_modules():
        if isinstance(layer, LoraParameter):
            name = next(n for n, p in ours.named_parameters() if p is layer.parameter)
            original, delta = before[name], layer.delta_weight("default")
            assert_close_ulps(layer.parameter.detach(), original, 8,
                              magnitude=original.abs() + (original + delta).abs(), msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_and_unload_and_unload_match_peft(case):
    theirs, ours = _pair(case)
    x = _input(case)
    with torch.no_grad():
        merged_ours = merge_and_unload(ours)
        merged_theirs = theirs.merge_and_unload()
        assert not any(isinstance(m, LoraParameter) for m in merged_ours.modules())
        assert list(merged_ours.state_dict()) == list(merged_theirs.state_dict())
        assert _rel_diff(output(merged_ours, x), output(merged_theirs, x)) < 1e-5
    _, ours = _pair(case)
    before = {k.replace(".base_layer", ""): v.clone() for k, v in ours.state_dict().items() if ".lora_" not in k}
    merge_adapter(ours)
    unloaded = unload(ours).state_dict()
    assert [type(m) for m in ours.modules()] == [type(m) for m in _base(case).modules()]
    assert list(unloaded) == list(_base(case).state_dict()) == list(before)
    for key, value in unloaded.items():  # unmerged again: the base within rounding
        torch.testing.assert_close(value, before[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_saved_adapter_loads_in_peft_without_missing_or_unexpected_keys(tmp_path, case):
    _, ours = _pair(case)
    save_adapter(ours, str(tmp_path))
    config = peft.LoraConfig.from_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_base(case), config).eval()
        result = peft.set_peft_model_state_dict(theirs, peft.utils.load_peft_weights(str(tmp_path)))
        reloaded = peft.PeftModel.from_pretrained(_base(case), str(tmp_path)).eval()
    assert [k for k in result.missing_keys if ".lora_" in k] == [] and result.unexpected_keys == []
    x = _input(case)
    with torch.no_grad():
        assert _rel_diff(output(theirs, x), output(ours, x)) < 1e-6
        assert _rel_diff(output(reloaded, x), output(ours, x)) < 1e-6


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_loads_with_peft_outputs(tmp_path, case):
    theirs, _ = _pair(case)
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(_base(case), str(tmp_path))
    x = _input(case)
    with torch.no_grad():
        assert _rel_diff(output(ours, x), output(theirs, x)) < 1e-6
    assert trainable_parameters(ours).trainable == 0  # loaded frozen, as PEFT's from_pretrained


# ---------------------------------------------------------------------------- two adapters (PEFT's test cases)
def test_two_adapters_on_the_same_parameters_switch_like_peft(tmp_path):
    config = dict(target_parameters=["lin0.weight"], init_lora_weights=False)  # "LoRA targeting nn.Parameter Same"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(mlp_params(), peft.LoraConfig(**config)).eval()
        theirs.add_adapter("other", peft.LoraConfig(**config))
    ours = inject(mlp_params(), make_config(**config))
    inject(ours, make_config(**config), "other")
    assert list(ours.state_dict()) == list(theirs.base_model.model.state_dict())
    perturb(theirs)
    ours.load_state_dict(theirs.base_model.model.state_dict())
    x = mlp_input()
    with torch.no_grad():
        assert _rel_diff(output(ours, x), output(theirs, x)) < 1e-6
        theirs.set_adapter("other")
        set_adapter(ours, "other")
        assert _rel_diff(output(ours, x), output(theirs, x)) < 1e-6
    theirs.save_pretrained(str(tmp_path))
    loaded = load_adapter(mlp_params(), str(tmp_path))
    load_adapter(loaded, str(tmp_path / "other"), "other")
    set_adapter(loaded, "other")
    with torch.no_grad():
        assert _rel_diff(output(loaded, x), output(theirs, x)) < 1e-6


def test_two_adapters_on_different_parameters_are_refused_like_peft():
    first = dict(target_parameters=["lin0.weight"], init_lora_weights=False)  # "LoRA targeting nn.Parameter Different"
    second = dict(target_parameters=["lin1.weight"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(mlp_params(), peft.LoraConfig(**first))
        with pytest.raises(ValueError, match="same set of parameters"):
            theirs.add_adapter("other", peft.LoraConfig(**second))
    ours = inject(mlp_params(), make_config(**first))
    with pytest.raises(ConfigError, match="same set of parameters.*'lin0.weight'.*'lin1.weight'|same set of parameters"):
        inject(ours, make_config(**second), "other")
    assert list(ours.state_dict()) == list(inject(mlp_params(), make_config(**first)).state_dict())


@pytest.mark.parametrize("field,value", [("lora_dropout", 0.1), ("fan_in_fan_out", True), ("lora_bias", True),
                                         ("use_dora", True)])
def test_what_peft_refuses_is_refused(field, value):
    config = dict(target_parameters=["lin0.weight"], **{field: value})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError):
            peft.get_peft_model(mlp_params(), peft.LoraConfig(**config))
    with pytest.raises(Exception, match=field if field != "use_dora" else "DoRA"):
        inject(mlp_params(), make_config(**config))
