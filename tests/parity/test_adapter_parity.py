"""PEFT-saved adapters survive lorasurg's load -> save unchanged, and PEFT reads lorasurg's output back."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

peft = pytest.importorskip("peft")

from lorasurg.io.adapter import CONFIG_NAME, WEIGHTS_NAME, Adapter  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.tok = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(3, 6, 3)
        self.conv1 = nn.Conv1d(3, 4, 2)
        self.lin = nn.Linear(8, 8)
        self.nobias = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 2)


CONFIGS = {
    "dora": dict(r=2, target_modules=["emb", "conv", "lin"], use_dora=True),
    "bias_mts": dict(r=2, target_modules=["conv", "lin", "nobias"], lora_bias=True, modules_to_save=["head"]),
    "tokens": dict(r=2, target_modules=["lin"], trainable_token_indices={"tok": [1, 3]}),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["lin", "conv1", "nobias"], use_rslora=True,
                     rank_pattern={"conv1": 2}, alpha_pattern={"nobias": 3}),
}


def _peft_saved(tmp_path, name):
    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(init_lora_weights=False, **CONFIGS[name]))
    model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft" / "default" if (tmp_path / "peft" / "default").exists() else tmp_path / "peft"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_peft_adapter_round_trips_losslessly(tmp_path, name):
    src = _peft_saved(tmp_path, name)
    Adapter.load(src).save(tmp_path / "ours")
    theirs, ours = load_file(src / WEIGHTS_NAME), load_file(tmp_path / "ours" / WEIGHTS_NAME)
    assert theirs.keys() == ours.keys()
    for key in theirs:
        assert theirs[key].dtype == ours[key].dtype and torch.equal(theirs[key], ours[key]), key
    peft_cfg = peft.LoraConfig.from_pretrained(str(src)).to_dict()
    our_cfg = peft.LoraConfig.from_pretrained(str(tmp_path / "ours")).to_dict()
    assert our_cfg == peft_cfg


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_peft_loads_our_save_with_no_missing_keys(tmp_path, name):
    src = _peft_saved(tmp_path, name)
    Adapter.load(src).save(tmp_path / "ours")
    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(Net(), str(tmp_path / "ours"))
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    ours = load_file(tmp_path / "ours" / WEIGHTS_NAME)
    in_model = peft.get_peft_model_state_dict(loaded)
    assert in_model.keys() == ours.keys()
    for key, tensor in ours.items():
        assert torch.equal(in_model[key], tensor), key

def test_config_json_is_peft_shaped(tmp_path):
    src = _peft_saved(tmp_path, "patterns")
    Adapter.load(src).save(tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    theirs = json.loads((src / CONFIG_NAME).read_text())
    assert list(ours) == sorted(ours)  # keys sorted, like PEFT
    ours.pop("peft_version", None), theirs.pop("peft_version", None)
    theirs["target_modules"] = sorted(theirs["target_modules"])
    assert ours == theirs
