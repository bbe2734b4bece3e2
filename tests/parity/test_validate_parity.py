"""Adapters made by PEFT 0.21.2 on the tiny fixture models validate with no error and no warning against their
base; and the broken ones PEFT mishandles are the ones validate flags."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from lorasurg import validate  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASES = {name: ROOT / "fixtures" / f"tiny-{name}" / "base" for name in ("llama", "qwen2", "gpt2")}

CONFIGS = {
    "plain": ("llama", dict(r=4, target_modules=["q_proj", "v_proj"])),
    "dora": ("llama", dict(r=4, target_modules=["q_proj", "k_proj", "down_proj"], use_dora=True)),
    "lora_bias": ("qwen2", dict(r=4, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)),
    "patterns": ("llama", dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True,
                               rank_pattern={"q_proj": 2, "^model.layers.1.mlp.up_proj": 6},
                               alpha_pattern={"down_proj": 3.0})),
    "modules_to_save": ("qwen2", dict(r=4, target_modules=["o_proj"], modules_to_save=["lm_head", "model.norm"])),
    "embeddings": ("llama", dict(r=4, target_modules=["embed_tokens", "q_proj"])),
    "layers": ("llama", dict(r=4, target_modules=["gate_proj"], layers_to_transform=[1], layers_pattern="layers")),
    "exclude": ("qwen2", dict(r=4, target_modules="all-linear", exclude_modules=["k_proj"])),
    "gpt2_conv1d": ("gpt2", dict(r=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2_embeddings_dora": ("gpt2", dict(r=2, target_modules=["wte", "c_attn"], use_dora=True,
                                          fan_in_fan_out=True)),
}


def _peft_saved(tmp_path: Path, name: str) -> tuple[Path, Path]:
    from transformers import AutoModelForCausalLM

    arch, config = CONFIGS[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(BASES[arch])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, peft.LoraConfig(**config))
        with torch.no_grad():  # "trained": lora_B no longer zero
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name or "lora_embedding_B" in param_name:
                    param.normal_(0, 0.01)
        peft_model.save_pretrained(tmp_path / name)
    return tmp_path / name, BASES[arch]


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_peft_made_adapters_validate_clean(tmp_path, name):
    path, base = _peft_saved(tmp_path, name)
    findings = validate(path, base)
    assert [f for f in findings if f.severity != "info"] == []
    assert [f.code for f in findings] == []  # with --base nothing is skipped either


@pytest.mark.parity
def test_lora_bias_tensors_without_the_flag_are_dropped_by_peft(tmp_path):
    """What bias-unflagged is about: PEFT loads such an adapter without the biases and without an error."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path, base = _peft_saved(tmp_path, "lora_bias")
    config = json.loads((path / "adapter_config.json").read_text())
    config["lora_bias"] = False
    (path / "adapter_config.json").write_text(json.dumps(config))
    assert any(f.code == "bias-unflagged" for f in validate(path, base))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)
    saved = load_file(path / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.bias") for k in saved)
    assert not any("lora_B" in n and n.endswith(".bias") for n, _ in loaded.named_parameters())
