"""Unit tests of lorasurg.config: defaults, normalisation, refusals, warnings, adapter_config.json I/O."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest

from lorasurg.config import CONFIG_NAME, WRITTEN_PEFT_VERSION, LoraConfig, TaskType
from lorasurg.errors import ConfigTypeError
from lorasurg.errors import ConfigError, InputError


def _quiet(**kwargs) -> LoraConfig:
    """Build a config and assert that it warns about nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return LoraConfig(**kwargs)


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ defaults, normalisation


def test_defaults():
    cfg = _quiet()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias, cfg.init_lora_weights) == (8, 8, 0.0, "none", True)
    assert cfg.peft_type == "LORA" and cfg.peft_version is None and cfg.task_type is None
    assert cfg.rank_pattern == {} and cfg.alpha_pattern == {} and cfg.loftq_config == {}
    assert cfg.megatron_core == "megatron.core" and cfg.qalora_group_size == 16
    assert cfg.runtime_config == {"ephemeral_gpu_offload": False}
    assert cfg.unknown_keys == {}
    names = {f.name for f in dataclasses.fields(LoraConfig)}
    assert set(cfg.to_dict()) == names - {"runtime_config"}


def test_default_mutables_are_not_shared():
    a, b = _quiet(), _quiet()
    a.rank_pattern["q"] = 2
    assert b.rank_pattern == {}


@pytest.mark.parametrize("given", [["q", "v", "q"], ("q", "v"), {"q", "v"}, frozenset({"q", "v"})])
def test_module_lists_become_sets(given):
    cfg = _quiet(target_modules=given, exclude_modules=given)
    assert cfg.target_modules == {"q", "v"} and isinstance(cfg.target_modules, set)
    assert cfg.exclude_modules == {"q", "v"} and isinstance(cfg.exclude_modules, set)


def test_regex_and_all_linear_strings_are_kept():
    assert _quiet(target_modules=r".*\.q_proj$").target_modules == r".*\.q_proj$"
    assert _quiet(target_modules="all-linear").target_modules == "all-linear"


def test_task_type_string_becomes_enum():
    cfg = _quiet(task_type="CAUSAL_LM")
    assert cfg.task_type is TaskType.CAUSAL_LM
    assert cfg.to_dict()["task_type"] == "CAUSAL_LM" and type(cfg.to_dict()["task_type"]) is str
    assert [m.value for m in TaskType] == [
        "SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION",
    ]


def test_subconfig_dict_is_filled_with_defaults():
    cfg = _quiet(init_lora_weights="eva", eva_config={"rho": 3.0})
    assert cfg.eva_config == dict(
        rho=3.0, tau=0.99, use_label_mask=True, label_mask_value=-100, whiten=False, adjust_scaling_factors=True
    )


def test_subconfig_instance_of_peft_class_name_is_accepted():
    @dataclasses.dataclass
    class KasaConfig:  # stands in for peft.KasaConfig
        beta: float = 0.5
        gamma: float = 0.0

    assert _quiet(kasa_config=KasaConfig()).kasa_config == {"beta": 0.5, "gamma": 0.0}


def test_arrow_fields_set_by_peft_are_reset_when_read_from_a_dict():
    cfg = _quiet(arrow_config={"top_k": 2, "task_adapter_names": ["a"]})
    assert cfg.arrow_config["task_adapter_names"] is None and cfg.arrow_config["top_k"] == 2


def test_loftq_config_instance_becomes_dict():
    @dataclasses.dataclass
    class LoftQConfig:
        loftq_bits: int = 4
        loftq_iter: int = 1

    cfg = _quiet(init_lora_weights="loftq", loftq_config=LoftQConfig())
    assert cfg.loftq_config == {"loftq_bits": 4, "loftq_iter": 1}


@pytest.mark.parametrize(
    "init", [True, False, "gaussian", "Gaussian", "OLoRA", "mica", "orthogonal", "pissa", "pissa_niter_4", "lora_ga"]
)
def test_init_lora_weights_accepted(init):
    assert _quiet(init_lora_weights=init).init_lora_weights == init


# ------------------------------------------------------------------------------------------------- refusals

