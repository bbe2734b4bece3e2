"""lorasurg.consumers.peft_conversion against PEFT 0.21.2's own functions (peft/utils/transformers_weight_conversion.py)
on the fixture models built on the meta device: the MoE config conversion for list, regex and "all-linear"
target_modules, and the names adapter keys are loaded under."""

from __future__ import annotations

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft.utils.transformers_weight_conversion import (  # noqa: E402
    _convert_peft_config_moe,
    convert_peft_adapter_state_dict_for_transformers,
)

from lorasurg.config import LoraConfig  # noqa: E402
from lorasurg.consumers.peft_conversion import peft_converted_config, peft_loaded_name, \
    peft_renames_adapter_keys  # noqa: E402
from lorasurg.io.architecture import meta_model  # noqa: E402
from lorasurg.io.checkpoint import Checkpoint  # noqa: E402

from tests.surgery.moe_adapters import base_of  # noqa: E402

CONFIGS = [
    dict(target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]),
    dict(target_modules=["q_proj", "gate_proj", "down_proj"]),
    dict(target_modules=["model.layers.0.mlp.gate_proj", "v_proj"], rank_pattern={"v_proj": 4}),
    dict(target_modules=["w1", "w2", "w3", "gate", "k_proj"]),
    dict(target_modules=r".*\.(q_proj|gate_proj|up_proj)"),
    dict(target_modules="all-linear", lora_alpha=32),
    dict(target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"]),
]


def _model(family: str):
    config = json.loads((base_of(family) / "config.json").read_text())
    return meta_model(config)


def _peft(family: str, model, **fields):
    cfg = peft.LoraConfig(r=8, **{"lora_alpha": 16, **fields})
    try:
        _convert_peft_config_moe(cfg, model)
    except ValueError as err:
        return str(err)
    return (set(cfg.target_modules) if not isinstance(cfg.target_modules, str) else cfg.target_modules,
            set(cfg.target_parameters or []), dict(cfg.rank_pattern or {}), dict(cfg.alpha_pattern or {}))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "qwen2_moe", "llava"])
@pytest.mark.parametrize("fields", CONFIGS, ids=range(len(CONFIGS)))
def test_moe_config_conversion_is_peft_s(family, fields):
    model = _model(family)
    expected = _peft(family, model, **copy.deepcopy(fields))
    modules = [n for n, _ in model.named_modules() if n]
    parameters = [n for n, _ in model.named_parameters()]
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    got = peft_converted_config(LoraConfig(r=8, **{"lora_alpha": 16, **fields}), model.config.model_type,
                                modules, linear, parameters)
    if isinstance(expected, str):  # PEFT raised: the parts it names are the partial ones
        assert got.partial and all(p in expected for parts in got.partial.values() for p in parts[0] + parts[1])
        return
    cfg = got.config
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else set(cfg.target_modules or ())
    assert (targets, set(cfg.target_parameters or []), dict(cfg.rank_pattern or {}),
            dict(cfg.alpha_pattern or {})) == expected


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "mixtral", "qwen3_moe"])
def test_loaded_names_are_the_keys_peft_loads(family):
    """Every checkpoint-named module of the fixture (renamed by the model): PEFT's key conversion sends its LoRA keys
    to peft_loaded_name's name."""
    with Checkpoint.open(base_of(family)) as ckpt:
        description = ckpt.describe()
    model = _model(family)
    renamed = {c: m for c, m in description.names.items() if c not in description.experts}
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"])
    state = {f"base_model.model.{c}.lora_A.weight": torch.zeros(1) for c in renamed}
    converted = convert_peft_adapter_state_dict_for_transformers(model, cfg, state)
    renames = peft_renames_adapter_keys(family)
    expected = {f"base_model.model.{peft_loaded_name(c, m, renames)}.lora_A.weight" for c, m in renamed.items()}
    assert set(converted) == expected
    assert renames == (family != "qwen2_vl")
