"""validate, inspect, rerank and merge on MoE and multimodal adapters: invariants of the per-expert handling, and
the CLI on good and bad inputs (PEFT's view of the same adapters: tests/parity/test_validate_moe_parity.py and
test_moe_rerank_merge_parity.py)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lorasurg import Adapter, InputError, merge_adapters, rerank, validate
from lorasurg.cli import main
from lorasurg.engine.experts import expert_deltas, split_experts
from lorasurg.surgery.expert_groups import expert_groups, parameter_loras
from lorasurg.surgery.expert_ranks import split_parameter_loras
from lorasurg.surgery.inspect import inspect_adapter

from tests.surgery.moe_adapters import base_of, checkpoint_named, family_adapter

QWEN3 = "qwen3_moe"


def _save(adapter, path):
    adapter.save(path, force=True)
    return path


# ------------------------------------------------------------------------------------------ finding the layouts


def test_parameter_loras_from_names_match_the_models_order():
    """gpt-oss's experts module holds gate_up_proj, its bias, down_proj, its bias: without the model the known order
    nests gate_up_proj inside down_proj, as the model's positions do."""
    adapter = family_adapter("gpt_oss")
    by_name = parameter_loras(adapter)
    with_model = parameter_loras(adapter, {"model.layers.0.mlp.experts.gate_up_proj": 0,
                                           "model.layers.0.mlp.experts.down_proj": 2})
    assert by_name == with_model
    lora = by_name["model.layers.0.mlp.experts.base_layer"]
    assert (lora.parameter, lora.experts, lora.rank) == ("model.layers.0.mlp.experts.gate_up_proj", 4, 2)
    assert "model.layers.0.self_attn.q_proj" not in by_name  # target_modules selects it: a LoRA on the module


def test_bare_entries_and_parameter_ranks():
    """PEFT's converted configs name bare leaves and give gate_up_proj its rank by pattern."""
    adapter = family_adapter(QWEN3, form="target-parameters")
    adapter.config.target_parameters = ["gate_up_proj", "down_proj"]
    adapter.config.rank_pattern = {r".*\.gate_up_proj": 4}
    adapter.config.r = 2
    found = parameter_loras(adapter)
    assert {lora.experts for lora in found.values()} == {4}
    assert {lora.leaf: lora.rank for lora in found.values()} == {"gate_up_proj": 4, "down_proj": 2}


def test_expert_groups_per_layer_and_projection():
    groups = expert_groups(family_adapter("mixtral").modules)
    assert sorted(groups) == [f"model.layers.{i}.block_sparse_moe.experts.*.{w}" for i in (0, 1) for w in
                              ("w1", "w2", "w3")]
    assert all(list(g) == [0, 1, 2, 3] for g in groups.values())


def test_split_gives_each_expert_the_parameters_rank_and_alpha():
    adapter = family_adapter("gpt_oss", r=3, alpha=1.5)
    split = split_parameter_loras(adapter)
    name = "model.layers.1.mlp.experts.down_proj[2]"
    A, B = split_experts(adapter.modules["model.layers.1.mlp.experts"].A, adapter.modules["model.layers.1.mlp.experts"].B, 4)
    assert torch.equal(split.adapter.modules[name].A, A[2]) and torch.equal(split.adapter.modules[name].B, B[2])
    assert split.adapter.rank_alpha(name) == (3, 1.5)
    assert split.adapter.rank_alpha("model.layers.0.self_attn.q_proj") == (3, 1.5)


# ------------------------------------------------------------------------------------------------- inspect


def test_inspect_splits_target_parameters_per_expert(tmp_path):
    adapter = family_adapter("gpt_oss")
    report = inspect_adapter(_save(adapter, tmp_path / "a"), base_of("gpt_oss"))
    rows = {m.name: m for m in report.modules}
    mod = adapter.modules["model.layers.0.mlp.experts.base_layer"]
    deltas = expert_deltas(*split_experts(mod.A, mod.B, 4), scale=2.0)  # (E, out, in)
    for e in range(4):
        row = rows[f"model.layers.0.mlp.experts.gate_up_proj[{e}]"]
        assert row.rank == 2 and row.A_shape == [2, 32]
        assert abs(row.delta_norm - float(deltas[e].norm())) <= 1e-5 * float(deltas[e].norm())
        assert row.relative_norm is not None
    groups = {g.group: g for g in report.expert_groups}
    gate_up = groups["model.layers.0.mlp.experts.gate_up_proj"]
    assert (gate_up.layout, gate_up.experts, gate_up.ranks) == ("target_parameters", 4, [2])
    assert abs(gate_up.delta_norm - float(deltas.norm())) <= 1e-5 * float(deltas.norm())
    assert report.saved_modules == len(adapter.modules) and "rows above" in report.render()


def test_inspect_groups_per_expert_modules(tmp_path):
    adapter = family_adapter(QWEN3)
    adapter.modules["model.layers.0.mlp.experts.1.up_proj"].B.zero_()
    report = inspect_adapter(_save(adapter, tmp_path / "a"), base_of(QWEN3))
    groups = {g.group: g for g in report.expert_groups}
    up = groups["model.layers.0.mlp.experts.*.up_proj"]
    assert (up.layout, up.experts, up.ranks, up.zero, up.min_norm) == ("per expert", 4, [2], 1, 0.0)
    assert sum(g.energy_share for g in report.expert_groups) < 1  # attention holds the rest
    assert "experts per layer and projection" in report.render()
    assert json.loads(json.dumps(report.to_dict()))["expert_groups"][0]["experts"] == 4