REFUSED = [
    # (kwargs, substrings of the message, raises a TypeError too)
    (dict(task_type="CAUSAL"), ["task_type='CAUSAL'", "CAUSAL_LM"], False),
    (dict(task_type=["CAUSAL_LM"]), ["task_type=['CAUSAL_LM'] is not a PEFT task type"], False),
    (dict(peft_type="IA3"), ["peft_type='IA3'", "leave peft_type unset"], False),
    (dict(r=0), ["r must be a positive int", "got 0"], False),
    (dict(r=4.0), ["r must be a positive int", "4.0"], True),
    (dict(r=True), ["r must be a positive int"], True),
    (dict(lora_alpha="8"), ["lora_alpha must be a number"], True),
    (dict(lora_dropout=1.5), ["lora_dropout", "[0, 1]", "1.5"], False),
    (dict(bias="some"), ["bias must be one of", "'some'"], False),
    (dict(init_lora_weights="foo"), ["init_lora_weights='foo'", "'pissa_niter_<n>'"], False),
    (dict(init_lora_weights="pissa_foo"), ["init_lora_weights='pissa_foo'"], False),
    (dict(init_lora_weights="PISSA"), ["init_lora_weights='PISSA'"], False),
    (dict(init_lora_weights=1), ["init_lora_weights=1"], True),
    (dict(target_modules=["q", 1]), ["target_modules must be"], True),
    (dict(exclude_modules=5), ["exclude_modules must be"], True),
    (dict(target_parameters="experts.w"), ["target_parameters", "not a string", "['experts.w']"], True),
    (dict(target_parameters=[1]), ["target_parameters must be a list"], True),
    (dict(modules_to_save="lm_head"), ["modules_to_save must be a list", "not a string (PEFT", "['lm_head']"], True),
    (dict(modules_to_save=[None]), ["modules_to_save must be a list"], True),
    (dict(layers_to_transform="0"), ["layers_to_transform must be"], True),
    (dict(layers_to_transform=[0], layers_pattern=3), ["layers_pattern must be"], True),
    (dict(rank_pattern=None), ["rank_pattern must be a dict"], True),
    (dict(alpha_pattern=None), ["alpha_pattern must be a dict"], True),
    (dict(rank_pattern={"q": 0}), ["rank_pattern values", "positive int", "'q': 0"], True),
    (dict(rank_pattern={"q": 2.0}), ["rank_pattern values"], True),
    (dict(alpha_pattern={"q": "x"}), ["alpha_pattern values", "a number"], True),
    (dict(trainable_token_indices={"embed": [1.5]}), ["trainable_token_indices must be"], True),
    (dict(alora_invocation_tokens="abc"), ["alora_invocation_tokens must be"], True),
    (dict(layer_replication=[[0, 1, 2]]), ["layer_replication must be"], True),
    (dict(runtime_config=None), ["runtime_config must be a dict"], True),
    (dict(init_lora_weights="loftq", loftq_config=[1]), ["loftq_config must be a dict"], True),
    # PEFT's own combination refusals
    (dict(target_modules="q.*", layers_to_transform=[0]), ["layers_to_transform cannot be used", "regex"], False),
    (dict(target_modules="q.*", layers_pattern="layers", layers_to_transform=[0]), ["layers_pattern cannot"], False),
    (dict(target_modules=["q"], layers_pattern="layers"), ["layers_pattern='layers' needs layers_to_transform"], False),
    (dict(use_dora=True, megatron_config={"a": 1}), ["use_dora=True", "megatron_config", "use_dora=False"], False),
    (dict(init_lora_weights="loftq"), ["init_lora_weights='loftq' needs loftq_config"], False),
    (dict(lora_bias=True, init_lora_weights="pissa"), ["lora_bias=True needs init_lora_weights", "'pissa'"], False),
    (dict(lora_bias=True, use_dora=True), ["lora_bias=True", "use_dora=True"], False),
    # sub-configs
    (dict(init_lora_weights="eva", eva_config={"rho": 0.5}), ["eva_config.rho must be >= 1.0, got 0.5"], False),
    (dict(init_lora_weights="eva", eva_config={"tau": 1.5}), ["eva_config.tau must be between 0.0 and 1.0"], False),
    (dict(init_lora_weights="eva", eva_config={"rho": "2"}), ["eva_config.rho must be a number"], True),
    (dict(velora_config={"num_groups": 0}), ["velora_config.num_groups must be > 0"], False),
    (dict(velora_config={"scale": -1.0}), ["velora_config.scale must be > 0"], False),
    (dict(velora_config={"init_type": "x"}), ["velora_config.init_type must be one of"], False),
    (dict(arrow_config={"top_k": 0}), ["arrow_config.top_k must be > 0"], False),
    (dict(arrow_config={"router_temperature": 0}), ["arrow_config.router_temperature must be > 0"], False),
    (dict(kasa_config={"beta": -1}), ["kasa_config.beta must be >= 0"], False),
    (dict(kasa_config={"gamma": -1}), ["kasa_config.gamma must be >= 0"], False),
    (dict(monteclora_config={"num_samples": 0}), ["monteclora_config.num_samples must be > 0"], False),
    (dict(monteclora_config={"dirichlet_prior": 0.0}), ["monteclora_config.dirichlet_prior must be > 0"], False),
    (dict(monteclora_config={"buffer_size": 0}), ["monteclora_config.buffer_size must be > 0"], False),
    (dict(monteclora_config={"samples": 3}), ["monteclora_config has unknown key(s) ['samples']"], True),
    (dict(use_bdlora={"target_modules_bd_a": ["q"], "target_modules_bd_b": ["q", "o"]}), ["['q'] are in both"], False),
    (dict(use_bdlora={"target_modules_bd_a": "q"}), ["use_bdlora.target_modules_bd_a must be a list"], True),
    (dict(corda_config=5), ["corda_config must be None, a dict, or a CordaConfig instance; got int"], True),
    (dict(eva_config=[]), ["eva_config must be None, a dict, or a EvaConfig"], True),
]


