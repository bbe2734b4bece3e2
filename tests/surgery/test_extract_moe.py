"""``extract`` on mixture-of-experts checkpoints (fixtures/moe/*): the expert groups, their batched fit, the rank
rule, lost tensors (``allow_dropped``) and the ``--for`` refusal. PEFT loading is in tests/parity/test_extract_moe.py.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorasurg.errors import InputError, UnsupportedError
from lorasurg.io.checkpoint import Checkpoint
from lorasurg.surgery.extract import extract
from lorasurg.surgery.extract.build import Collected
from lorasurg.surgery.extract.experts import expert_groups, fit_group
from lorasurg.surgery.extract.plan import plan_roles

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "moe"


def pair(family: str) -> tuple[Path, Path]:
    return FIXTURES / family / "base", FIXTURES / family / "tuned"


def variant(tmp_path: Path, family: str, edit) -> tuple[Path, Path]:
    """A copy of a family's pair whose tensors went through ``edit(side, state)`` (side ``base`` or ``tuned``)."""
    for side in ("base", "tuned"):
        shutil.copytree(FIXTURES / family / side, tmp_path / side)
        path = tmp_path / side / "model.safetensors"
        state = load_file(str(path))
        edit(side, state)
        save_file(state, str(path), metadata={"format": "pt"})
    return tmp_path / "base", tmp_path / "tuned"


def dominant(base: torch.Tensor, seed: int) -> torch.Tensor:
    """``base`` plus a delta with one dominant direction and a small full-rank tail (energy:0.9 keeps rank 1)."""
    gen = torch.Generator().manual_seed(seed)
    out_f, in_f = base.shape
    u, v = torch.randn(out_f, 1, generator=gen), torch.randn(1, in_f, generator=gen)
    tail = 0.02 * torch.randn(out_f, in_f, generator=gen)
    return base + (u @ v) / math.sqrt(out_f * in_f) * 4 + tail / math.sqrt(in_f)  # (out, 1) @ (1, in)


