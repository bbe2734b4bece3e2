"""validate's checks beyond one finding per code: what is not reported, skipped checks, the no-base rules,
GPT-2's Conv1D layout, and inputs validation cannot run on."""

from __future__ import annotations

import json

import pytest
import torch

from lorasurg import InputError, validate
from lorasurg.io.adapter import CONFIG_NAME, WEIGHTS_NAME

from tests.surgery.validate.broken import LLAMA, Q0, build, clean_adapter, config_only, save

GPT2 = LLAMA.parents[1] / "tiny-gpt2" / "base"


def _codes(findings):
    return [f.code for f in findings]


def test_clean_adapter_is_clean_with_and_without_base(tmp_path):
    path = save(clean_adapter(), tmp_path / "a")
    assert validate(path, LLAMA) == []
    assert _codes(validate(path)) == ["check-skipped"]


def test_training_config_with_a_reinit_init_is_fine(tmp_path):
    """init-reinit is about saved adapters: a config to train with may well ask for PiSSA."""
    path = config_only(tmp_path, target_modules=["q_proj"], init_lora_weights="pissa")
    assert validate(path, LLAMA) == []


def test_config_of_the_wrong_type_skips_what_needs_it(tmp_path):
    path = save(clean_adapter(), tmp_path / "a", r="8", lora_dropout=2)
    findings = validate(path, LLAMA)
    invalid = [f.message for f in findings if f.code == "config-invalid"]
    assert any("r must be a positive int (the LoRA rank), got '8'" in m for m in invalid)
    assert any("lora_dropout must be a probability in [0, 1], got 2" in m for m in invalid)
    skipped = [f for f in findings if f.code == "check-skipped"]
    assert len(skipped) == 1 and ("targets, patterns, tensors, experts, tokens, layouts check(s) did not run"
                                  in skipped[0].message)
    assert "values" not in skipped[0].message  # the value checks need no config: they ran


def test_unreadable_json_is_a_finding_not_a_crash(tmp_path):
    path = save(clean_adapter(), tmp_path / "a")
    (path / CONFIG_NAME).write_text('{"r": 4,,}')
    findings = validate(path, LLAMA)
    bad = [f for f in findings if f.code == "file-unreadable"]
    assert bad and "invalid JSON at line 1, column 9" in bad[0].message
    assert "shapes" not in " ".join(f.message for f in findings if f.code == "check-skipped")  # shapes ran


def test_missing_config_is_file_missing(tmp_path):
    path = save(clean_adapter(), tmp_path / "a")
    (path / CONFIG_NAME).unlink()
    missing = [f for f in validate(path) if f.code == "file-missing"]
    assert missing[0].where.endswith(CONFIG_NAME) and "has weights but no adapter_config.json" in missing[0].message


def test_layers_pattern_finding_is_not_repeated_as_nothing_selected(tmp_path):
    path, base = build("layers-pattern-unmatched", tmp_path / "a")
    assert _codes(validate(path, base)) == ["layers-pattern-unmatched"]


def test_pattern_key_meant_for_one_module_gets_the_anchored_fix(tmp_path):
    path = save(clean_adapter(), tmp_path / "a", rank_pattern={f"base_model.model.{Q0}": 4})
    finding = next(f for f in validate(path, LLAMA) if f.code == "pattern-unmatched")
    assert f"it seems meant for '{Q0}': write the key as '^model\\\\.layers\\\\.0\\\\.self_attn\\\\.q_proj'" in finding.fix


def test_pattern_key_matching_untargeted_modules_says_so(tmp_path):
    path = save(clean_adapter(), tmp_path / "a", rank_pattern={"k_proj": 2})
    finding = next(f for f in validate(path, LLAMA) if f.code == "pattern-unmatched")
    assert "it matches ['model.layers.0.self_attn.k_proj'" in finding.message
    assert "which target_modules does not select" in finding.message


def test_without_base_patterns_and_targets_are_judged_among_the_adapters_modules(tmp_path):
    path = save(clean_adapter(), tmp_path / "a", rank_pattern={"^model.layers.0": 2}, target_modules=["q_proj"])
    codes = _codes(validate(path))
    assert codes.count("tensor-untargeted") == 2 and "pattern-unmatched" in codes


def test_dora_adapter_with_zero_lora_b_is_not_called_untrained(tmp_path):
    adapter = clean_adapter(use_dora=True)
    for mod in adapter.modules.values():
        mod.B = torch.zeros_like(mod.B)
    assert validate(save(adapter, tmp_path / "a"), LLAMA) == []


