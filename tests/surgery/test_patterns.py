"""Per-module ranks and scales as config fields: PEFT reads back exactly the scale each module was given."""

from __future__ import annotations

import math

import pytest

from lorasurg.config import LoraConfig
from lorasurg.engine.factors import lora_scale
from lorasurg.surgery.patterns import derive_config, rank_scale_fields
from lorasurg.targeting import alpha_value
from lorasurg.targeting import anchored_pattern_key, rank_alpha

MODULES = ["model.layers.0.q", "model.layers.0.v", "model.layers.1.q", "model.layers.1.v", "lm_head"]


@pytest.mark.parametrize("rslora", [False, True])
def test_every_module_reads_back_its_rank_and_scale(rslora):
    wanted = {"model.layers.0.q": (8, 2.0), "model.layers.0.v": (8, 0.5), "model.layers.1.q": (4, 2.0),
              "model.layers.1.v": (8, 2.0), "lm_head": (3, 1 / 3)}
    fields = rank_scale_fields(wanted, use_rslora=rslora)
    cfg = LoraConfig(target_modules=MODULES, use_rslora=rslora, **fields)
    assert cfg.r == 8
    for module, (rank, scale) in wanted.items():
        r, alpha = rank_alpha(cfg, module)
        assert r == rank and lora_scale(r, alpha, rslora) == pytest.approx(scale, rel=1e-12), module
    # only the modules that differ from the global r / alpha get pattern keys, each anchored to one module
    assert set(fields["rank_pattern"]) == {anchored_pattern_key("model.layers.1.q"), anchored_pattern_key("lm_head")}
    assert anchored_pattern_key("model.layers.0.q") not in fields["alpha_pattern"]
    assert anchored_pattern_key("model.layers.0.v") in fields["alpha_pattern"]


def test_one_scale_one_rank_needs_no_patterns():
    fields = rank_scale_fields({m: (16, 2.0) for m in MODULES})
    assert fields == {"r": 16, "lora_alpha": 32, "rank_pattern": {}, "alpha_pattern": {}}
    assert isinstance(fields["lora_alpha"], int)


def test_alpha_value_is_an_int_when_integral_to_rounding():
    assert alpha_value(3.0000000000000004) == 3 and isinstance(alpha_value(3.0000000000000004), int)
    assert alpha_value(2.5) == 2.5 and isinstance(alpha_value(2.5), float)
    assert alpha_value(4 * math.sqrt(2) / math.sqrt(2)) == 4


def test_refusals():
    with pytest.raises(ValueError, match="at least one module"):
        rank_scale_fields({})
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        rank_scale_fields({"a": (0, 1.0)})


def test_derive_config_keeps_unknown_keys_and_validates():
    with pytest.warns(UserWarning, match="does not know"):
        cfg = LoraConfig.from_dict({"r": 4, "lora_alpha": 8, "target_modules": ["q"], "peft_version": "0.1",
                                    "future_field": 1})
    derived = derive_config(cfg, r=2, lora_alpha=4)
    assert derived.r == 2 and derived.lora_alpha == 4 and derived.peft_version is None
    assert derived.unknown_keys == {"future_field": 1}
    assert cfg.r == 4  # the input is not changed
    with pytest.raises(ValueError):
        derive_config(cfg, r=0)
