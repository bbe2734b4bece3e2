"""What validate says about MoE, target_parameters and multimodal adapters, against what PEFT 0.21.2 on transformers
5 does with them: every claim that PEFT refuses, drops, misses keys or reads another scale is shown here on the
adapter that validate flags (tests/surgery/validate/broken_moe.py), and every adapter validate finds clean loads in
PEFT with no missing or unexpected keys. Fixed copies (``--fix``) load with the outputs the adapter meant.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lorasurg import validate  # noqa: E402
from lorasurg.surgery.validate import validate_adapter  # noqa: E402

from tests.surgery.moe_adapters import FAMILIES, base_of, checkpoint_named, family_adapter  # noqa: E402
from tests.surgery.validate.broken import CASES, build  # noqa: E402
from tests.surgery.validate.broken_moe import per_expert  # noqa: E402

IDS = torch.tensor([[3, 5, 7, 9, 11, 2, 8, 20, 30, 40, 50, 60]])
FORMS = {"qwen3_moe": [None, "target-parameters"], "mixtral": [None, "target-parameters"],
         "deepseek_v3": [None, "target-parameters"], "qwen2_moe": [None], "gpt_oss": [None], "qwen2_vl": [None],
         "llava": [None]}


def _model(family: str):
    base = base_of(family)
    cls = getattr(transformers, json.loads((base / "config.json").read_text())["architectures"][0])
    return cls.from_pretrained(base, dtype=torch.float32).eval()


def peft_load(family: str, path: Path):
    """``(logits, [missing/unexpected-key warnings])``; raises what PEFT raises."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(_model(family), path).eval()
    troubles = [str(w.message) for w in caught if "missing" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()]
    with torch.no_grad():
        return model(input_ids=IDS).logits, troubles


def _save(adapter, path: Path) -> Path:
    adapter.save(path, force=True)
    return path


@pytest.mark.parametrize("family,form", [(f, form) for f in FAMILIES for form in FORMS[f]])
def test_clean_adapters_validate_clean_and_load_in_peft(tmp_path, family, form):
    path = _save(family_adapter(family, form=form), tmp_path / "a")
    assert validate(path, base_of(family)) == []
    logits, troubles = peft_load(family, path)
    assert troubles == [] and torch.isfinite(logits).all()


@pytest.mark.parametrize("code,raised", [
    ("parameter-refused", "does not work with lora_dropout"),
    ("expert-fused-part", "Cannot convert PEFT target"),
    ("expert-missing", "Sizes of tensors must match"),
    ("expert-rank", "stack expects each tensor to be equal size"),
])
def test_peft_refuses_what_validate_calls_refused(tmp_path, code, raised):
    path, base = build(code, tmp_path / code)
    assert code in {f.code for f in validate(path, base)}
    with pytest.raises((ValueError, RuntimeError), match=raised):
        peft_load("qwen3_moe", path)


def test_rank_other_than_peft_builds_is_refused(tmp_path):
    """Every expert at rank 1 under rank_pattern while r=2: one rank per projection, but not the one PEFT builds."""
    adapter = per_expert()
    for name, mod in list(adapter.modules.items()):
        if ".experts." in name:
            mod.A, mod.B = mod.A[:1].clone(), mod.B[:, :1].clone()
            adapter.config.rank_pattern = {**adapter.config.rank_pattern, "^" + name.replace(".", r"\."): 1}
    path = _save(adapter, tmp_path / "a")
    found = [f for f in validate(path, base_of("qwen3_moe")) if f.code == "expert-rank"]
    assert len(found) == 4 and any("stack to rank 2, but PEFT builds its LoRA at rank 4" in f.message for f in found)
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_load("qwen3_moe", path)


def test_wrong_rows_of_a_target_parameters_lora_are_refused(tmp_path):
    adapter = family_adapter("qwen3_moe", form="target-parameters")
    adapter.config.r = 3  # lora_A has 2 * 4 rows per parameter, PEFT builds 3 * 4
    adapter.config.rank_pattern, adapter.config.alpha_pattern = {}, {}
    path = _save(adapter, tmp_path / "a")
    mismatched = {f.where for f in validate(path, base_of("qwen3_moe")) if f.code == "rank-mismatch"}
    assert "model.layers.0.mlp.experts" in mismatched and "model.layers.0.mlp.experts.base_layer" in mismatched
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_load("qwen3_moe", path)


def test_fan_in_fan_out_is_refused_only_without_a_linear_target(tmp_path):
    """PEFT wraps modules before parameters and resets fan_in_fan_out at every nn.Linear."""
    alone = _save(family_adapter("gpt_oss", targets=("gate_up_proj", "down_proj"), fan_in_fan_out=True), tmp_path / "a")
    assert [f.code for f in validate(alone, base_of("gpt_oss"))] == ["parameter-refused"]
    with pytest.raises(ValueError, match="does not work with fan_in_fan_out"):
        peft_load("gpt_oss", alone)
    with_attention = _save(family_adapter("gpt_oss", fan_in_fan_out=True), tmp_path / "b")
    assert validate(with_attention, base_of("gpt_oss")) == []
    assert peft_load("gpt_oss", with_attention)[1] == []


def test_a_missing_layer_loads_with_missing_keys(tmp_path):
    path, base = build("expert-layer-missing", tmp_path / "a")
    _, troubles = peft_load("qwen3_moe", path)
    assert troubles and "model.layers.1.mlp.experts" in troubles[0]


