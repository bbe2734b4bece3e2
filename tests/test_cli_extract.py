"""``lorasurg extract`` on the command line: output, JSON, and every bad input's message and exit code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lorasurg.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LLAMA = [str(FIXTURES / "tiny-llama" / "base"), str(FIXTURES / "tiny-llama" / "tuned")]


def run(*args: str):
    return CliRunner().invoke(main, ["extract", *args])


def copy_with(tmp_path: Path, source: Path, name: str, edit) -> Path:
    """A copy of checkpoint ``source`` whose tensors went through ``edit(state)``."""
    out = tmp_path / name
    shutil.copytree(source, out)
    state = load_file(str(out / "model.safetensors"))
    edit(state)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_writes_adapter_and_human_report(tmp_path):
    out = tmp_path / "ad"
    result = run(*LLAMA, "-o", str(out), "--r", "4")
    assert result.exit_code == 0, result.output
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    text = result.output
    assert "model.layers.0.self_attn.q_proj" in text and "rel. error" in text and "energy kept" in text
    assert "model.layers.0.input_layernorm.weight" in text and "modules_to_save" in text
    assert "parameters" in text and f"wrote {out}" in text
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 4


def test_json_report(tmp_path):
    result = run(*LLAMA, "-o", str(tmp_path / "ad"), "--r", "4", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["output"] == str(tmp_path / "ad")
    assert data["totals"]["lora_modules"] == 16
    assert data["totals"]["adapter_bytes"] > 0
    assert {m["module"] for m in data["modules"]} >= {"lm_head", "model.embed_tokens"}
    assert all(0 <= m["rel_error"] <= 1 for m in data["modules"])


def test_default_output_path_is_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(*LLAMA, "--r", "2")
    assert result.exit_code == 0, result.output
    assert "wrote tuned-lora-r2" in result.output
    assert (tmp_path / "tuned-lora-r2" / "adapter_config.json").is_file()


def test_r_larger_than_a_module_allows_is_clamped_and_said(tmp_path):
    result = run(*LLAMA, "-o", str(tmp_path / "ad"), "--r", "100")
    assert result.exit_code == 0, result.output
    assert "clamped" in result.output and "model.layers.0.self_attn.k_proj (r=32)" in result.output


def test_different_architectures_list_mismatches(tmp_path):
    result = run(LLAMA[0], str(FIXTURES / "tiny-gpt2" / "tuned"), "-o", str(tmp_path / "ad"))
    assert result.exit_code == 2
    assert "not the same architecture" in result.output
    assert "model_type" in result.output and "missing from tuned" in result.output
    assert "model.embed_tokens.weight" in result.output
    assert not (tmp_path / "ad").exists()


def test_shape_mismatch_is_listed(tmp_path):
    def widen(state):
        state["model.norm.weight"] = torch.ones(65)

    tuned = copy_with(tmp_path, FIXTURES / "tiny-llama" / "tuned", "tuned", widen)
    result = run(LLAMA[0], str(tuned), "-o", str(tmp_path / "ad"))
    assert result.exit_code == 2
    assert "model.norm.weight: base (64,), tuned (65,)" in result.output


def test_tensor_missing_from_one_side(tmp_path):
    tuned = copy_with(tmp_path, FIXTURES / "tiny-llama" / "tuned", "tuned",
                      lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    result = run(LLAMA[0], str(tuned), "-o", str(tmp_path / "ad"))
    assert result.exit_code == 2
    assert "missing from tuned (1): model.layers.1.mlp.up_proj.weight" in result.output


def test_nan_in_a_delta_names_the_tensor(tmp_path):
    def poison(state):
        state["model.layers.0.mlp.down_proj.weight"][3, 5] = float("nan")
        state["model.norm.weight"][0] = float("inf")

    tuned = copy_with(tmp_path, FIXTURES / "tiny-llama" / "tuned", "tuned", poison)
    result = run(LLAMA[0], str(tuned), "-o", str(tmp_path / "ad"))
    assert result.exit_code == 2
    assert "NaN or inf" in result.output
    assert "model.layers.0.mlp.down_proj.weight" in result.output and "model.norm.weight" in result.output
    assert not (tmp_path / "ad").exists()


def test_identical_checkpoints_write_nothing_unless_asked(tmp_path):
    result = run(LLAMA[0], LLAMA[0], "-o", str(tmp_path / "ad"))
    assert result.exit_code == 2
    assert "identical" in result.output and "--allow-empty" in result.output
    assert not (tmp_path / "ad").exists()
    result = run(LLAMA[0], LLAMA[0], "-o", str(tmp_path / "ad"), "--allow-empty", "--r", "2")
    assert result.exit_code == 0, result.output
    state = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert state and all(torch.count_nonzero(t) == 0 for t in state.values())


def test_existing_output_is_refused_before_any_work(tmp_path, monkeypatch):
    out = tmp_path / "ad"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def must_not_run(*args, **kwargs):
        raise AssertionError("extract ran although the output exists")

    monkeypatch.setattr("lorasurg.surgery.extract.run.extract", must_not_run)
    result = run(*LLAMA, "-o", str(out))
    assert result.exit_code == 2
    assert "exists and is not empty" in result.output and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_force_replaces_existing_output(tmp_path):
    out = tmp_path / "ad"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = run(*LLAMA, "-o", str(out), "--r", "2", "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and (out / "adapter_config.json").is_file()


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_run_leaves_no_partial_output(tmp_path, monkeypatch, error):
    import lorasurg.surgery.extract.process as pass_module

    real_fit = pass_module.fit_operator
    calls = []

    def failing_fit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise error("interrupted in the middle")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(pass_module, "fit_operator", failing_fit)
    out = tmp_path / "ad"
    result = run(*LLAMA, "-o", str(out))
    assert len(calls) == 3
    assert result.exit_code != 0
    if error is KeyboardInterrupt:
        assert result.exit_code == 130 and "nothing was written" in result.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either


def test_bad_option_values(tmp_path):
    result = run(*LLAMA, "-o", str(tmp_path / "ad"), "--r", "0")
    assert result.exit_code == 2 and "--r" in result.output
    result = run(*LLAMA, "-o", str(tmp_path / "ad"), "--device", "tpu:7")
    assert result.exit_code == 2 and "tpu:7" in result.output
    assert not (tmp_path / "ad").exists()


def test_target_modules_that_select_nothing(tmp_path):
    result = run(*LLAMA, "-o", str(tmp_path / "ad"), "--target-modules", "qproj")
    assert result.exit_code == 2
    assert "no LoRA-able weight changed" in result.output and "--target-modules" in result.output
    assert not (tmp_path / "ad").exists()


def test_target_modules_regex_and_comma_list(tmp_path):
    result = run(*LLAMA, "-o", str(tmp_path / "a"), "--r", "2", "--target-modules", r".*\.(q|v)_proj", "--json")
    assert result.exit_code == 0, result.output
    fitted = {m["module"].rsplit(".", 1)[-1] for m in json.loads(result.output)["modules"]}
    assert fitted == {"q_proj", "v_proj"}
    result = run(*LLAMA, "-o", str(tmp_path / "b"), "--r", "2", "--target-modules", "q_proj,v_proj", "--json")
    assert {m["module"].rsplit(".", 1)[-1] for m in json.loads(result.output)["modules"]} == {"q_proj", "v_proj"}


@pytest.mark.parametrize("value, message", [
    ("lots", "Invalid value for '--max-memory': 'lots' is not a size; accepted forms: a number of bytes (123456), "
             "a number with a unit (500MB, 2GB, 1.5GiB"),
    ("12XB", "'12XB' is not a size; accepted forms:"),
    ("0", "'0' must be a positive size"),
    ("150%", "'150%': a percentage must be above 0 and at most 100"),
])
def test_unparseable_max_memory_says_the_accepted_forms(tmp_path, value, message):
    result = run(*LLAMA, "-o", str(tmp_path / "ad"), "--max-memory", value)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "ad").exists()


def test_max_memory_below_the_smallest_workable_budget_says_the_minimum(tmp_path):
    result = run(*LLAMA, "-o", str(tmp_path / "ad"), "--max-memory", "1KB")
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "error: the memory budget (--max-memory 1KB for the whole process, " in text
    assert "is below the smallest workable budget for this input" in text
    assert "needs one row of" in text and "the process already holds (Python, torch). Use --max-memory" in text
    assert "Traceback" not in result.output and not (tmp_path / "ad").exists()


def test_max_memory_is_for_the_whole_process_and_reported(tmp_path):
    result = run(*LLAMA, "-o", str(tmp_path / "ad"), "--max-memory", "64GB", "--json")
    assert result.exit_code == 0, result.output
    memory = json.loads(result.output)["memory"]
    assert memory["max_memory"] == 64 * 10**9 and memory["streamed"] == []
    assert 10**7 < memory["in_use_at_start"] == memory["max_memory"] - memory["for_tensors"]
    assert memory["budget"].startswith("--max-memory 64GB for the whole process, ")
    result = run(*LLAMA, "-o", str(tmp_path / "ad2"), "--max-memory", "10%", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["memory"]["in_use_at_start"] == 0  # a share of the available memory: tensors


def test_help_states_the_default_budget():
    result = CliRunner().invoke(main, ["extract", "--help"])
    assert "--max-memory SIZE" in result.output
    assert "Default: 50% of the memory available at start." in " ".join(result.output.split())


def _moe_with_lost_tensors(tmp_path: Path) -> list[str]:
    """Qwen2-MoE with a changed attention bias (PEFT cannot load lora_bias beside the experts' target_parameters)
    and a changed key the model has no place for."""
    source = FIXTURES / "moe" / "qwen2_moe"

    def extra(value):
        return lambda s: s.update({"model.layers.0.mlp.mystery": torch.full((4,), value)})

    def tuned_edit(s):
        extra(2.0)(s)
        s["model.layers.0.self_attn.q_proj.bias"] = s["model.layers.0.self_attn.q_proj.bias"] + 0.1

    return [str(copy_with(tmp_path, source / "base", "base", extra(1.0))),
            str(copy_with(tmp_path, source / "tuned", "tuned", tuned_edit))]


def test_lost_tensors_exit_2_and_write_nothing_without_allow_dropped(tmp_path):
    pair = _moe_with_lost_tensors(tmp_path)
    result = run(*pair, "-o", str(tmp_path / "ad"), "--r", "4")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not (tmp_path / "ad").exists()
    assert "2 changed tensor(s) would be left out of the adapter, not by your choice" in result.output
    assert "model.layers.0.self_attn.q_proj.bias" in result.output and "model.layers.0.mlp.mystery" in result.output
    result = run(*pair, "-o", str(tmp_path / "ad"), "--r", "4", "--allow-dropped", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {d["name"] for d in data["lost"]} == {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.mlp.mystery"}
    assert all(0 < d["share"] < 1 and d["why"] for d in data["lost"])
    assert (tmp_path / "ad" / "adapter_config.json").is_file()
    text = run(*pair, "-o", str(tmp_path / "ad2"), "--r", "4", "--allow-dropped").output
    assert "left out with --allow-dropped" in text and "model.layers.0.mlp.mystery" in text


def test_for_vllm_on_moe_experts_is_refused_before_any_work(tmp_path):
    moe = [str(FIXTURES / "moe" / "mixtral" / "base"), str(FIXTURES / "moe" / "mixtral" / "tuned")]
    result = run(*moe, "-o", str(tmp_path / "ad"), "--for", "vllm")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "written for vllm (--for, --to): lorasurg does not know yet how vllm" in result.output
    assert "block_sparse_moe.experts.0.w1" in result.output and not (tmp_path / "ad").exists()