@pytest.mark.parametrize("kwargs, parts, is_type", REFUSED, ids=[str(r[0])[:60] for r in REFUSED])
def test_refused_with_a_message_naming_the_field(kwargs, parts, is_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError) as info:
            LoraConfig(**kwargs)
    message = str(info.value)
    assert message.startswith("invalid LoRA config")
    for part in parts:
        assert part in message
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, TypeError) is is_type
    assert isinstance(info.value, ConfigTypeError) is is_type


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigTypeError) as info:
        LoraConfig(r=0, bias="x", lora_dropout=2.0, target_parameters="w", lora_bias=True, use_dora=True)
    message = str(info.value)
    assert message.startswith("invalid LoRA config (5 problems):")
    for field in ("r must", "lora_dropout", "bias must", "target_parameters", "lora_bias=True"):
        assert field in message


def test_wrong_type_subconfig_is_refused_before_any_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigTypeError, match="eva_config must be None"):
            LoraConfig(eva_config=5)


def test_validate_rechecks_after_assignment():
    cfg = _quiet()
    cfg.validate()
    cfg.r = -1
    with pytest.raises(ConfigError, match="r must be a positive int"):
        cfg.validate()
    with pytest.raises(ConfigError, match="r must be a positive int"):
        cfg.to_json_string()


# ------------------------------------------------------------------------------------------------- warnings

WARNED = [
    (dict(loftq_config={"loftq_bits": 4}), "loftq_config is ignored", ("loftq_config", {})),
    (dict(init_lora_weights="eva"), "eva_config is not given", ("eva_config", "filled")),
    (dict(eva_config={}), "eva_config is ignored", ("eva_config", "filled")),
    (dict(init_lora_weights="corda"), "corda_config is not given", ("corda_config", "filled")),
    (dict(init_lora_weights="pissa", corda_config={}), "corda_config is ignored", ("corda_config", "filled")),
    (dict(alora_invocation_tokens=[1, 2]), "only supported by PEFT for task_type CAUSAL_LM", None),
    (dict(use_rslora=True, rank_pattern={"q": 2}, init_lora_weights="olora"), "use_rslora with rank_pattern", None),
    (dict(eva_config={"rho": 2.0, "newer": 1}, init_lora_weights="eva"), "eva_config: unknown key(s) ['newer']", None),
]


