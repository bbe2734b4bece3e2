"""Which adapter key namespaces PEFT (as installed: 0.21.2 on transformers 5) loads for multimodal models.

    python -m tools.probes.peft_vlm [qwen2_vl qwen2_5_vl llava gemma3 mistral3]

For each tiny model: what save_pretrained writes (checkpoint names) and what the model's modules are called, the
keys PEFT saves for LoRA on language and tower modules, then the same tensors renamed to the checkpoint's names and
to text-only names (model.layers.N, as PEFT on the text-only model writes them), loaded into a fresh model with
init_lora_weights true (B = 0 before loading): how many LoRA tensors PEFT loaded (equal to the file), which part
was not loaded (language, tower), and whether it warned of missing keys.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import warnings

import torch
from safetensors.torch import load_file, save_file

TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=128)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=14)
TARGETS = {"qwen2_vl": ["q_proj", "v_proj", "qkv", "fc1"], "qwen2_5_vl": ["q_proj", "v_proj", "qkv"],
           "llava": ["q_proj", "v_proj", "fc1", "linear_1"], "gemma3": ["q_proj", "v_proj", "fc1"],
           "mistral3": ["q_proj", "v_proj", "linear_1"]}
CHECKPOINT = {  # the model's prefix -> the checkpoint's (what save_pretrained writes), per family
    "qwen": [("model.language_model.", "model."), ("model.visual.", "visual.")],
    "llava": [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
              ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")],
}
TEXT_ONLY = [("model.language_model.", "model.")]


def config(kind):
    import transformers as T

    mrope = dict(rope_type="default", mrope_section=[2, 1, 1])
    if kind == "qwen2_vl":
        return T.Qwen2VLConfig(text_config=dict(model_type="qwen2_vl_text", **TEXT, rope_parameters=mrope),
                               vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2))
    if kind == "qwen2_5_vl":
        return T.Qwen2_5_VLConfig(text_config=dict(model_type="qwen2_5_vl_text", **TEXT, rope_parameters=mrope),
                                  vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4,
                                                     out_hidden_size=32, fullatt_block_indexes=[1]))
    if kind == "llava":
        return T.LlavaConfig(vision_config=dict(model_type="clip_vision_model", **VISION),
                             text_config=dict(model_type="llama", **TEXT), image_token_index=3)
    if kind == "gemma3":
        return T.Gemma3Config(text_config=dict(model_type="gemma3_text", head_dim=8, **TEXT),
                              vision_config=dict(model_type="siglip_vision_model", **VISION), mm_tokens_per_image=4,
                              image_token_index=3)
    return T.Mistral3Config(vision_config=dict(model_type="pixtral", **{**VISION, "head_dim": 8}),
                            text_config=dict(model_type="mistral", head_dim=8, **TEXT), image_token_index=3,
                            spatial_merge_size=1)


def model(kind):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config(kind)).eval()


def rename(state, rules):
    out = {}
    for key, value in state.items():
        rest = key.removeprefix("base_model.model.")
        for a, b in rules:
            if rest.startswith(a):
                rest = b + rest[len(a):]
                break
        out["base_model.model." + rest] = value
    return out


def prefixes(keys):
    return sorted({re.sub(r"\.\d+\..*", ".N.…", k) if re.search(r"\.\d+\.", k) else k.rsplit(".", 1)[0]
                   for k in keys})


def probe(kind):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = model(kind)
    directory = tempfile.mkdtemp()
    base.save_pretrained(directory)
    print(f"== {kind} ({type(base).__name__})")
    print("   checkpoint:", prefixes(load_file(f"{directory}/model.safetensors"))[:8])
    print("   model:     ", prefixes(n for n, _ in base.named_parameters())[:8])
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], init_lora_weights=False))
    saved = tempfile.mkdtemp()
    pm.save_pretrained(saved)
    state = load_file(f"{saved}/adapter_model.safetensors")
    print("   PEFT saves:", prefixes(k for k in state if ".1." not in k)[:6])
    family = "qwen" if kind.startswith("qwen") else "llava"
    for label, rules in (("model names", []), ("checkpoint names", CHECKPOINT[family]), ("text-only names", TEXT_ONLY)):
        ad = tempfile.mkdtemp()
        cfg = json.load(open(f"{saved}/adapter_config.json"))
        cfg["init_lora_weights"] = True  # B = 0 at injection: only what is loaded from the file is non-zero
        json.dump(cfg, open(f"{ad}/adapter_config.json", "w"))
        save_file(rename(state, rules), f"{ad}/adapter_model.safetensors")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = PeftModel.from_pretrained(model(kind), ad)
        params = dict(loaded.named_parameters())
        hit, missed = 0, set()
        for key, value in state.items():
            p = params.get(key.replace(".lora_A.weight", ".lora_A.default.weight")
                           .replace(".lora_B.weight", ".lora_B.default.weight"))
            if p is not None and torch.equal(p.detach(), value):
                hit += 1
            else:
                missed.add("tower" if re.search(r"visual|vision_tower|projector", key) else "language")
        warned = any("missing adapter keys" in str(w.message) for w in caught)
        example = sorted(k for k in rename(state, rules) if ".0." in k)[0]
        print(f"   {label:16s} e.g. {example}: loaded {hit}/{len(state)}, not loaded: {sorted(missed) or '-'}; "
              f"missing-keys warning: {warned}")


if __name__ == "__main__":
    for kind in sys.argv[1:] or list(TARGETS):
        probe(kind)
