"""``residualize`` on MoE and multimodal checkpoints, without PEFT: targets selected by the model's names, gpt-oss's
stored experts factored one by one (the residual of each expert ``W[e].T`` plus its delta is BASE), the budget of a
stored expert tensor, ``--for vllm`` writing experts per expert (still adding back to BASE), and the refusal of
``--for llama.cpp`` with experts stored fused, whose suggested exclusion works (through the CLI)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lorasurg.cli import main
from lorasurg.engine.experts import expert_deltas, split_experts
from lorasurg.errors import ConfigError
from lorasurg.io.adapter import Adapter
from lorasurg.io.checkpoint import Checkpoint
from lorasurg.surgery.residualize import residualize
from tests.conftest import assert_close_ulps

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
GPT_OSS, QWEN3 = FIXTURES / "moe" / "gpt_oss" / "base", FIXTURES / "moe" / "qwen3_moe" / "base"
QWEN2_VL = FIXTURES / "vlm" / "qwen2_vl" / "base"
EXPERTS = "model.layers.0.mlp.experts"


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_gpt_oss_stored_experts_are_factored_one_by_one(tmp_path, init):
    report = residualize(GPT_OSS, tmp_path / "out", init=init, r=4, target_modules=["gate_up_proj", "down_proj"],
                         device="cpu")
    rows = {m.module: m for m in report.modules}
    assert set(rows) == {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")}
    assert all(m.kind == "experts" and m.rank == 4 and 0 < m.energy_taken < 1 for m in rows.values())
    adapter = Adapter.load(tmp_path / "out" / "adapter")
    assert adapter.config.target_parameters == sorted(rows) and adapter.config.target_modules is None
    with Checkpoint.open(GPT_OSS) as base, Checkpoint.open(tmp_path / "out" / "model") as model:
        assert model.names() == base.names()
        for leaf, path in (("gate_up_proj", f"{EXPERTS}.base_layer"), ("down_proj", EXPERTS)):
            mod = adapter.modules[path]
            A, B = split_experts(mod.A, mod.B, 4)  # (E, r, in), (E, out, r)
            stored = base.get(f"{EXPERTS}.{leaf}")  # (E, in, out)
            back = model.get(f"{EXPERTS}.{leaf}").double() + expert_deltas(A.double(), B.double(), 1.0, True)
            assert_close_ulps(back.float(), stored, 16, magnitude=stored.abs().max())
            assert not torch.equal(model.get(f"{EXPERTS}.{leaf}"), stored)
        assert torch.equal(model.get(f"{EXPERTS}.gate_up_proj_bias"), base.get(f"{EXPERTS}.gate_up_proj_bias"))


def test_targets_are_selected_by_the_models_names(tmp_path):
    report = residualize(QWEN2_VL, tmp_path / "out", init="olora", r=2, device="cpu",
                         target_modules=r"model\.language_model\.layers\.0\.self_attn\.q_proj|model\.visual.*\.qkv")
    assert {m.module for m in report.modules} == {"model.layers.0.self_attn.q_proj", "visual.blocks.0.attn.qkv",
                                                  "visual.blocks.1.attn.qkv"}  # factored under BASE's keys
    adapter = Adapter.load(tmp_path / "out" / "adapter")
    assert set(adapter.modules) == {"model.language_model.layers.0.self_attn.q_proj",
                                    "model.visual.blocks.0.attn.qkv", "model.visual.blocks.1.attn.qkv"}


def test_a_stored_expert_tensor_is_budgeted_one_expert_at_a_time(tmp_path):
    with pytest.raises(ConfigError) as info:
        residualize(GPT_OSS, tmp_path / "out", init="pissa", r=4, target_modules=["gate_up_proj"], max_memory="10KB")
    message = str(info.value)
    assert re.search(r"model\.layers\.\d\.mlp\.experts\.gate_up_proj needs [\d.]+ KB to hold it whole \(PiSSA's SVD "
                     r"needs the whole matrix \(one expert at a time\)\)", message), message
    assert list(tmp_path.iterdir()) == []
    smallest = re.search(r"Use --max-memory (\S+) or more", message).group(1)
    report = residualize(GPT_OSS, tmp_path / "out", init="pissa", r=4, target_modules=["gate_up_proj"],
                         max_memory=smallest)
    assert len(report.modules) == 2


@pytest.mark.parametrize("consumer", ["vllm", "llama.cpp"])
def test_for_another_consumer_experts_are_written_per_expert_and_add_back_to_base(tmp_path, consumer):
    """--for vllm/llama.cpp on a checkpoint that stores experts one by one: the initial adapter keeps every expert
    under its own key (the layout those consumers read), and OUT/model + OUT/adapter is still BASE."""
    result = CliRunner().invoke(main, ["residualize", str(QWEN3), "--r", "2", "--for", consumer, "--device", "cpu",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    adapter = Adapter.load(tmp_path / "out" / "adapter")
    assert adapter.config.target_parameters is None
    with Checkpoint.open(QWEN3) as base, Checkpoint.open(tmp_path / "out" / "model") as model:
        experts = sorted(base.describe().experts)
        assert experts and set(experts) <= set(adapter.modules)
        for module in experts:
            mod, weight = adapter.modules[module], f"{module}.weight"
            scale = adapter.config.lora_alpha / mod.rank
            back = model.get(weight).double() + scale * mod.B.double() @ mod.A.double()
            assert_close_ulps(back.float(), base.get(weight), 16, magnitude=base.get(weight).abs().max())


def test_cli_refuses_llama_cpp_with_experts_stored_fused_and_names_the_exclusion(tmp_path):
    """llama.cpp's converter cannot place gpt-oss's fused-expert LoRA, and residualize leaves nothing out: refused
    before any work, naming the targets to exclude; excluding exactly those then succeeds (vLLM reads them:
    tests/parity/test_residualize_moe.py)."""
    result = CliRunner().invoke(main, ["residualize", str(GPT_OSS), "--r", "2", "--for", "llama.cpp", "-o",
                                       str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    suggested = re.search(r"--exclude-modules (\S+)\)", result.output).group(1).split(",")
    assert suggested == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")]
    excluded = CliRunner().invoke(main, ["residualize", str(GPT_OSS), "--r", "2", "--for", "llama.cpp",
                                         "--exclude-modules", ",".join(suggested), "-o", str(tmp_path / "out")])
    assert excluded.exit_code == 0, excluded.output
    assert Adapter.load(tmp_path / "out" / "adapter").config.target_parameters is None