def test_per_expert_alpha_pattern_is_read_at_the_global_scale(tmp_path):
    """PEFT's conversion ignores a per-expert alpha_pattern: the logits are those of the adapter without it."""
    path, _ = build("expert-scale", tmp_path / "a")
    clean = _save(per_expert(), tmp_path / "clean")
    assert torch.equal(peft_load("qwen3_moe", path)[0], peft_load("qwen3_moe", clean)[0])


def test_rslora_per_expert_gate_up_is_read_at_another_scale(tmp_path):
    """PEFT doubles r and lora_alpha for the fused gate_up_proj, which keeps alpha / r but not rsLoRA's
    alpha / sqrt(r): per-expert rsLoRA adapters load sqrt(2) times too strong on gate_up_proj."""
    per = _save(family_adapter("qwen3_moe", use_rslora=True), tmp_path / "per")
    fused = _save(family_adapter("qwen3_moe", use_rslora=True, form="target-parameters"), tmp_path / "fused")
    scaled = [f for f in validate(per, base_of("qwen3_moe")) if f.code == "expert-scale"]
    assert {f.modules[0].rsplit(".", 1)[-1] for f in scaled} == {"gate_proj"} and len(scaled) == 2
    assert "1.414x" in scaled[0].message
    assert validate(fused, base_of("qwen3_moe")) == []
    assert not torch.allclose(peft_load("qwen3_moe", per)[0], peft_load("qwen3_moe", fused)[0], atol=1e-3)


def test_qwen2_moe_per_expert_keys_are_dropped_silently(tmp_path):
    path, _ = build("expert-unconverted", tmp_path / "a")
    fused = _save(family_adapter("qwen2_moe"), tmp_path / "fused")  # the same factors as target_parameters
    logits, troubles = peft_load("qwen2_moe", path)
    assert troubles == []
    assert not torch.allclose(logits, peft_load("qwen2_moe", fused)[0], atol=1e-3)


def test_parameter_entry_matching_nothing_is_ignored(tmp_path):
    path, _ = build("parameter-unmatched", tmp_path / "a")
    clean = _save(family_adapter("qwen3_moe", form="target-parameters"), tmp_path / "clean")
    assert torch.equal(peft_load("qwen3_moe", path)[0], peft_load("qwen3_moe", clean)[0])


def test_dense_layers_lose_their_lora_and_the_fix_restores_it(tmp_path):
    path, base = build("dense-converted", tmp_path / "a")
    meant = _save(family_adapter("deepseek_v3", targets=("gate_proj", "up_proj", "down_proj")), tmp_path / "meant")
    broken, troubles = peft_load("deepseek_v3", path)
    expected, _ = peft_load("deepseek_v3", meant)
    assert not torch.allclose(broken, expected, atol=1e-3)
    report = validate_adapter(path, base, fix_output=tmp_path / "fixed")
    assert report.fix.remaining == []
    fixed, troubles = peft_load("deepseek_v3", tmp_path / "fixed")
    assert troubles == [] and torch.allclose(fixed, expected, atol=1e-6)


def test_dropout_fix_loads_with_the_adapters_outputs(tmp_path):
    path, base = build("parameter-refused", tmp_path / "a")
    report = validate_adapter(path, base, fix_output=tmp_path / "fixed")
    assert report.fix.remaining == []
    clean = _save(per_expert(), tmp_path / "clean")
    assert torch.equal(peft_load("qwen3_moe", tmp_path / "fixed")[0], peft_load("qwen3_moe", clean)[0])


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_checkpoint_named_vlm_keys_are_missed_as_validate_says(tmp_path, family):
    """Qwen2-VL: PEFT renames no key. Llava: PEFT renames the language model's keys by transformers' rules but undoes
    the vision tower's (its model name only adds a prefix), so exactly those are missed. The fixed copy is the
    adapter keyed by the model's names."""
    meant = family_adapter(family, targets=("q_proj", "v_proj", "qkv", "fc1", "fc2", "gate_proj"))
    path = _save(checkpoint_named(meant, family), tmp_path / "ckpt")
    found = [f for f in validate(path, base_of(family)) if f.code == "key-checkpoint-name"]
    assert len(found) == 1
    flagged = set(found[0].modules or (found[0].where,))
    _, troubles = peft_load(family, path)
    missing = {key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
               for key in troubles[0].split("[", 1)[1].split("]", 1)[0].replace("'", "").split(", ")}
    names = {m: meant_name for m, meant_name in zip(checkpoint_named(meant, family).modules, meant.modules)}
    assert missing == {names[m] for m in flagged}
    report = validate_adapter(path, base_of(family), fix_output=tmp_path / "fixed")
    assert report.fix.remaining == []
    good = _save(meant, tmp_path / "meant")
    fixed, troubles = peft_load(family, tmp_path / "fixed")
    assert troubles == [] and torch.equal(fixed, peft_load(family, good)[0])


def test_every_moe_case_is_one_peft_mishandles(tmp_path):
    """No MoE finding is about an adapter PEFT loads as meant: each case above either raises, warns, or differs."""
    assert {code for code in CASES if CASES[code].base not in (True, False)} == {
        "key-checkpoint-name", "parameter-unmatched", "parameter-refused", "expert-unconverted", "expert-fused-part",
        "expert-missing", "expert-layer-missing", "expert-rank", "expert-scale", "dense-converted"}
