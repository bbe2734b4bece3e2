"""lorasurg.LoraConfig against peft.LoraConfig (0.21.2): fields, defaults, refusals, warnings, file round trip."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

peft = pytest.importorskip("peft")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lorasurg.config import WRITTEN_PEFT_VERSION, LoraConfig, TaskType  # noqa: E402
from lorasurg.errors import ConfigError  # noqa: E402


def _user_warnings(fn):
    """Run ``fn()``; return its result and the messages of the UserWarnings it raised."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in record if issubclass(w.category, UserWarning)]


def _peft_dict(cfg) -> dict:
    """PEFT's to_dict without the version PEFT stamps on every config it builds."""
    data = cfg.to_dict()
    data.pop("peft_version")
    return data


def _ours_dict(cfg: LoraConfig) -> dict:
    data = cfg.to_dict()
    data.pop("peft_version")
    return data


# ------------------------------------------------------------------------------------------ fields, defaults


def _default(f: dataclasses.Field):
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def test_fields_and_defaults_equal_peft():
    theirs = dataclasses.fields(peft.LoraConfig)
    ours = dataclasses.fields(LoraConfig)
    assert [f.name for f in ours] == [f.name for f in theirs]
    for mine, peft_field in zip(ours, theirs):
        assert _default(mine) == _default(peft_field), mine.name


def test_task_type_members_equal_peft():
    assert [(m.name, m.value) for m in TaskType] == [(m.name, m.value) for m in peft.TaskType]


# ---------------------------------------------------------------------------- accepted configs, same result

