"""``prepare_for`` on MoE and multimodal adapters (tiny, hand-made, written to safetensors and read back): per-expert
LoRA is completed and padded losslessly so that every consumer's conditions hold; what a consumer cannot carry
(fused experts for llama.cpp, towers for vLLM and llama.cpp) is left out with its share; every consumer then
computes PEFT's delta of the input on every module that is kept."""

from __future__ import annotations

import math

import pytest
import torch

from lorasurg.consumers import consumer_delta, consumer_findings, prepare_for
from lorasurg.consumers.layouts import expert_groups, layout_violations
from lorasurg.engine.factors import delta_matrix
from tests.conftest import assert_close_ulps
from tests.consumers.test_layouts import H, I, PROJ, experts, load

ALL = ("peft", "vllm", "llama.cpp")


def same_deltas(old, new, consumers):
    """Every module of ``old`` kept in ``new`` gives each consumer PEFT's delta of ``old``; added modules give 0."""
    for name, mod in new.modules.items():
        for c in consumers:
            got = delta_matrix(consumer_delta(new, c, name))
            if name in old.modules:  # rescaled factors: float32 rounding of sqrt(c) A and sqrt(c) B, then B @ A
                want = delta_matrix(consumer_delta(old, "peft", name))
                assert_close_ulps(got, want, 16, magnitude=want.abs().max().item(), msg=f"{c} {name}")
            else:
                assert torch.count_nonzero(got) == 0, name


def broken_moe(tmp_path):
    """Expert 3 of layer 1 missing, down_proj missing in layer 0, expert 0's gate_proj at rank 2 (alpha 8: its own
    scale 4), one expert with its own alpha, lora_dropout 0.05, and an attention module at rank 8."""
    mods = experts(skip=(*(f"model.layers.1.mlp.experts.3.{p}" for p in PROJ),
                         *(f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(4))),
                   rank=lambda n: 2 if n.endswith("experts.0.gate_proj") else None)
    mods["model.layers.0.self_attn.q_proj"] = (8, H, H)
    return load(tmp_path, mods, lora_dropout=0.05, target_modules=["gate_proj", "up_proj", "q_proj"],
                rank_pattern={r"^model\.layers\.\d\.mlp\.experts\.0\.gate_proj": 2, "q_proj": 8},
                alpha_pattern={r"^model\.layers\.0\.mlp\.experts\.2\.up_proj": 16, "q_proj": 4})


@pytest.mark.parametrize("names", ["peft", "vllm", "llama.cpp", "all"])
def test_per_expert_adapter_is_completed_for_every_consumer(tmp_path, names):
    old = broken_moe(tmp_path)
    assert {v.condition.code for v in layout_violations(old, "peft")} == {
        "all-experts", "all-projections", "one-rank", "one-alpha", "plain-options"}
    new, report = prepare_for(old, names)
    consumers = ALL if names == "all" else (names,)
    for c in {"peft", *consumers}:
        assert layout_violations(new, c) == [], c
    assert [f for f in consumer_findings(new, consumers) if f.severity == "error"] == []
    same_deltas(old, new, consumers)
    groups = expert_groups(new.modules)
    assert all(len(g.modules) == 4 * 3 for g in groups.values())
    assert {new.modules[m].rank for g in groups.values() for m in g.modules.values()} == {new.config.r}
    assert "down_proj" in new.config.target_modules and report.experts.targets_added == ["down_proj"]
    assert new.config.lora_dropout == 0.0 and any("lora_dropout=0.05 is written as 0" in n for n in report.notes)
    assert len(report.experts.added) == 3 + 4 and set(report.experts.padded) == {
        "model.layers.0.mlp.experts.0.gate_proj", "model.layers.1.mlp.experts.0.gate_proj"}
    assert report.to_dict()["experts"]["rank"] == 4 and "zero factors" in report.render()


def test_experts_at_the_config_globals_for_peft(tmp_path):
    """For PEFT alone: experts at r and lora_alpha (no pattern, no rsLoRA), other modules keep their own scale
    through anchored patterns."""
    old = load(tmp_path, {**experts(), "model.layers.0.self_attn.q_proj": (8, H, H)}, use_rslora=True, r=4,
               lora_alpha=8, rank_pattern={"q_proj": 8})
    new, report = prepare_for(old, "peft")
    cfg = new.config
    assert report.layout == "experts" and not cfg.use_rslora and (cfg.r, cfg.lora_alpha) == (4, 16)
    assert cfg.rank_pattern == {r"^model\.layers\.0\.self_attn\.q_proj": 8}
    assert cfg.alpha_pattern == {r"^model\.layers\.0\.self_attn\.q_proj": 8 * 8 / math.sqrt(8)}
    same_deltas(old, new, ("peft",))


def test_adapter_without_experts_keeps_peft_layout(tmp_path):
    old = load(tmp_path, {"model.layers.0.self_attn.q_proj": (4, H, H)}, use_rslora=True)
    new, report = prepare_for(old, "peft")
    assert report.layout == "patterns" and new.config.use_rslora and report.experts.rank == 0