def test_gpt2_conv1d_layout(tmp_path):
    """GPT-2's Conv1D stores its weight (in, out); the LoRA factors are still (r, in), (out, r)."""
    adapter = clean_adapter(targets=("c_attn",), base=GPT2, fan_in_fan_out=True)
    name = "transformer.h.0.attn.c_attn"
    assert tuple(adapter.modules[name].A.shape) == (4, 64) and tuple(adapter.modules[name].B.shape) == (192, 4)
    path = save(adapter, tmp_path / "a")
    assert validate(path, GPT2) == []
    adapter.modules[name].A, adapter.modules[name].B = torch.ones(4, 192), torch.ones(64, 4)  # nn.Linear reading
    wrong = [f for f in validate(save(adapter, tmp_path / "b"), GPT2) if f.code == "shape-mismatch"]
    assert wrong[0].where == name
    assert "lora_A is (4, 192), the layer needs (4, 64)" in wrong[0].message
    assert "Conv1D, weight (64, 192) stored (in, out) (fan_in_fan_out)" in wrong[0].message


def test_hub_ids_are_resolved_through_io_hub(tmp_path, monkeypatch):
    path = save(clean_adapter(), tmp_path / "a")
    asked = []

    def fake_resolve(repo, revision=None, allow_patterns=None):
        asked.append((repo, tuple(allow_patterns)))
        return path

    monkeypatch.setattr("lorasurg.surgery.validate.subject.resolve_source", fake_resolve)
    assert validate("someone/adapter", LLAMA) == []
    assert asked == [("someone/adapter", (CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin"))]


@pytest.mark.parametrize("what, message", [
    ("missing", "does not exist"),
    ("empty", "holds neither adapter_config.json nor adapter_model.safetensors"),
    ("weights-file", "is a file but not an adapter_config.json"),
    ("bad-base", "does not exist"),
])
def test_inputs_validation_cannot_run_on(tmp_path, what, message):
    path = save(clean_adapter(), tmp_path / "a")
    (tmp_path / "empty").mkdir()
    args = {"missing": (tmp_path / "nope", None), "empty": (tmp_path / "empty", None),
            "weights-file": (path / WEIGHTS_NAME, None), "bad-base": (path, tmp_path / "no-base")}[what]
    with pytest.raises(InputError, match=message):
        validate(*args)


def test_finding_to_dict_and_unknown_codes():
    from lorasurg import Finding

    f = Finding("rank-mismatch", "m", "stored rank 2", "fix it")
    assert f.to_dict() == {"severity": "error", "code": "rank-mismatch", "where": "m", "message": "stored rank 2",
                           "fix": "fix it"}
    assert str(f) == "m: stored rank 2"
    with pytest.raises(ValueError, match="unknown finding code 'nope'"):
        Finding("nope", "m", "x")


def test_readme_lists_every_code_with_its_severity_and_summary():
    from lorasurg.findings import CODES

    readme = (LLAMA.parents[2] / "README.md").read_text()
    for code, row in CODES.items():
        assert f"| `{code}` | {row.severity} | {row.summary} |" in readme, code


def test_json_of_findings_is_serialisable(tmp_path):
    path, base = build("value-nonfinite", tmp_path / "a")
    from lorasurg import validate_adapter

    data = json.loads(json.dumps(validate_adapter(path, base).to_dict()))
    assert data["counts"] == {"error": 1, "warning": 0, "info": 0}
    assert data["findings"][0]["code"] == "value-nonfinite"


def test_conv_kernels_and_vocabulary_sizes_are_checked(tmp_path):
    """A checkpoint without config.json, described from names and shapes: a Conv2d and an embedding."""
    from safetensors.torch import save_file

    from lorasurg import Adapter, AdapterModule, LoraConfig

    base = tmp_path / "base"
    base.mkdir()
    save_file({"conv.weight": torch.ones(6, 3, 3, 3), "conv.bias": torch.ones(6),
               "embed_tokens.weight": torch.ones(20, 8)}, base / "model.safetensors")
    cfg = LoraConfig(r=2, target_modules=["conv", "embed_tokens"])

    def adapter(conv_a, emb_a):
        return Adapter(cfg, {"conv": AdapterModule("conv", torch.ones(conv_a), torch.ones(6, 2, 1, 1)),
                             "embed_tokens": AdapterModule("embed_tokens", torch.ones(emb_a), torch.ones(8, 2),
                                                           embedding=True)})

    assert validate(save(adapter((2, 3, 3, 3), (2, 20)), tmp_path / "ok"), base) == []
    wrong = {f.where: f.message for f in validate(save(adapter((2, 3, 5, 5), (2, 30)), tmp_path / "bad"), base)}
    assert "lora_A is (2, 3, 5, 5), the layer needs (2, 3, 3, 3) (Conv2d, weight (6, 3, 3, 3))" in wrong["conv"]
    assert "lora_A is (2, 30), the layer needs (2, 20) (Embedding, weight (20, 8))" in wrong["embed_tokens"]


def test_target_modules_none_is_not_judged(tmp_path):
    """PEFT picks default targets per model type for target_modules None; lorasurg does not model that table."""
    path = save(clean_adapter(), tmp_path / "a", target_modules=None)
    findings = validate(path, LLAMA)
    assert _codes(findings) == ["check-skipped"]
    assert "the targets check could not run: target_modules is not set" in findings[0].message