ACCEPTED = {
    "default": {},
    "list_targets": dict(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    ),
    "regex_targets": dict(target_modules=r".*\.(q_proj|v_proj)$"),
    "all_linear": dict(target_modules="all-linear", exclude_modules=["lm_head"]),
    "exclude_regex": dict(target_modules=["q_proj", "k_proj"], exclude_modules=r".*layers\.0\..*"),
    "patterns": dict(
        target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 4, r"^model\.layers\.1\.self_attn\.v_proj": 2},
        alpha_pattern={"v_proj": 3.5},
    ),
    "modules_to_save": dict(
        target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"], task_type=peft.TaskType.SEQ_CLS
    ),
    "layers_list": dict(target_modules=["q_proj"], layers_to_transform=[0, 2], layers_pattern="layers"),
    "layers_int": dict(target_modules=["q_proj"], layers_to_transform=1),
    "layers_pattern_list": dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=["layers", "h"]),
    "layers_empty": dict(target_modules=["q_proj"], layers_to_transform=[], layers_pattern="layers"),
    "dora": dict(target_modules=["q_proj"], use_dora=True),
    "rslora": dict(use_rslora=True, r=4, lora_alpha=2),
    "lora_bias": dict(lora_bias=True, init_lora_weights=False),
    "gaussian": dict(init_lora_weights="gaussian", bias="lora_only", fan_in_fan_out=True),
    "pissa_niter": dict(init_lora_weights="pissa_niter_4"),
    "olora_any_case": dict(init_lora_weights="OLoRA"),
    "orthogonal": dict(init_lora_weights="orthogonal", bias="all"),
    "mica": dict(init_lora_weights="mica"),
    "eva": dict(init_lora_weights="eva", eva_config={"rho": 1.5, "tau": 0.9}),
    "eva_default": dict(init_lora_weights="eva"),
    "eva_ignored": dict(eva_config={"whiten": True}),
    "corda": dict(init_lora_weights="corda", corda_config={"corda_method": "kpm", "cache_file": "c.pt"}),
    "corda_default": dict(init_lora_weights="corda"),
    "corda_ignored": dict(init_lora_weights="pissa", corda_config={}),
    "loftq": dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 8, "loftq_iter": 2}),
    "loftq_ignored": dict(loftq_config={"loftq_bits": 4}),
    "loftq_then_eva": dict(init_lora_weights="eva", loftq_config={"loftq_bits": 4}),
    "lora_ga": dict(init_lora_weights="lora_ga", lora_ga_config={"direction": "ArBr", "stable_gamma": 8}),
    "velora": dict(velora_config={"num_groups": 8, "init_type": "random"}),
    "kasa": dict(kasa_config={"beta": 0.0}),
    "arrow": dict(arrow_config={"top_k": 2, "rng_seed": 3}),
    "bdlora": dict(use_bdlora={"target_modules_bd_a": ["q_proj"], "target_modules_bd_b": ["o_proj"], "nblocks": 2}),
    "monteclora": dict(monteclora_config={"num_samples": 4, "use_entropy": True}),
    "tokens_list": dict(trainable_token_indices=[1, 2, 3]),
    "tokens_dict": dict(trainable_token_indices={"embed_tokens": [0, 5]}),
    "alora": dict(alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM"),
    "alora_not_causal": dict(alora_invocation_tokens=[5]),
    "rslora_pissa_patterns": dict(use_rslora=True, init_lora_weights="pissa", rank_pattern={"q_proj": 2}),
    "layer_replication": dict(layer_replication=[[0, 2], [1, 3]]),
    "target_parameters": dict(target_modules=[], target_parameters=["mlp.experts.gate_up_proj"]),
    "provenance": dict(
        base_model_name_or_path="tiny/llama", revision="main", inference_mode=True,
        auto_mapping={"base_model_class": "LlamaForCausalLM", "parent_library": "transformers.models.llama"},
    ),
    "megatron": dict(megatron_config={"num_layers": 2}, megatron_core="my.core"),
    "qalora": dict(use_qalora=True, qalora_group_size=32),
    "weight_tying": dict(ensure_weight_tying=True, modules_to_save=["lm_head"]),
    "float_alpha": dict(lora_alpha=12.5, lora_dropout=1.0),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_like_peft_with_same_result_and_warnings(name):
    kwargs = ACCEPTED[name]
    theirs, their_warnings = _user_warnings(lambda: peft.LoraConfig(**kwargs))
    ours, our_warnings = _user_warnings(lambda: LoraConfig(**kwargs))
    assert _ours_dict(ours) == _peft_dict(theirs)
    assert len(our_warnings) == len(their_warnings), (our_warnings, their_warnings)


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_json_text_equals_peft_s_with_sorted_sets(name):
    kwargs = ACCEPTED[name]
    theirs, _ = _user_warnings(lambda: peft.LoraConfig(**kwargs))
    ours, _ = _user_warnings(lambda: LoraConfig(**kwargs))
    data = {k: sorted(v) if isinstance(v, set) else v for k, v in theirs.to_dict().items()}
    data["peft_version"] = WRITTEN_PEFT_VERSION
    assert ours.to_json_string() == json.dumps(data, indent=2, sort_keys=True)


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_peft_to_lorasurg_to_peft_round_trip(name, tmp_path):
    kwargs = ACCEPTED[name]
    theirs, _ = _user_warnings(lambda: peft.LoraConfig(**kwargs))
    theirs.save_pretrained(tmp_path / "peft")
    reloaded, reload_warnings = _user_warnings(lambda: peft.LoraConfig.from_pretrained(tmp_path / "peft"))

    ours, our_warnings = _user_warnings(lambda: LoraConfig.from_pretrained(tmp_path / "peft"))
    assert len(our_warnings) == len(reload_warnings)
    ours.save_pretrained(tmp_path / "lorasurg")

    again, again_warnings = _user_warnings(lambda: peft.LoraConfig.from_pretrained(tmp_path / "lorasurg"))
    assert again.to_dict() == reloaded.to_dict()
    # lorasurg writes the settled config (e.g. a default eva_config filled in), so PEFT may warn less, never more
    assert set(again_warnings) <= set(reload_warnings)
    generic, _ = _user_warnings(lambda: peft.PeftConfig.from_pretrained(tmp_path / "lorasurg"))
    assert type(generic) is peft.LoraConfig


@pytest.mark.parametrize("name", [n for n in ACCEPTED if not _user_warnings(lambda n=n: LoraConfig(**ACCEPTED[n]))[1]])
def test_lorasurg_json_loads_in_peft_without_warnings(name, tmp_path):
    ours = LoraConfig(**ACCEPTED[name])
    ours.save_pretrained(tmp_path)
    loaded, messages = _user_warnings(lambda: peft.LoraConfig.from_pretrained(tmp_path))
    assert messages == []
    assert _peft_dict(loaded) == _ours_dict(ours)
    assert loaded.peft_version == WRITTEN_PEFT_VERSION


def test_unknown_key_from_a_newer_peft(tmp_path):
    peft.LoraConfig(target_modules=["q_proj"]).save_pretrained(tmp_path / "newer")
    path = tmp_path / "newer" / "adapter_config.json"
    data = json.loads(path.read_text())
    data["future_option"] = [1, 2]
    path.write_text(json.dumps(data))

    with pytest.warns(UserWarning, match="future_option"):
        ours = LoraConfig.from_pretrained(path)
    ours.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["future_option"] == [1, 2]
    with pytest.warns(UserWarning, match="future_option"):  # PEFT drops it, with its own warning
        theirs = peft.LoraConfig.from_pretrained(tmp_path / "out")
    with pytest.warns(UserWarning, match="future_option"):
        original = peft.LoraConfig.from_pretrained(tmp_path / "newer")
    assert theirs.to_dict() == original.to_dict()


# ---------------------------------------------------------------------------------------- refused by both

REFUSED_BY_BOTH = {
    "task_type": dict(task_type="CAUSAL"),
    "target_parameters_str": dict(target_parameters="experts.w"),
    "regex_and_layers": dict(target_modules="q.*", layers_to_transform=[0]),
    "regex_and_pattern": dict(target_modules="q.*", layers_pattern="layers"),
    "pattern_without_layers": dict(target_modules=["q"], layers_pattern="layers"),
    "dora_megatron": dict(use_dora=True, megatron_config={"a": 1}),
    "loftq_without_config": dict(init_lora_weights="loftq"),
    "loftq_config_not_a_dict": dict(init_lora_weights="loftq", loftq_config=[1]),
    "lora_bias_pissa": dict(lora_bias=True, init_lora_weights="pissa"),
    "lora_bias_gaussian": dict(lora_bias=True, init_lora_weights="gaussian"),
    "lora_bias_dora": dict(lora_bias=True, use_dora=True),
    "eva_rho": dict(init_lora_weights="eva", eva_config={"rho": 0.5}),
    "eva_tau": dict(init_lora_weights="eva", eva_config={"tau": -0.1}),
    "eva_rho_type": dict(init_lora_weights="eva", eva_config={"rho": "2"}),
    "velora_groups": dict(velora_config={"num_groups": 0}),
    "velora_scale": dict(velora_config={"scale": 0}),
    "velora_init_type": dict(velora_config={"init_type": "mean"}),
    "arrow_top_k": dict(arrow_config={"top_k": 0}),
    "arrow_temperature": dict(arrow_config={"router_temperature": -1.0}),
    "bdlora_overlap": dict(use_bdlora={"target_modules_bd_a": ["q"], "target_modules_bd_b": ["q"]}),
    "kasa_beta": dict(kasa_config={"beta": -1e-4}),
    "kasa_gamma": dict(kasa_config={"gamma": -1e-3}),
    "monteclora_samples": dict(monteclora_config={"num_samples": 0}),
    "monteclora_prior": dict(monteclora_config={"dirichlet_prior": 0}),
    "monteclora_buffer": dict(monteclora_config={"buffer_size": -3}),
    "monteclora_unknown_key": dict(monteclora_config={"samples": 4}),
    **{f"{name}_wrong_type": {name: 5} for name in (
        "eva_config", "corda_config", "lora_ga_config", "velora_config", "arrow_config", "use_bdlora", "kasa_config",
    )},
}


@pytest.mark.parametrize("name", list(REFUSED_BY_BOTH))
def test_refused_by_both_with_the_same_exception_type(name):
    kwargs = REFUSED_BY_BOTH[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((ValueError, TypeError)) as theirs:
            peft.LoraConfig(**kwargs)
        with pytest.raises(ConfigError) as ours:
            LoraConfig(**kwargs)
    assert isinstance(ours.value, type(theirs.value)), (type(theirs.value), ours.value)


# ------------------------------------------------------- refused early by lorasurg, late (at model build) by PEFT


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=64,
    )
    return LlamaForCausalLM(config)


REFUSED_EARLY = {
    "r_zero": dict(r=0),
    "r_float": dict(r=4.0),
    "bias": dict(bias="some"),
    "init_unknown": dict(init_lora_weights="foo"),
    "init_pissa_bad_niter": dict(init_lora_weights="pissa_niter_x"),
    "dropout": dict(lora_dropout=1.5),
    "rank_pattern_none": dict(rank_pattern=None),
    "alpha_pattern_none": dict(alpha_pattern=None),
    "rank_pattern_zero": dict(rank_pattern={"q_proj": 0}),
    "rank_pattern_float": dict(rank_pattern={"q_proj": 2.0}),
    "layers_to_transform_str": dict(layers_to_transform="0", layers_pattern="layers"),
}


@pytest.mark.parametrize("name", list(REFUSED_EARLY))
def test_refused_early_what_peft_refuses_when_building_layers(name):
    kwargs = {"target_modules": ["q_proj", "v_proj"], **REFUSED_EARLY[name]}
    with pytest.raises(ConfigError):
        LoraConfig(**kwargs)
    their_config = peft.LoraConfig(**kwargs)  # accepted here ...
    with pytest.raises(Exception):  # ... refused when PEFT builds the layers
        peft.get_peft_model(_tiny_llama(), their_config)


def test_documented_deviations_peft_accepts_but_mangles():
    # lorasurg refuses these; PEFT keeps or overwrites them silently. If PEFT starts refusing, drop the note.
    assert peft.LoraConfig(modules_to_save="lm_head").modules_to_save == "lm_head"  # matched char by char
    assert peft.LoraConfig(peft_type="IA3").peft_type == "LORA"  # overwritten
    assert peft.LoraConfig(monteclora_config=5).monteclora_config == 5  # kept, fails later
    for kwargs in (dict(modules_to_save="lm_head"), dict(peft_type="IA3"), dict(monteclora_config=5)):
        with pytest.raises(ConfigError):
            LoraConfig(**kwargs)


def test_peft_accepts_any_peft_version_silently(tmp_path):
    """Why lorasurg may write WRITTEN_PEFT_VERSION and keep a file's version: PEFT never checks it for LoRA."""
    for version in ("99.0.0", WRITTEN_PEFT_VERSION, "0.1.0"):
        LoraConfig(peft_version=version).save_pretrained(tmp_path / version)
        loaded, messages = _user_warnings(lambda v=version: peft.LoraConfig.from_pretrained(tmp_path / v))
        assert messages == [] and loaded.peft_version == version