def optimal_error(delta: torch.Tensor, rank: int) -> float:
    S = torch.linalg.svdvals(delta.double())
    return float(S[rank:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())


# ------------------------------------------------------------------------------------------------ groups


def test_groups_are_the_experts_of_one_projection_and_layer():
    base = Checkpoint.open(pair("qwen3_moe")[0])
    description = base.describe()
    roles = plan_roles(base.names(), base.module_infos(), input_embedding="model.embed_tokens")
    groups = expert_groups(roles, description)
    assert sorted(groups) == sorted(f"model.layers.{layer}.mlp.experts.{p}" for layer in (0, 1)
                                    for p in ("gate_up_proj[0]", "gate_up_proj[1]", "down_proj"))
    up = groups["model.layers.0.mlp.experts.gate_up_proj[1]"]
    assert up.members == tuple(f"model.layers.0.mlp.experts.{e}.up_proj.weight" for e in range(4))
    assert up.shape == (16, 32) and up.stored is None
    stored = Checkpoint.open(pair("gpt_oss")[0])
    roles = plan_roles(stored.names(), stored.module_infos(), input_embedding="model.embed_tokens",
                       stored_experts=[p.stored for p in stored.describe().parameters.values()])
    gate_up = expert_groups(roles, stored.describe())["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.members == ("model.layers.0.mlp.experts.gate_up_proj",) and gate_up.count == 4
    assert gate_up.shape == (32, 32) and gate_up.stored.transposed  # stored (E, in, out): expert e is stored[e].T


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_batches_of_any_size_give_the_same_fit(family):
    """Each expert draws its own seeded test matrix, so fitting a group in batches of 1 or of all its experts gives
    the same factors (to float32 rounding); an unchanged expert is not fitted."""
    base, tuned = (Checkpoint.open(p) for p in pair(family))
    description = base.describe()
    stored = [p.stored for p in description.parameters.values() if p.stored]
    roles = plan_roles(base.names(), base.module_infos(), input_embedding="model.embed_tokens", stored_experts=stored)
    group = next(g for g in expert_groups(roles, description).values() if ".layers.0." in g.name)
    fits = []
    for chunk in (1, 3, 4):
        run = Collected(scale=1.0, out_dtype=None, aliases={}, input_embedding=None)
        fits.append(fit_group(base, tuned, group, roles, run, torch.device("cpu"), r=4, policy=None,
                              svd="randomized", seed=0, chunk=chunk))
    assert fits[0].positions == [0, 1, 2]  # expert 3 of layer 0 is unchanged
    for other in fits[1:]:
        assert other.positions == fits[0].positions
        torch.testing.assert_close(other.B @ other.A, fits[0].B @ fits[0].A, rtol=1e-4, atol=1e-6)


def test_every_expert_within_one_percent_of_optimal():
    base, tuned = (Checkpoint.open(p) for p in pair("qwen3_moe"))
    adapter, report = extract(*pair("qwen3_moe"), r=4)
    fits = {f.module: f for f in report.fits}
    for e in range(4):
        module = f"model.layers.1.mlp.experts.{e}.down_proj"
        delta = tuned.get(f"{module}.weight") - base.get(f"{module}.weight")
        mod = adapter.modules[module]
        error = float(torch.linalg.vector_norm(delta - mod.B @ mod.A) / torch.linalg.vector_norm(delta))
        assert error <= 1.01 * optimal_error(delta, 4)
        assert fits[module].rel_error == pytest.approx(error, rel=1e-3)


# ------------------------------------------------------------------------------------------------ rank rule


def test_rank_policy_one_rank_for_every_expert_in_the_per_expert_form(tmp_path):
    """Qwen3-MoE (per-expert form: PEFT reads every expert at the global r): expert 0 of layer 1's gate_proj has one
    dominant direction (energy:0.9 gives it rank 1), the others rank 4; every expert is fitted at 4, which keeps
    more of expert 0's delta than its own rank 1 (zero-padded) would."""
    key = "model.layers.1.mlp.experts.0.gate_proj.weight"
    kept = {}

    def edit(side, state):
        if side == "base":
            kept["base"] = state[key].clone()
        else:
            state[key] = dominant(kept["base"], 3)

    base, tuned = variant(tmp_path, "qwen3_moe", edit)
    adapter, report = extract(base, tuned, r=16, rank_policy="energy:0.9")
    experts = {n: m for n, m in adapter.modules.items() if ".experts." in n}
    assert len(experts) == 2 * 4 * 3 and {m.rank for m in experts.values()} == {4}
    assert adapter.config.r == 4 and not any(".experts." in k for k in adapter.config.rank_pattern)
    fit = {f.module: f for f in report.fits}["model.layers.1.mlp.experts.0.gate_proj"]
    delta = Checkpoint.open(tuned).get(key) - Checkpoint.open(base).get(key)
    assert fit.rank == 4 and fit.rel_error <= 1.01 * optimal_error(delta, 4) < 0.9 * optimal_error(delta, 1)
    assert any("one rank is fitted for every expert of the model" in n and "ranks 1 to 4" in n for n in report.notes)


def test_rank_policy_one_rank_per_projection_and_layer_in_the_fused_form(tmp_path):
    """Qwen2-MoE (target_parameters): one rank per (parameter, part) group. Layer 1's gate experts all get rank 1,
    so its gate_up_proj is 1 + 4; in layer 0 only expert 0's gate is rank-1, so its group stays at 4 (and that
    expert is fitted at 4): gate_up_proj 4 + 4."""
    keys = [f"model.layers.1.mlp.experts.{e}.gate_proj.weight" for e in range(4)]
    keys.append("model.layers.0.mlp.experts.0.gate_proj.weight")
    kept = {}

    def edit(side, state):
        for i, key in enumerate(keys):
            if side == "base":
                kept[key] = state[key].clone()
            else:
                state[key] = dominant(kept[key], i)

    base, tuned = variant(tmp_path, "qwen2_moe", edit)
    adapter, report = extract(base, tuned, r=16, rank_policy="energy:0.9")
    ranks = adapter.config.rank_pattern
    r = adapter.config.r  # what PEFT reads where no pattern matches (the largest rank: no pattern of its own)
    assert ranks.get(r"^model\.layers\.1\.mlp\.experts\.gate_up_proj", r) == 5
    assert ranks.get(r"^model\.layers\.0\.mlp\.experts\.gate_up_proj", r) == 8
    assert ranks.get(r"^model\.layers\.1\.mlp\.experts\.down_proj", r) == 4
    assert adapter.modules["model.layers.1.mlp.experts.base_layer"].A.shape == (5 * 4, 32)  # (r E, in)
    assert any("one rank is fitted for the experts of each projection in a layer" in n for n in report.notes)


# ------------------------------------------------------------------------------------------------ lost tensors


def _bias_and_unplaced(side, state):
    if side == "tuned":
        state["model.layers.0.self_attn.q_proj.bias"] = state["model.layers.0.self_attn.q_proj.bias"] + 0.1
    state["model.layers.0.mlp.mystery"] = torch.full((4,), 2.0 if side == "tuned" else 1.0)


def test_lost_tensors_are_refused_without_allow_dropped(tmp_path):
    """Qwen2-MoE needs target_parameters, whose ParamWrapper refuses lora_bias: a changed q_proj bias cannot be
    carried; a key the model has no place for neither. Both are named with their share, and nothing is returned."""
    base, tuned = variant(tmp_path, "qwen2_moe", _bias_and_unplaced)
    with pytest.raises(InputError) as err:
        extract(base, tuned, r=4)
    message = str(err.value)
    assert "2 changed tensor(s) would be left out of the adapter, not by your choice" in message
    assert "model.layers.0.self_attn.q_proj.bias (" in message and "ParamWrapper refuses lora_bias" in message
    assert "model.layers.0.mlp.mystery (" in message and "has no parameter or buffer" in message
    assert "--allow-dropped" in message
    adapter, report = extract(base, tuned, r=4, allow_dropped=True)
    lost = {o.name: o for o in report.lost()}
    assert set(lost) == {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.mlp.mystery"}
    assert [d["name"] for d in report.to_dict()["lost"]] == [o.name for o in report.lost()]
    shares = [report.share(o) for o in lost.values()]
    assert sum(d["share"] for d in report.to_dict()["lost"]) == pytest.approx(sum(shares))
    assert adapter.config.lora_bias is False and adapter.config.target_parameters
    assert "left out with --allow-dropped" in report.render()


def test_the_users_own_choices_are_not_lost(tmp_path):
    base, tuned = variant(tmp_path, "qwen2_moe", _bias_and_unplaced)
    _, report = extract(base, tuned, r=4, lora_bias=False, exclude_modules=["model.layers.0.mlp.mystery"],
                        allow_dropped=False)
    assert report.lost() == []
    reasons = {o.name: o.reason for o in report.left_out()}
    assert "lora_bias is off" in reasons["model.layers.0.self_attn.q_proj.bias"]
    with pytest.raises(UnsupportedError, match="ParamWrapper refuses lora_bias"):
        extract(base, tuned, r=4, lora_bias=True)


def test_gpt_oss_expert_biases_beside_their_lora_are_lost(tmp_path):
    def edit(side, state):
        if side == "tuned":
            state["model.layers.0.mlp.experts.gate_up_proj_bias"] += 0.1

    base, tuned = variant(tmp_path, "gpt_oss", edit)
    with pytest.raises(InputError, match=r"gate_up_proj_bias \(.*modules_to_save on a module its ParamWrapper"):
        extract(base, tuned, r=4)
    _, report = extract(base, tuned, r=4, exclude_modules=r".*\.experts(\..*)?")  # the user's choice: no LoRA there
    assert report.lost() == []
    outcome = {o.name: o for o in report.outcomes}["model.layers.0.mlp.experts.gate_up_proj_bias"]
    assert outcome.outcome == "dropped" and "excluded" in outcome.reason


# ------------------------------------------------------------------------------------------------ --for


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("consumer", ["vllm", "llama.cpp"])
def test_for_a_consumer_follows_its_moe_rules(tmp_path, family, consumer):
    """--for writes what the consumer's MoE rules (lorasurg.consumers.layouts) say it reads: per-expert LoRA for
    every family that stores experts one by one; gpt-oss's fused target_parameters LoRA for vLLM (one of its 3-D MoE
    classes) and left out, with its share, for llama.cpp (its converter refuses them); validate --for is clean. On
    Qwen2-MoE, whose config PEFT 0.21.2 does not convert, the config lists the fused experts in target_parameters
    (the converted form), so that PEFT loads the per-expert keys as well (tests/parity/test_extract_moe.py)."""
    from lorasurg import validate

    adapter, report = extract(*pair(family), r=4, consumers=consumer)
    experts = [name for name in adapter.modules if ".experts" in name]
    left = {x.name for x in report.for_report.left_out}
    if family != "gpt_oss":
        assert experts and all(".experts." in name for name in experts)  # per-expert names, every one kept
    elif consumer == "vllm":
        assert experts and adapter.config.target_parameters
    else:
        assert not experts and any(".experts" in name for name in left)
    if family == "qwen2_moe":
        fused = [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")]
        assert sorted(adapter.config.target_parameters) == fused
        assert adapter.rank_alpha(fused[1]) == (2 * adapter.config.r, 2 * adapter.config.lora_alpha)
        assert adapter.rank_alpha(fused[0]) == (adapter.config.r, adapter.config.lora_alpha)
    adapter.save(tmp_path / "ad")
    findings = [f for f in validate(tmp_path / "ad", pair(family)[0], consumers=consumer) if f.severity == "error"]
    assert findings == [], [(f.code, f.where) for f in findings]
