"""Extracted adapters in PEFT: they load onto BASE with no missing or unexpected keys and move it to TUNED."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from lorasurg.surgery.extract import extract_to_dir  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
IDS = torch.arange(8, 40).reshape(2, 16)


def pair(arch: str) -> tuple[Path, Path]:
    return FIXTURES / f"tiny-{arch}" / "base", FIXTURES / f"tiny-{arch}" / "tuned"


def load_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def load_adapter(base: Path, adapter: Path):
    """PeftModel on ``base``; returns it, the keys PEFT expects that the file lacks, the file's keys PEFT does
    not expect, and the warnings raised while loading."""
    model = load_model(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, adapter)
    # base_layer copies of targeted embeddings are optional extras PEFT saves, not keys it needs
    expected = set(peft.get_peft_model_state_dict(pm, save_embedding_layers=False).keys())
    stored = set(load_file(str(adapter / "adapter_model.safetensors")))
    messages = [str(w.message) for w in caught]
    return pm.eval(), sorted(expected - stored), sorted(stored - expected), messages


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("embeddings", ["lora", "full", "skip"])
def test_loads_cleanly_and_moves_toward_tuned(tmp_path, arch, embeddings):
    base, tuned = pair(arch)
    extract_to_dir(base, tuned, tmp_path / "ad", r=4, embeddings=embeddings)
    pm, missing, unexpected, messages = load_adapter(base, tmp_path / "ad")
    assert missing == [] and unexpected == []
    assert not any("missing adapter keys" in m.lower() for m in messages)
    target = logits(load_model(tuned))
    assert rel(logits(pm), target) < rel(logits(load_model(base)), target)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_full_rank_reproduces_tuned(tmp_path, arch):
    base, tuned = pair(arch)
    extract_to_dir(base, tuned, tmp_path / "ad", r=256, svd="exact")
    pm, missing, unexpected, _ = load_adapter(base, tmp_path / "ad")
    assert missing == [] and unexpected == []
    assert rel(logits(pm), logits(load_model(tuned))) < 1e-5


def test_lora_bias_deltas_exact_through_merge_and_unload(tmp_path):
    base, tuned = pair("qwen2")
    # q/k/v have biases, so PEFT can merge lora_bias into them
    report = extract_to_dir(base, tuned, tmp_path / "ad", r=64, target_modules=["q_proj", "k_proj", "v_proj"])
    assert report.lora_bias
    pm, missing, unexpected, _ = load_adapter(base, tmp_path / "ad")
    assert missing == [] and unexpected == []
    merged = pm.merge_and_unload()
    want = load_model(tuned).state_dict()
    got = merged.state_dict()
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{proj}"
            torch.testing.assert_close(got[f"{name}.bias"], want[f"{name}.bias"], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got[f"{name}.weight"], want[f"{name}.weight"], rtol=1e-4, atol=1e-5)


def test_lora_bias_on_all_layers_loads_without_missing_keys(tmp_path):
    base, tuned = pair("qwen2")
    report = extract_to_dir(base, tuned, tmp_path / "ad", r=256, svd="exact")
    assert report.lora_bias
    pm, missing, unexpected, messages = load_adapter(base, tmp_path / "ad")
    assert missing == [] and unexpected == []
    # layers without a bias get a zero lora_B.bias: PEFT warns they cannot be merged, and the report says so
    assert any("has no bias" in m for m in messages)
    assert any("merge_and_unload refuses" in n for n in report.notes)
    assert rel(logits(pm), logits(load_model(tuned))) < 1e-5


def test_serving_adapter_loads_cleanly(tmp_path):
    base, tuned = pair("qwen2")
    extract_to_dir(base, tuned, tmp_path / "ad", r=8, serving=True)
    pm, missing, unexpected, _ = load_adapter(base, tmp_path / "ad")
    assert missing == [] and unexpected == []
    assert pm.peft_config["default"].modules_to_save is None
    assert not any("lm_head" in k or "embed" in k for k in load_file(str(tmp_path / "ad" / "adapter_model.safetensors")))


def test_tied_full_embeddings_merge_exactly(tmp_path):
    base, tuned = pair("gpt2")
    extract_to_dir(base, tuned, tmp_path / "ad", r=256, svd="exact", embeddings="full")
    pm, missing, unexpected, _ = load_adapter(base, tmp_path / "ad")
    assert missing == [] and unexpected == []
    merged = pm.merge_and_unload()
    assert rel(logits(merged), logits(load_model(tuned))) < 1e-5


def test_peft_warns_invalid_shape_when_saving_its_own_lora_bias_adapters(tmp_path):
    """PEFT 0.21.2 bug: its ZeRO-3/FSDP check on save calls every 1-D ``lora_A``/``lora_B`` tensor "invalid", so
    saving any ``lora_bias`` adapter (``lora_B.bias`` is 1-D) warns although nothing is wrong. The same check runs
    in ``get_peft_model_state_dict``, so it shows when an extracted lora_bias adapter is re-saved; this pins the
    behaviour on an adapter PEFT saves itself, which then loads with the bias intact."""
    model = load_model(pair("qwen2")[0])
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm.save_pretrained(tmp_path / "peft")
    assert any("invalid shape" in str(w.message) and "lora_B.bias" in str(w.message) for w in caught)
    loaded = peft.PeftModel.from_pretrained(load_model(pair("qwen2")[0]), tmp_path / "peft")
    bias = loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].bias
    assert torch.all(bias == 0.5)  # nothing was wrong with it
