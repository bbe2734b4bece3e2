"""``fuse`` on mixture-of-experts and multimodal checkpoints against PEFT 0.21.2 on transformers 5.

Adapters in every layout PEFT loads: made by PEFT itself (``get_peft_model`` with ``target_parameters`` on the fused
experts, a 2-D ``target_parameters`` entry, VLM towers by the model's names, ``save_pretrained``) and by
``surgery.adapter_layout.peft_layout`` from the exact factors of each fixture's fine-tune (per-expert where PEFT
converts them, ``target_parameters`` otherwise, gpt-oss's stored 3-D experts). The fused checkpoint keeps BASE's keys,
dtypes and untouched tensors bit for bit, and ``from_pretrained`` of it gives PEFT's ``merge_and_unload`` (or, where
PEFT misreads the adapter, the adapter's definition: the tuned model its exact factors came from).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from lorasurg.config import LoraConfig  # noqa: E402
from lorasurg.io.adapter import Adapter, AdapterModule  # noqa: E402
from lorasurg.surgery.adapter_layout import peft_layout  # noqa: E402
from lorasurg.surgery.fuse import fuse  # noqa: E402
from tests.parity.test_fuse_parity import adapted, merged_state  # noqa: E402
from tests.parity.test_moe_layout import changed_factors  # noqa: E402

pytestmark = pytest.mark.parity

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
IDS = torch.tensor([[3, 5, 7, 9, 11, 2, 8, 20, 30, 40, 50, 60]])
FAMILY_DIR = {"qwen3_moe": "moe", "mixtral": "moe", "qwen2_moe": "moe", "deepseek_v3": "moe", "gpt_oss": "moe",
              "qwen2_vl": "vlm", "llava": "vlm"}
#: LoRA configs PEFT itself makes on each family: experts through target_parameters, a 2-D target_parameters entry
#: (DeepSeek-V3's dense gate_proj), VLM towers and heads by the model's names, a saved copy
PEFT_CONFIGS = {
    "qwen3_moe": dict(target_modules=["q_proj", "o_proj"], target_parameters=["gate_up_proj", "down_proj"]),
    "mixtral": dict(target_modules=["q_proj"], target_parameters=["gate_up_proj", "down_proj"],
                    modules_to_save=["model.layers.0.mlp.gate"]),
    "qwen2_moe": dict(target_modules=["q_proj", "shared_expert.up_proj"], target_parameters=["down_proj"]),
    "deepseek_v3": dict(target_modules=["q_a_proj"],
                        target_parameters=["gate_up_proj", "down_proj", "model.layers.0.mlp.gate_proj.weight"]),
    "gpt_oss": dict(target_modules=["q_proj"], target_parameters=["gate_up_proj", "down_proj"]),
    "qwen2_vl": dict(target_modules=["q_proj", "qkv", "fc1", "mlp.0"], modules_to_save=["model.language_model.norm"]),
    "llava": dict(target_modules=["q_proj", "fc1", "linear_1", "lm_head"]),
}


def family(name: str) -> Path:
    return FIXTURES / FAMILY_DIR[name] / name


def load(path: Path):
    """The checkpoint's own architecture class (a VLM's conditional-generation class), float32."""
    config = json.loads((Path(path) / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(path, dtype=torch.float32).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def peft_adapter(name: str, directory: Path, **overrides):
    """PEFT's own adapter on ``name``'s base (factors non-zero, saved copies perturbed), saved to ``directory``."""
    return adapted(load(family(name) / "base"), directory, r=4, lora_alpha=8, **{**PEFT_CONFIGS[name], **overrides})


def assert_base_layout(base: Path, fused: Path, report) -> None:
    """BASE's keys and dtypes; every tensor the report does not name as merged or replaced is BASE's, bit for bit."""
    ours, theirs = load_file(str(fused / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert list(ours) == list(theirs)
    touched = {m.module if m.kind == "experts" else f"{m.module}.weight" for m in report.modules} | set(report.replaced)
    assert touched <= set(theirs)
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype, key
        if key not in touched:
            assert torch.equal(ours[key], tensor), key


def assert_states_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    """Model-namespace states equal to float32 rounding, relative to each tensor's largest entry."""
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        scale = max(float(tensor.abs().max()), 1e-30)
        assert float((ours[key] - tensor).abs().max()) <= rtol * scale, key


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_peft_made_adapters_fuse_to_merge_and_unload(tmp_path, name):
    pm = peft_adapter(name, tmp_path / "adapter")
    expected_logits = logits(pm)
    report = fuse(family(name) / "base", tmp_path / "adapter", tmp_path / "fused", device="cpu")
    assert_base_layout(family(name) / "base", tmp_path / "fused", report)
    model = load(tmp_path / "fused")
    assert_states_close(model.state_dict(), merged_state(pm))
    torch.testing.assert_close(logits(model), expected_logits, rtol=1e-4, atol=1e-5)