@pytest.mark.parametrize("kwargs, text, effect", WARNED, ids=[str(w[0])[:50] for w in WARNED])
def test_warns_like_peft(kwargs, text, effect):
    with pytest.warns(UserWarning, match=None) as record:
        cfg = LoraConfig(**kwargs)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and text in messages[0], messages
    assert record[0].filename == __file__  # attributed to the caller, not to lorasurg
    if effect is not None:
        field, value = effect
        got = getattr(cfg, field)
        assert got == value if value != "filled" else (isinstance(got, dict) and len(got) == 6)


def test_eva_rules_only_apply_when_loftq_config_is_empty():
    # PEFT's rules form one chain: once loftq_config is reset, eva_config is neither filled nor warned about.
    with pytest.warns(UserWarning) as record:
        cfg = LoraConfig(init_lora_weights="eva", loftq_config={"loftq_bits": 4})
    assert len(record) == 1 and "loftq_config is ignored" in str(record[0].message)
    assert cfg.eva_config is None


def test_unknown_subconfig_key_is_kept_and_written(tmp_path):
    with pytest.warns(UserWarning, match="newer"):
        cfg = LoraConfig(kasa_config={"beta": 0.0, "newer": [1]})
    assert cfg.kasa_config == {"beta": 0.0, "gamma": 1e-3, "newer": [1]}
    assert json.loads(cfg.to_json_string())["kasa_config"]["newer"] == [1]


# ----------------------------------------------------------------------------------------------- JSON form


def test_json_form_is_peft_s():
    cfg = _quiet(target_modules=["v", "q", "k"], exclude_modules=["b", "a"], task_type="CAUSAL_LM", r=4)
    text = cfg.to_json_string()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True)
    assert list(data) == sorted(data)
    assert data["target_modules"] == ["k", "q", "v"] and data["exclude_modules"] == ["a", "b"]
    assert "runtime_config" not in data
    assert data["peft_version"] == WRITTEN_PEFT_VERSION == "0.21.2"
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert data["layers_pattern"] is None and data["loftq_config"] == {}
    assert len(data) == len(dataclasses.fields(LoraConfig)) - 1


def test_given_peft_version_is_kept():
    assert json.loads(_quiet(peft_version="0.30.0").to_json_string())["peft_version"] == "0.30.0"


def test_unserialisable_value_is_named():
    cfg = _quiet(megatron_config={"obj": object()})
    with pytest.raises(ConfigError, match="cannot write as JSON: megatron_config"):
        cfg.to_json_string()


# ------------------------------------------------------------------------------------ save / from_pretrained


