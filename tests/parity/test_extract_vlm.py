"""Extracted adapters of multimodal models load in PEFT on the transformers-5 model, keyed as the model names its
modules (``model.language_model.*``, ``model.visual.*``), with no missing or unexpected keys, and give the tuned
model's logits (exactly at full rank)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from lorasurg.io.adapter import Adapter  # noqa: E402
from lorasurg.surgery.extract import extract_to_dir  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "vlm"
IDS = torch.tensor([[3, 5, 7, 9, 11, 2, 8, 20, 30, 40]])


def load(path: Path):
    config = json.loads((path / "config.json").read_text())
    return getattr(transformers, config["architectures"][0]).from_pretrained(path, dtype=torch.float32).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_full_rank_extract_of_a_vlm_is_the_tuned_model_in_peft(family, tmp_path):
    base, tuned = FIXTURES / family / "base", FIXTURES / family / "tuned"
    extract_to_dir(base, tuned, tmp_path / "adapter", r=256, svd="exact")
    adapter = Adapter.load(tmp_path / "adapter")
    model = load(base)
    modules = {name for name, _ in model.named_modules()}
    assert set(adapter.modules) <= modules  # every key in the model's namespace
    assert any(name.startswith("model.language_model.") for name in adapter.modules)
    assert any(name.startswith(("model.visual.", "model.vision_tower.")) for name in adapter.modules)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    expected = set(peft.get_peft_model_state_dict(pm, save_embedding_layers=False))
    stored = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert expected == stored
    wrapped = {name.removeprefix("base_model.model.") for name, m in pm.named_modules() if hasattr(m, "lora_A")
               and not name.endswith(("lora_A", "lora_B"))}
    assert wrapped == set(adapter.modules)  # target_modules selects exactly the modules with factors
    reference = logits(load(tuned))
    got = logits(pm)
    assert float((got - reference).abs().max()) <= 1e-4 * float(reference.abs().max())