LAYOUT_FORMS = [("qwen3_moe", None), ("mixtral", None), ("deepseek_v3", None), ("qwen2_moe", None), ("gpt_oss", None),
                ("qwen3_moe", "target-parameters"), ("qwen2_vl", None), ("llava", None)]


def layout_adapter(name: str, directory: Path, form=None, **config) -> str:
    """The exact factors of ``name``'s fine-tune laid out by peft_layout, saved to ``directory``; returns the form."""
    description, factors, ranks, stacks, extra, saved, model_type = changed_factors(name, FIXTURES / FAMILY_DIR[name])
    layout = peft_layout(description, factors, ranks, model_type=model_type, stacks=stacks, extra=extra,
                         modules_to_save=saved, form=form)
    Adapter(LoraConfig(**layout.fields, init_lora_weights=True, **config), layout.modules, layout.extra).save(directory)
    return layout.form


@pytest.mark.parametrize("name, form", LAYOUT_FORMS)
def test_layout_adapters_fuse_to_the_tuned_model_and_to_merge_and_unload(tmp_path, name, form):
    layout_adapter(name, tmp_path / "adapter", form)
    report = fuse(family(name) / "base", tmp_path / "adapter", tmp_path / "fused", device="cpu")
    assert_base_layout(family(name) / "base", tmp_path / "fused", report)
    ours = load(tmp_path / "fused").state_dict()
    assert_states_close(ours, load(family(name) / "tuned").state_dict(), rtol=1e-6)  # exact factors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(load(family(name) / "base"), tmp_path / "adapter")
    assert_states_close(ours, merged_state(pm))


