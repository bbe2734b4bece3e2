"""MoE and multimodal adapters on the command line: ``validate --for`` reports each consumer's layout conditions from
the adapter's keys alone; the same adapter written by ``prepare_for`` (or re-ranked by ``rerank``, which writes
through it) validates clean."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from lorasurg import Checkpoint
from lorasurg.cli import main
from lorasurg.consumers import prepare_for
from lorasurg.consumers.layouts import checkpoint_experts, expert_groups, layout_violations
from lorasurg.io.adapter import Adapter
from tests.consumers.test_layouts import PROJ, experts, write


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def broken(tmp_path):
    """Expert 3 of layer 1 missing, expert 0's gate_proj at rank 2, lora_dropout 0.05."""
    mods = experts(skip=tuple(f"model.layers.1.mlp.experts.3.{p}" for p in PROJ),
                   rank=lambda n: 2 if n.endswith("experts.0.gate_proj") else None)
    return write(tmp_path / "moe", mods, lora_dropout=0.05,
                 rank_pattern={r"^model\.layers\.\d\.mlp\.experts\.0\.gate_proj": 2})


def findings(result) -> set[tuple[str, str]]:
    data = json.loads(result.stdout)
    return {(f["code"], f["where"].split(":")[0]) for f in data["findings"]}


def test_validate_for_reports_each_consumers_layout_conditions(tmp_path):
    result = run("validate", broken(tmp_path), "--for", "vllm,llama.cpp", "--json")
    assert result.exit_code == 1, result.output
    found = findings(result)
    assert {("expert-missing", "model.layers.1.mlp.experts"),
            ("expert-rank", "model.layers.0.mlp.experts.0.gate_proj and 1 more"),
            ("parameter-refused", "model.layers.0.mlp.experts.0.down_proj and 20 more")} <= found
    assert {("consumer-refuses", "vllm"), ("consumer-refuses", "llama.cpp")} <= found
    text = run("validate", broken(tmp_path / "t"), "--for", "vllm")
    assert "model.layers.1.mlp.experts: expert(s) 3 of 4 missing" in text.output


def test_validate_with_a_qwen2_moe_base_reports_the_dropped_experts(tmp_path):
    """With --base the model type is known: PEFT converts no per-expert adapter for Qwen2-MoE (fixtures/moe)."""
    base = Path(__file__).resolve().parents[2] / "fixtures" / "moe" / "qwen2_moe" / "base"
    blocks = sorted(checkpoint_experts(Checkpoint.open(base).names()).items())
    mods = {f"{block}.{e}.{p}": (4, *shape) for block, n in blocks for e in range(n) for p, shape in
            {"gate_proj": (16, 32), "up_proj": (16, 32), "down_proj": (32, 16)}.items()}
    result = run("validate", write(tmp_path / "a", mods), "--base", base, "--json")
    (dropped,) = [f for f in json.loads(result.stdout)["findings"] if f["code"] == "expert-unconverted"]
    assert "qwen2_moe" in dropped["message"] and len(dropped["modules"]) == len(mods)


def test_prepared_adapter_validates_clean(tmp_path):
    prepared, report = prepare_for(Adapter.load(broken(tmp_path)), "all")
    prepared.save(tmp_path / "prepared")
    result = run("validate", tmp_path / "prepared", "--for", "all", "--json")
    assert result.exit_code == 0, result.output
    assert {code for code, _ in findings(result)} <= {"check-skipped", "consumer-max-rank"}


def test_rerank_of_a_per_expert_adapter_keeps_one_rank(tmp_path):
    """A rank policy gives each expert its own rank; rerank writes through prepare_for, which pads the experts back
    to one rank, so PEFT, vLLM and llama.cpp still load the result."""
    path = write(tmp_path / "moe", experts(r=6), r=6, lora_alpha=12)
    result = run("rerank", path, "--rank-policy", "energy:0.6", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = Adapter.load(tmp_path / "out")
    ranks = {out.modules[m].rank for g in expert_groups(out.modules).values() for m in g.modules.values()}
    assert ranks == {out.config.r}
    assert all(layout_violations(out, c) == [] for c in ("peft", "vllm", "llama.cpp"))