def test_lora_bias_left_out_for_peft_with_experts(tmp_path):
    """PEFT's ParamWrapper refuses lora_bias: with expert LoRA, the biases are left out and listed with their
    share (the rest of the delta is kept exactly)."""
    old = load(tmp_path, experts(layers=1))
    for mod in old.modules.values():
        mod.bias = torch.full((mod.B.shape[0],), 0.5)
    old.config.lora_bias = True
    new, report = prepare_for(old, "peft")
    assert not new.config.lora_bias and all(m.bias is None for m in new.modules.values())
    left = report.left_out_for("peft")
    assert len(left) == 12 and {x.feature for x in left} == {"lora_bias"} and all(x.share > 0 for x in left)
    assert "ParamWrapper" in left[0].reason


def test_fused_experts_left_out_for_llama_cpp_and_vllm(tmp_path):
    E, r = 4, 2
    mods = {"model.layers.0.mlp.experts.base_layer": (r * E, 2 * I, H), "model.layers.0.mlp.experts": (r * E, H, I),
            "model.layers.0.self_attn.q_proj": (r, H, H)}
    old = load(tmp_path, mods, r=r, target_modules=["q_proj"], target_parameters=["gate_up_proj", "down_proj"])
    for names in ("llama.cpp", "vllm"):
        new, report = prepare_for(old, names)
        assert list(new.modules) == ["model.layers.0.self_attn.q_proj"] and new.config.target_parameters is None
        left = {x.name: x for x in report.left_out_for(names)}
        assert set(left) == {"model.layers.0.mlp.experts.base_layer", "model.layers.0.mlp.experts"}
        assert all(x.feature == "moe_target_parameters" and x.share > 0 for x in left.values())
    kept, report = prepare_for(old, "peft")
    assert set(kept.modules) == set(mods) and kept.config.target_parameters == ["gate_up_proj", "down_proj"]


def test_vllm_keeps_fused_experts_for_the_types_it_reads_them_for(tmp_path):
    """With the base's model_type, vLLM's model-dependent rule on fused experts is resolved: gpt-oss (an
    is_3d_moe_weight class) reads them, Qwen2-MoE (2-D experts in vLLM) refuses them."""
    E, r = 4, 2
    mods = {"model.layers.0.mlp.experts.base_layer": (r * E, 2 * I, H), "model.layers.0.mlp.experts": (r * E, H, I),
            "model.layers.0.self_attn.q_proj": (r, H, H)}
    old = load(tmp_path, mods, r=r, target_modules=["q_proj"], target_parameters=["gate_up_proj", "down_proj"])
    kept, report = prepare_for(old, "vllm", model_type="gpt_oss")
    assert set(kept.modules) == set(mods) and report.left_out == []
    assert not [f for f in consumer_findings(kept, "vllm", model_type="gpt_oss") if "moe_target" in f.code]
    dropped, report = prepare_for(old, "vllm", model_type="qwen2_moe")
    assert list(dropped.modules) == ["model.layers.0.self_attn.q_proj"]
    codes = {f.code for f in consumer_findings(old, "vllm", model_type="qwen2_moe")}
    assert "refuses:moe_target_parameters" in codes and "model-dependent:moe_target_parameters" not in codes


def test_vision_tower_left_out_for_vllm_and_llama_cpp(tmp_path):
    mods = {"model.visual.blocks.0.attn.qkv": (4, 3 * H, H), "model.visual.merger.mlp.0": (4, H, H),
            "model.language_model.layers.0.self_attn.q_proj": (4, H, H),
            "model.vision_tower.encoder.layers.0.self_attn.q_proj": (4, H, H)}
    old = load(tmp_path, mods, target_modules=["qkv", "0", "q_proj"])
    for names in ("vllm", "llama.cpp", "all"):
        new, report = prepare_for(old, names)
        assert list(new.modules) == ["model.language_model.layers.0.self_attn.q_proj"], names
        assert new.config.target_modules == {"q_proj"}
        assert new.config.exclude_modules == {"model.vision_tower.encoder.layers.0.self_attn.q_proj"}
        total = sum(x.share for x in report.left_out)
        assert 0 < total < 1 and {x.feature for x in report.left_out} == {"vision_tower"}
    new, _ = prepare_for(old, "peft")
    assert set(new.modules) == set(mods)


def test_checkpoint_tower_names_left_out_for_peft_with_their_share(tmp_path):
    old = load(tmp_path, {"visual.blocks.0.attn.qkv": (4, 3 * H, H), "model.layers.0.self_attn.q_proj": (4, H, H)})
    new, report = prepare_for(old, "peft")
    assert list(new.modules) == ["model.layers.0.self_attn.q_proj"]
    (x,) = report.left_out_for("peft")
    assert x.name == "visual.blocks.0.attn.qkv" and x.feature == "checkpoint_tower_names" and 0 < x.share < 1


def test_shared_experts_kept_with_a_note(tmp_path):
    mods = {**experts(), "model.layers.0.mlp.shared_experts.gate_proj": (4, I, H)}
    new, report = prepare_for(load(tmp_path, mods), "all")
    assert "model.layers.0.mlp.shared_experts.gate_proj" in new.modules
    (note,) = [n for n in report.notes if "outside the routed experts" in n]
    assert "target_parameters" in note and "vLLM and llama.cpp read them" in note