def test_per_expert_qwen2_moe_in_the_converted_form_fuses_to_merge_and_unload(tmp_path):
    """PEFT 0.21.2 converts per-expert keys on Qwen2-MoE but not the config: peft_layout's per-expert form lists the
    fused experts in target_parameters as its conversion would (gate_up_proj at 2r, 2 alpha), and PEFT loads the
    experts. fuse gives the tuned model (exact factors) and PEFT's merge_and_unload, with no note that PEFT differs."""
    assert layout_adapter("qwen2_moe", tmp_path / "adapter", "per-expert") == "per-expert"
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                                   for p in ("down_proj", "gate_up_proj")]
    report = fuse(family("qwen2_moe") / "base", tmp_path / "adapter", tmp_path / "fused", device="cpu")
    assert not any("does not load per-expert keys" in note for note in report.notes)
    ours = load(tmp_path / "fused").state_dict()
    assert_states_close(ours, load(family("qwen2_moe") / "tuned").state_dict(), rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(load(family("qwen2_moe") / "base"), tmp_path / "adapter")
    assert_states_close(ours, merged_state(pm))


def test_per_expert_qwen2_moe_is_fused_where_peft_ignores_it(tmp_path):
    """The same adapter without target_parameters (as per-expert adapters were written for transformers 4): PEFT
    loads it without its experts. fuse merges them as the adapter defines them, and says what PEFT does."""
    layout_adapter("qwen2_moe", tmp_path / "converted", "per-expert")
    adapter = Adapter.load(tmp_path / "converted")
    cfg = adapter.config
    experts = {k for k in cfg.rank_pattern if "experts" in k}  # the fused parameters' entries
    adapter.config = dataclasses.replace(cfg, target_parameters=None,
                                         rank_pattern={k: v for k, v in cfg.rank_pattern.items() if k not in experts},
                                         alpha_pattern={k: v for k, v in cfg.alpha_pattern.items() if k not in experts})
    adapter.save(tmp_path / "adapter")
    report = fuse(family("qwen2_moe") / "base", tmp_path / "adapter", tmp_path / "fused", device="cpu")
    assert any("does not load per-expert keys on qwen2_moe" in note for note in report.notes)
    tuned = logits(load(family("qwen2_moe") / "tuned"))
    torch.testing.assert_close(logits(load(tmp_path / "fused")), tuned, rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(load(family("qwen2_moe") / "base"), tmp_path / "adapter")
    assert float((logits(pm) - tuned).abs().max()) > 1e-3  # PEFT's adapted model lacks the experts' deltas


def test_per_expert_rslora_follows_the_adapter_where_peft_scales_gate_up_by_sqrt2(tmp_path):
    """PEFT's per-expert conversion reads gate_up_proj at rank 2r and alpha 2 lora_alpha, which under rsLoRA is a
    scale sqrt(2) times the adapter's (2a / sqrt(2r)); down_proj keeps a / sqrt(r). fuse keeps every expert's own
    scale, so its gate_up delta is PEFT's divided by sqrt(2)."""
    description, factors, ranks, *_, model_type = changed_factors("qwen3_moe", FIXTURES / "moe")
    experts = {m: f for m, f in factors.items() if m in description.experts}
    layout = peft_layout(description, experts, {m: ranks[m] for m in experts}, model_type=model_type)
    config = LoraConfig(**layout.fields, init_lora_weights=True, use_rslora=True)
    Adapter(config, layout.modules, {}).save(tmp_path / "adapter")
    report = fuse(family("qwen3_moe") / "base", tmp_path / "adapter", tmp_path / "fused", device="cpu")
    assert any("a scale sqrt(2) times the adapter's" in note for note in report.notes)
    base = load(family("qwen3_moe") / "base").state_dict()
    ours = load(tmp_path / "fused").state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = merged_state(peft.PeftModel.from_pretrained(load(family("qwen3_moe") / "base"), tmp_path / "adapter"))
    gate_up, down = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"
    torch.testing.assert_close(theirs[gate_up] - base[gate_up], (ours[gate_up] - base[gate_up]) * 2 ** 0.5,
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(theirs[down], ours[down], rtol=1e-5, atol=1e-6)
    r, alpha = config.r, config.lora_alpha  # the definition: every expert at alpha / sqrt(r)
    module = "model.layers.0.mlp.experts.0.up_proj"
    expected = base[gate_up][0, 16:] + alpha / r ** 0.5 * layout.modules[module].B @ layout.modules[module].A
    torch.testing.assert_close(ours[gate_up][0, 16:], expected, rtol=1e-5, atol=1e-6)


def test_llava_adapter_under_checkpoint_names_is_fused_as_the_model_named_one(tmp_path):
    """An adapter saved for transformers 4 names Llava's modules as the checkpoint does (``language_model.model.``,
    ``vision_tower.``, ``multi_modal_projector.``). PEFT renames such LoRA keys by transformers' checkpoint rules, but
    undoes the rename where the model's name ends with the checkpoint's (``model.vision_tower.`` after
    ``base_model.``), so it loads the language model's LoRA and reports the tower's and projector's missing. fuse
    renames them all: the result is the model-named adapter's merge."""
    pm = peft_adapter("llava", tmp_path / "adapter", target_modules=["q_proj", "fc1", "linear_1"])
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    old = {}
    for key, tensor in weights.items():
        for model, checkpoint in (("model.language_model.", "language_model.model."),
                                  ("model.vision_tower.", "vision_tower."),
                                  ("model.multi_modal_projector.", "multi_modal_projector.")):
            key = key.replace("base_model.model." + model, "base_model.model." + checkpoint)
        old[key] = tensor
    assert set(old) != set(weights)
    (tmp_path / "old").mkdir()
    save_file(old, str(tmp_path / "old" / "adapter_model.safetensors"))
    (tmp_path / "old" / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    report = fuse(family("llava") / "base", tmp_path / "old", tmp_path / "fused", device="cpu")
    assert any("renamed as PEFT renames them" in note for note in report.notes)
    ours = load(tmp_path / "fused").state_dict()
    assert_states_close(ours, merged_state(pm))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = merged_state(peft.PeftModel.from_pretrained(load(family("llava") / "base"), tmp_path / "old"))
    missing = " ".join(str(w.message) for w in caught if "missing adapter keys" in str(w.message))
    assert "vision_tower" in missing and "multi_modal_projector" in missing and "language_model" not in missing
    language = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(theirs[language], ours[language])
    tower = "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(theirs[tower], ours[tower])  # PEFT kept its fresh init there


def test_mixtral_router_lora_under_checkpoint_names_merges_as_peft_reads_it(tmp_path):
    """An adapter written for transformers 4 on Mixtral: per-expert w1/w2/w3 and a LoRA on the router
    ``block_sparse_moe.gate`` (an nn.Linear then, a custom router module now). PEFT renames the key to ``mlp.gate``
    and converts the ``gate`` target to a ParamWrapper on the router's 2-D weight; fuse merges it the same way."""
    description, factors, ranks, *_, model_type = changed_factors("mixtral", FIXTURES / "moe")
    experts = {m: f for m, f in factors.items() if m in description.experts}
    layout = peft_layout(description, experts, {m: ranks[m] for m in experts}, model_type=model_type)
    fields, modules = dict(layout.fields), dict(layout.modules)
    gen = torch.Generator().manual_seed(5)
    for layer in (0, 1):
        name = f"model.layers.{layer}.block_sparse_moe.gate"
        modules[name] = AdapterModule(name, 0.1 * torch.randn(fields["r"], 32, generator=gen),
                                      0.1 * torch.randn(4, fields["r"], generator=gen))
    fields["target_modules"] = sorted(set(fields["target_modules"]) | {"gate"})
    Adapter(LoraConfig(**fields, init_lora_weights=True), modules, {}).save(tmp_path / "adapter")
    report = fuse(family("mixtral") / "base", tmp_path / "adapter", tmp_path / "fused", device="cpu")
    assert any("block_sparse_moe.gate -> model.layers.0.mlp.gate" in note for note in report.notes)
    ours = load(tmp_path / "fused").state_dict()
    base = load(family("mixtral") / "base").state_dict()
    assert not torch.equal(ours["model.layers.0.mlp.gate.weight"], base["model.layers.0.mlp.gate.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(load(family("mixtral") / "base"), tmp_path / "adapter")
    assert_states_close(ours, merged_state(pm))
