"""``fuse`` on MoE and multimodal checkpoints, against the definition written out expert by expert: each expert's delta
in BASE's own keys (per-expert keys, gpt-oss's stored (E, in, out) tensor), saved fused copies as per-expert slices,
row blocks, and every tensor without a place refused through the CLI with nothing written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lorasurg.cli import main
from lorasurg.config import LoraConfig
from lorasurg.errors import ConfigError
from lorasurg.engine.experts import join_experts
from lorasurg.io.adapter import TOKENS_PART, Adapter, AdapterModule
from lorasurg.io.checkpoint import Checkpoint
from lorasurg.surgery.fuse import fuse
from tests.conftest import assert_close_ulps, tol

MOE = Path(__file__).resolve().parents[2] / "fixtures" / "moe"
VLM = Path(__file__).resolve().parents[2] / "fixtures" / "vlm"
QWEN3, GPT_OSS, QWEN2_VL = MOE / "qwen3_moe" / "base", MOE / "gpt_oss" / "base", VLM / "qwen2_vl" / "base"
E, R = 4, 2
EXPERTS = "model.layers.0.mlp.experts"


def _factors(gen, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert factors ``A (E, R, in)``, ``B (E, out, R)``."""
    return torch.randn(E, R, in_f, generator=gen), torch.randn(E, out_f, R, generator=gen)


def _wrapped(gen, shapes: dict[str, tuple[int, int]], alpha: float = 4.0):
    """A target_parameters adapter on layer 0's experts: ``{leaf: (out, in)}`` in the module's parameter order;
    returns it and the per-expert factors by leaf."""
    per, modules = {}, {}
    for depth, (leaf, (out_f, in_f)) in enumerate(shapes.items()):
        per[leaf] = _factors(gen, out_f, in_f)
        path = EXPERTS + ".base_layer" * (len(shapes) - 1 - depth)
        lora_A, lora_B = join_experts(*per[leaf])  # (R E, in), (out, R E)
        modules[path] = AdapterModule(path, lora_A, lora_B)
    config = LoraConfig(r=R, lora_alpha=alpha, target_modules=None, target_parameters=[f"{EXPERTS}.{leaf}" for leaf in
                                                                                      shapes])
    return Adapter(config, modules), per


def test_target_parameters_on_per_expert_keys_add_each_experts_rows(tmp_path, gen):
    adapter, per = _wrapped(gen, {"gate_up_proj": (32, 32), "down_proj": (32, 16)})
    report = fuse(QWEN3, adapter, tmp_path / "fused", device="cpu")
    assert {m.source for m in report.modules} == {EXPERTS + ".base_layer", EXPERTS}
    scale = 4.0 / R
    with Checkpoint.open(QWEN3) as base, Checkpoint.open(tmp_path / "fused") as fused:
        for e in range(E):
            A, B = per["gate_up_proj"][0][e], per["gate_up_proj"][1][e]  # (R, 32), (32, R): gate rows 0-15, up 16-31
            for leaf, rows in (("gate_proj", slice(0, 16)), ("up_proj", slice(16, 32))):
                key = f"{EXPERTS}.{e}.{leaf}.weight"
                want = base.get(key).double() + scale * (B[rows].double() @ A.double())
                assert_close_ulps(fused.get(key), want.float(), 8, magnitude=want.abs().float() + 1, msg=key)
            key = f"{EXPERTS}.{e}.down_proj.weight"
            want = base.get(key).double() + scale * (per["down_proj"][1][e].double() @ per["down_proj"][0][e].double())
            assert_close_ulps(fused.get(key), want.float(), 8, magnitude=want.abs().float() + 1, msg=key)
        assert torch.equal(fused.get("model.layers.1.mlp.experts.0.up_proj.weight"),
                           base.get("model.layers.1.mlp.experts.0.up_proj.weight"))


def test_target_parameters_on_gpt_oss_stored_experts_add_the_transposed_deltas(tmp_path, gen):
    adapter, per = _wrapped(gen, {"gate_up_proj": (32, 32), "down_proj": (32, 16)})
    report = fuse(GPT_OSS, adapter, tmp_path / "fused", device="cpu")
    assert {(m.module, m.kind) for m in report.modules} == {(f"{EXPERTS}.gate_up_proj", "experts"),
                                                            (f"{EXPERTS}.down_proj", "experts")}
    with Checkpoint.open(GPT_OSS) as base, Checkpoint.open(tmp_path / "fused") as fused:
        for leaf in ("gate_up_proj", "down_proj"):
            stored = base.get(f"{EXPERTS}.{leaf}").double()  # (E, in, out)
            A, B = per[leaf]
            want = stored + 2.0 * torch.bmm(B.double(), A.double()).transpose(1, 2)  # (E, out, in) -> (E, in, out)
            assert_close_ulps(fused.get(f"{EXPERTS}.{leaf}"), want.float(), 8, magnitude=want.abs().float() + 1)
        assert torch.equal(fused.get(f"{EXPERTS}.gate_up_proj_bias"), base.get(f"{EXPERTS}.gate_up_proj_bias"))


def test_a_saved_fused_expert_parameter_goes_to_each_experts_keys(tmp_path, gen):
    saved = torch.randn(E, 32, 32, generator=gen)  # the model's (E, 2I, H) gate_up_proj, saved whole
    adapter, _ = _wrapped(gen, {"down_proj": (32, 16)})
    adapter.extra[f"{EXPERTS}.gate_up_proj"] = saved
    report = fuse(QWEN3, adapter, tmp_path / "fused", device="cpu")
    assert f"{EXPERTS}.2.up_proj.weight" in report.replaced
    with Checkpoint.open(tmp_path / "fused") as fused:
        for e in range(E):
            assert torch.equal(fused.get(f"{EXPERTS}.{e}.gate_proj.weight"), saved[e, :16])
            assert torch.equal(fused.get(f"{EXPERTS}.{e}.up_proj.weight"), saved[e, 16:])