# -------------------------------------------------------------------------------------------- rerank, merge


def test_rerank_keeps_every_expert_at_the_global_rank(tmp_path):
    """A rank policy gives experts different ranks (one expert nothing): every expert ends at one rank, the config's
    r, with no per-expert pattern; the zero-filled expert is reported kept, not left out."""
    adapter = family_adapter(QWEN3, r=3)
    adapter.modules["model.layers.0.mlp.experts.2.down_proj"].B.zero_()
    result, report = rerank(adapter, rank_policy="energy:0.5")
    experts = {n: m for n, m in result.modules.items() if ".experts." in n}
    assert len(experts) == 24 and {m.rank for m in experts.values()} == {result.config.r}
    assert not any("experts" in key for key in result.config.rank_pattern)
    row = next(m for m in report.modules if m.module == "model.layers.0.mlp.experts.2.down_proj")
    assert row.new_rank == result.config.r and row.padded
    assert "model.layers.0.mlp.experts.2.down_proj" not in report.dropped
    assert any("zero-padded" in note for note in report.notes)
    assert validate(_save(result, tmp_path / "r"), base_of(QWEN3)) == []


def test_rerank_of_target_parameters_is_per_expert(tmp_path):
    adapter = family_adapter("gpt_oss", r=3)
    result, report = rerank(adapter, r=1)
    assert {m.module for m in report.modules} >= {f"model.layers.1.mlp.experts.down_proj[{e}]" for e in range(4)}
    lora = parameter_loras(result)["model.layers.1.mlp.experts"]
    assert (lora.experts, lora.rank) == (4, 1)
    assert result.config.target_parameters == adapter.config.target_parameters


def test_merge_of_different_targets_keeps_target_parameters(tmp_path):
    fused = family_adapter("gpt_oss", seed=1)
    attention = family_adapter("gpt_oss", seed=2, r=4, targets=("q_proj", "k_proj"))
    merged, _ = merge_adapters([fused, attention], method="cat")
    assert merged.config.target_parameters == sorted(fused.config.target_parameters)
    assert "model.layers.0.mlp.experts" not in (merged.config.target_modules or ())
    assert validate(_save(merged, tmp_path / "m"), base_of("gpt_oss")) == []


def test_merge_refuses_two_layouts_of_one_layers_experts():
    with pytest.raises(InputError, match=r"model.layers.0.mlp.experts: adapter 0 has its experts per expert"):
        merge_adapters([family_adapter(QWEN3), family_adapter(QWEN3, form="target-parameters")])


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_validate_and_fix_a_checkpoint_named_vlm_adapter(tmp_path):
    path = _save(checkpoint_named(family_adapter("qwen2_vl"), "qwen2_vl"), tmp_path / "a")
    base = str(base_of("qwen2_vl"))
    runner = CliRunner()
    result = runner.invoke(main, ["validate", str(path), "--base", base, "--json"])
    assert result.exit_code == 1
    found = json.loads(result.stdout)["findings"]
    assert [f["code"] for f in found] == ["key-checkpoint-name"] and len(found[0]["modules"]) == 10
    fixed = runner.invoke(main, ["validate", str(path), "--base", base, "--fix", "-o", str(tmp_path / "fixed")])
    assert fixed.exit_code == 0, fixed.output
    assert "renamed to the model's names" in fixed.output
    assert set(Adapter.load(tmp_path / "fixed").modules) == set(family_adapter("qwen2_vl").modules)


def test_cli_merge_of_two_layouts_is_exit_2_and_writes_nothing(tmp_path):
    a = _save(family_adapter(QWEN3), tmp_path / "a")
    b = _save(family_adapter(QWEN3, form="target-parameters"), tmp_path / "b")
    result = CliRunner().invoke(main, ["merge", str(a), str(b), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "has its experts per expert" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cli_inspect_and_rerank_target_parameters(tmp_path):
    path = _save(family_adapter(QWEN3, form="target-parameters"), tmp_path / "a")
    runner = CliRunner()
    shown = runner.invoke(main, ["inspect", str(path), "--base", str(base_of(QWEN3))])
    assert shown.exit_code == 0 and "model.layers.1.mlp.experts.gate_up_proj[3]" in shown.output
    reranked = runner.invoke(main, ["rerank", str(path), "--r", "1", "-o", str(tmp_path / "r1")])
    assert reranked.exit_code == 0, reranked.output
    assert validate(tmp_path / "r1", base_of(QWEN3)) == []


@pytest.mark.parametrize("command", ["rerank", "merge"])
def test_cli_for_consumers_with_target_parameters_is_refused_by_name(tmp_path, command):
    path = _save(family_adapter("gpt_oss"), tmp_path / "a")
    args = [command, str(path)] + (["--r", "1"] if command == "rerank" else [str(path)])
    result = CliRunner().invoke(main, args + ["--for", "vllm", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "model.layers.0.mlp.experts.down_proj" in result.output and "cannot rewrite yet" in result.output
    assert not (tmp_path / "out").exists()