def test_save_and_load_round_trip(tmp_path):
    cfg = _quiet(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 3.5}, modules_to_save=["lm_head"], layers_to_transform=[0, 1],
        layers_pattern="layers", use_dora=True, layer_replication=[[0, 2], [1, 2]], task_type="CAUSAL_LM",
    )
    written = cfg.save_pretrained(tmp_path / "out")
    assert written == tmp_path / "out" / CONFIG_NAME
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [CONFIG_NAME]  # no temp file left
    for source in (tmp_path / "out", written, str(written)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            back = LoraConfig.from_pretrained(source)
        assert back.to_dict() == {**cfg.to_dict(), "peft_version": WRITTEN_PEFT_VERSION}
    assert back.save_pretrained(tmp_path / "again").read_text() == written.read_text()


def test_from_dict_missing_keys_take_defaults():
    cfg = LoraConfig.from_dict({"peft_type": "LORA", "r": 2})
    assert cfg.r == 2 and cfg.lora_alpha == 8 and cfg.peft_version is None
    assert LoraConfig.from_dict({}).peft_type == "LORA"


def test_unknown_key_warns_and_is_written_back(tmp_path):
    data = json.loads(_quiet().to_json_string())
    data.update(future_option={"x": [1, 2]}, another=3)
    src = _write(tmp_path / CONFIG_NAME, data)
    with pytest.warns(UserWarning, match=r"\['another', 'future_option'\]") as record:
        cfg = LoraConfig.from_pretrained(tmp_path)
    assert str(src) in str(record[0].message)
    assert cfg.unknown_keys == {"future_option": {"x": [1, 2]}, "another": 3}
    out = json.loads(cfg.save_pretrained(tmp_path / "out").read_text())
    assert out == data


def test_runtime_config_in_file_is_dropped_with_a_warning(tmp_path):
    data = json.loads(_quiet().to_json_string())
    data["runtime_config"] = {"ephemeral_gpu_offload": True}
    _write(tmp_path / CONFIG_NAME, data)
    with pytest.warns(UserWarning, match="runtime_config"):
        cfg = LoraConfig.from_pretrained(tmp_path)
    assert cfg.runtime_config == {"ephemeral_gpu_offload": False}


@pytest.mark.parametrize("peft_type", ["IA3", "LOHA", "lora"])
def test_non_lora_adapter_is_refused(tmp_path, peft_type):
    src = _write(tmp_path / CONFIG_NAME, {"peft_type": peft_type, "r": 8})
    with pytest.raises(ConfigError) as info:
        LoraConfig.from_pretrained(tmp_path)
    assert f"{src} is a {peft_type} adapter" in str(info.value) and "lorasurg handles LoRA only" in str(info.value)


def test_invalid_config_in_file_names_the_file(tmp_path):
    src = _write(tmp_path / CONFIG_NAME, {"peft_type": "LORA", "r": 0, "target_parameters": "w"})
    with pytest.raises(ConfigTypeError) as info:
        LoraConfig.from_pretrained(src)
    assert str(info.value).startswith(f"{src}: invalid LoRA config (2 problems)")


def test_bad_json_names_file_line_and_column(tmp_path):
    src = _write(tmp_path / CONFIG_NAME, '{\n  "r": 8,\n  "lora_alpha": ,\n}')
    with pytest.raises(InputError) as info:
        LoraConfig.from_pretrained(tmp_path)
    assert str(info.value).startswith(f"{src}: invalid JSON at line 3, column 17")


def test_json_that_is_not_an_object(tmp_path):
    _write(tmp_path / CONFIG_NAME, "[1, 2]")
    with pytest.raises(InputError, match="expected a JSON object of config fields, found a list"):
        LoraConfig.from_pretrained(tmp_path)


def test_binary_file_is_refused(tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(b"\x80\x81\xff")
    with pytest.raises(InputError, match="is not UTF-8 text"):
        LoraConfig.from_pretrained(src)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match=f"no such file or directory: {missing}"):
        LoraConfig.from_pretrained(missing)
    with pytest.raises(InputError, match="no such file or directory: some/dir/adapter_config.json"):
        LoraConfig.from_pretrained("some/dir/adapter_config.json")


def test_directory_without_config(tmp_path):
    with pytest.raises(InputError, match=f"directory {tmp_path} has no {CONFIG_NAME}"):
        LoraConfig.from_pretrained(tmp_path)


def test_save_into_a_file_is_refused(tmp_path):
    target = _write(tmp_path / "file.txt", "x")
    with pytest.raises(InputError, match="it is a file"):
        _quiet().save_pretrained(target)


# ------------------------------------------------------------------------------------------------------ hub


def _offline_hub(monkeypatch, cache: Path) -> None:
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_hub_repo_id_read_from_the_offline_cache(tmp_path, monkeypatch):
    _offline_hub(monkeypatch, tmp_path)
    repo = tmp_path / "models--someone--tiny-adapter"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    _quiet(r=3).save_pretrained(repo / "snapshots" / commit)
    assert LoraConfig.from_pretrained("someone/tiny-adapter").r == 3


def test_hub_repo_id_not_cached_offline(tmp_path, monkeypatch):
    _offline_hub(monkeypatch, tmp_path)
    with pytest.raises(InputError) as info:
        LoraConfig.from_pretrained("someone/absent-adapter", revision="v1")
    message = str(info.value)
    assert "someone/absent-adapter does not exist as a local path" in message and "HF_HUB_OFFLINE=1" in message