@pytest.mark.parametrize("base", [GPT_OSS, QWEN3])
def test_expert_merges_in_row_blocks_equal_the_whole_merge(tmp_path, gen, base):
    adapter, _ = _wrapped(gen, {"gate_up_proj": (32, 32), "down_proj": (32, 16)})
    held = fuse(base, adapter, tmp_path / "held", device="cpu")
    with pytest.raises(ConfigError) as info:
        fuse(base, adapter, tmp_path / "refused", max_memory="1KB", device="cpu")
    smallest = re.search(r"Use --max-memory (\S+) or more", str(info.value)).group(1)
    blocked = fuse(base, adapter, tmp_path / "blocked", max_memory=smallest, device="cpu")
    merged = {t.name for t in blocked.memory.blocked if t.what == "merged"}
    expected = f"{EXPERTS}.gate_up_proj" if base == GPT_OSS else f"{EXPERTS}.0.gate_proj.weight"
    assert expected in merged and held.memory.blocked == []
    with Checkpoint.open(tmp_path / "held") as h, Checkpoint.open(tmp_path / "blocked") as b:
        for name in h.names():
            if name in merged:
                torch.testing.assert_close(b.get(name), h.get(name), **tol(torch.float32))
            else:
                assert torch.equal(b.get(name), h.get(name)), name


# ------------------------------------------------------------------------------------------------ refusals


def _cli_refuses(tmp_path: Path, base: Path, adapter: Adapter, *expected: str) -> None:
    adapter.save(tmp_path / "adapter")
    result = CliRunner().invoke(main, ["fuse", str(base), str(tmp_path / "adapter"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output, (text, result.output)
    assert not (tmp_path / "out").exists()


def test_an_expert_base_does_not_have_is_refused(tmp_path, gen):
    name = f"{EXPERTS}.7.gate_proj"  # qwen3_moe has 4 experts
    adapter = Adapter(LoraConfig(r=R, target_modules=["gate_proj"]),
                      {name: AdapterModule(name, torch.randn(R, 32, generator=gen), torch.randn(16, R, generator=gen))})
    _cli_refuses(tmp_path, QWEN3, adapter, "modules not in BASE (1)", name)


def test_target_parameters_for_another_number_of_experts_are_refused(tmp_path, gen):
    lora_A, lora_B = torch.randn(3 * R, 16, generator=gen), torch.randn(32, 3 * R, generator=gen)  # 3 experts
    adapter = Adapter(LoraConfig(r=R, target_modules=None, target_parameters=["down_proj"]),
                      {EXPERTS: AdapterModule(EXPERTS, lora_A, lora_B)})
    _cli_refuses(tmp_path, QWEN3, adapter, EXPERTS, "(4 experts, in 16, out 32) needs A (r*4, 16)")


def test_a_wrapper_path_no_target_parameter_selects_is_refused(tmp_path, gen):
    adapter, _ = _wrapped(gen, {"gate_up_proj": (32, 32), "down_proj": (32, 16)})
    adapter.config.target_parameters = ["down_proj"]  # gate_up_proj's wrapper (.base_layer) no longer exists
    _cli_refuses(tmp_path, QWEN3, adapter, f"{EXPERTS}.base_layer", "target_parameters select no parameter")


def test_vlm_modules_under_checkpoint_names_are_refused_where_peft_does_not_rename(tmp_path, gen):
    name = "model.layers.0.self_attn.q_proj"  # Qwen2-VL's checkpoint name; the model's is model.language_model...
    adapter = Adapter(LoraConfig(r=R, target_modules=["q_proj"]),
                      {name: AdapterModule(name, torch.randn(R, 32, generator=gen), torch.randn(32, R, generator=gen))})
    _cli_refuses(tmp_path, QWEN2_VL, adapter, name, "model.language_model.layers.0.self_attn.q_proj",
                 "rename the adapter's keys")


def test_vlm_saved_copies_under_checkpoint_names_are_refused(tmp_path, gen):
    name = "model.language_model.layers.0.self_attn.q_proj"
    adapter = Adapter(LoraConfig(r=R, target_modules=["q_proj"], modules_to_save=["norm"]),
                      {name: AdapterModule(name, torch.randn(R, 32, generator=gen), torch.randn(32, R, generator=gen))},
                      {"model.norm.weight": torch.ones(32)})
    _cli_refuses(tmp_path, QWEN2_VL, adapter, "model.norm.weight", "model.language_model.norm.weight")


def test_vlm_trainable_tokens_under_the_models_name_go_into_the_checkpoints_embedding(tmp_path, gen):
    module, name = "model.language_model.embed_tokens", "model.language_model.layers.0.self_attn.q_proj"
    rows = torch.randn(3, 32, generator=gen)
    adapter = Adapter(LoraConfig(r=R, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [2, 7, 9]}),
                      {name: AdapterModule(name, torch.zeros(R, 32), torch.zeros(32, R))},
                      {f"{module}.{TOKENS_PART}": rows})
    fuse(QWEN2_VL, adapter, tmp_path / "fused", device="cpu")
    with Checkpoint.open(QWEN2_VL) as base, Checkpoint.open(tmp_path / "fused") as fused:
        want = base.get("model.embed_tokens.weight").clone()
        want[[2, 7, 9]] = rows
        assert torch.equal(fused.get("model.embed_tokens.weight"), want)
