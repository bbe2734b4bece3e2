"""``validate --fix -o OUT``: each safe fix, what it leaves untouched (every tensor value), and its refusals."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lorasurg import OutputExistsError, validate, validate_adapter
from lorasurg.cli import main
from lorasurg.io.adapter import CONFIG_NAME, WEIGHTS_NAME

from tests.surgery.validate.broken import LLAMA, Q0, build, clean_adapter, edit_tensors, save


def _state(directory):
    if (directory / WEIGHTS_NAME).is_file():
        return load_file(directory / WEIGHTS_NAME)
    return torch.load(directory / "adapter_model.bin", weights_only=True)


def _same_tensors(src, out, dropped=()):
    before, after = _state(src), _state(out)
    assert set(after) == set(before) - set(dropped)
    for key, tensor in after.items():
        assert tensor.dtype == before[key].dtype and torch.equal(tensor, before[key]), key


def _config(directory):
    return json.loads((directory / CONFIG_NAME).read_text())


def test_lora_bias_is_set_when_the_tensors_are_there(tmp_path):
    path, base = build("bias-unflagged", tmp_path / "a")
    report = validate_adapter(path, base, fix_output=tmp_path / "out")
    assert [(c.code, c.where) for c in report.fix.changes] == [("bias-unflagged", "lora_bias")]
    assert _config(tmp_path / "out")["lora_bias"] is True
    _same_tensors(path, tmp_path / "out")
    assert [f.code for f in report.fix.remaining] == ["bias-missing"] * 3  # the others get PEFT's zero bias
    assert report.errors == 0


def test_reinit_init_becomes_true_and_its_subconfig_is_reset(tmp_path):
    path = save(clean_adapter(), tmp_path / "a", init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    report = validate_adapter(path, LLAMA, fix_output=tmp_path / "out")
    assert [c.where for c in report.fix.changes] == ["init_lora_weights", "loftq_config"]
    config = _config(tmp_path / "out")
    assert config["init_lora_weights"] is True and config["loftq_config"] == {}
    assert report.fix.remaining == []
    _same_tensors(path, tmp_path / "out")


def test_pissa_with_lora_bias_tensors_becomes_valid(tmp_path):
    """Two fixes that depend on each other: lora_bias needs init true/false, which the init fix gives."""
    path = save(clean_adapter(), tmp_path / "a", init_lora_weights="pissa")
    edit_tensors(path, lambda s: s.update({f"base_model.model.{m}.lora_B.bias": torch.zeros(o) for m, o in
                                           [(Q0, 64), ("model.layers.1.self_attn.q_proj", 64),
                                            ("model.layers.0.self_attn.v_proj", 32),
                                            ("model.layers.1.self_attn.v_proj", 32)]}))
    report = validate_adapter(path, LLAMA, fix_output=tmp_path / "out")
    assert {c.code for c in report.fix.changes} == {"init-reinit", "bias-unflagged"}
    assert report.fix.remaining == [] and validate(tmp_path / "out", LLAMA) == []


def test_tensors_of_untargeted_modules_are_dropped(tmp_path):
    path, base = build("tensor-untargeted", tmp_path / "a")
    report = validate_adapter(path, base, fix_output=tmp_path / "out")
    dropped = [f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_{p}.weight" for i in (0, 1) for p in "AB"]
    _same_tensors(path, tmp_path / "out", dropped)
    assert [c.where for c in report.fix.changes] == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert report.fix.remaining == []


def test_pattern_key_meant_for_one_module_is_anchored_in_place(tmp_path):
    patterns = {"k_proj": 2, f"base_model.model.{Q0}": 4, "^model.layers.0": 2}
    path = save(clean_adapter(), tmp_path / "a", rank_pattern=patterns)
    report = validate_adapter(path, LLAMA, fix_output=tmp_path / "out")
    anchored = "^model\\.layers\\.0\\.self_attn\\.q_proj"
    assert list(_config(tmp_path / "out")["rank_pattern"]) == ["k_proj", anchored, "^model.layers.0"]
    assert [c.code for c in report.fix.changes] == ["pattern-unmatched"]
    remaining = [f.where for f in report.fix.remaining]  # meant for several modules: not a safe fix
    assert remaining == ["rank_pattern['k_proj']", "rank_pattern['^model.layers.0']"]
    assert report.errors == 2
    _same_tensors(path, tmp_path / "out")


def test_pattern_key_is_not_anchored_when_another_key_takes_the_module_first(tmp_path):
    path = save(clean_adapter(), tmp_path / "a", rank_pattern={"q_proj": 4, f"base_model.model.{Q0}": 4})
    report = validate_adapter(path, LLAMA, fix_output=tmp_path / "out")
    assert report.fix.changes == []
    assert [f.code for f in report.fix.remaining] == ["pattern-unmatched"]


def test_bin_is_written_as_safetensors_with_the_same_tensors(tmp_path):
    path, base = build("file-bin", tmp_path / "a")
    (path / "README.md").write_text("my adapter")
    report = validate_adapter(path, base, fix_output=tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    _same_tensors(path, tmp_path / "out")
    assert [c.code for c in report.fix.changes] == ["file-bin"] and report.fix.remaining == []


def test_nothing_to_fix_writes_an_unchanged_copy(tmp_path):
    path = save(clean_adapter(), tmp_path / "a")
    report = validate_adapter(path, LLAMA, fix_output=tmp_path / "out")
    assert report.fix.changes == [] and _config(tmp_path / "out") == _config(path)
    assert "(no safe fix applied: an unchanged copy)" in report.render()


def test_unreadable_weights_write_nothing(tmp_path):
    path, base = build("file-unreadable", tmp_path / "a")
    report = validate_adapter(path, base, fix_output=tmp_path / "out")
    assert report.fix.output is None and not (tmp_path / "out").exists()
    assert "--fix wrote nothing: the weights are missing or unreadable" in report.render()
    assert report.errors == 1


def test_existing_output_and_in_place_are_refused_before_any_work(tmp_path):
    path, base = build("bias-unflagged", tmp_path / "a")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--force"):
        validate_adapter(path, base, fix_output=tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    validate_adapter(path, base, fix_output=tmp_path / "out", force=True)
    assert _config(tmp_path / "out")["lora_bias"] is True
    with pytest.raises(Exception, match="would write over the adapter it reads"):
        validate_adapter(path, base, fix_output=path, force=True)


def test_cli_fix_lists_changes_and_exits_by_the_copy(tmp_path):
    path, base = build("bias-unflagged", tmp_path / "a")
    result = CliRunner().invoke(main, ["validate", str(path), "--base", str(base), "--fix", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "error    bias-unflagged" in result.stdout  # the findings of the input are shown
    assert f"--fix wrote {tmp_path / 'o'}:" in result.stdout
    assert "[bias-unflagged] lora_bias: false -> true: 1 module(s) have lora_B.bias tensors" in result.stdout
    assert "the copy has 0 errors, 3 warnings, 0 info:" in result.stdout
    as_json = CliRunner().invoke(main, ["validate", str(path), "--base", str(base), "--fix", "-o",
                                        str(tmp_path / "o2"), "--json"])
    data = json.loads(as_json.stdout)
    assert data["fix"]["changes"][0]["code"] == "bias-unflagged" and data["fix"]["output"] == str(tmp_path / "o2")
