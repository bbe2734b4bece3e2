"""Consistent LoRA adapters for the MoE and multimodal fixture families (fixtures/moe/*, fixtures/vlm/*), in the
layouts PEFT 0.21.2 loads on transformers 5, laid out by ``surgery.adapter_layout.peft_layout`` as
tests/parity/test_moe_layout.py checks it against PEFT: VLM modules under the model's names, experts per expert
under the checkpoint's names where PEFT converts them, else (and for gpt-oss's fused checkpoint) as
``target_parameters`` on the fused parameters (PEFT's ParamWrapper layout).

Factors are seeded random (``B`` nonzero), so the adapters are for checks of layout, shapes and per-expert math,
not of a fine-tune.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from lorasurg.config import LoraConfig
from lorasurg.io.adapter import Adapter, AdapterModule
from lorasurg.io.checkpoint import Checkpoint
from lorasurg.surgery.adapter_layout import ExpertStack, peft_layout

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = {"qwen3_moe": "moe", "mixtral": "moe", "qwen2_moe": "moe", "deepseek_v3": "moe", "gpt_oss": "moe",
            "qwen2_vl": "vlm", "llava": "vlm"}
EXPERT_TARGETS = ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "gate_up_proj")
TARGETS = ("q_proj", "v_proj") + EXPERT_TARGETS


def base_of(family: str) -> Path:
    return ROOT / "fixtures" / FAMILIES[family] / family / "base"


def family_adapter(family: str, r: int = 2, targets: Sequence[str] = TARGETS, seed: int = 0,
                   form: Optional[str] = None, alpha: Optional[float] = None, **config) -> Adapter:
    """A rank-``r`` adapter (``lora_alpha`` 2r by default) on every linear module of ``family``'s base whose leaf
    is in ``targets`` (experts included; gpt-oss's fused expert parameters by their leaf names)."""
    alpha = 2 * r if alpha is None else alpha
    with Checkpoint.open(base_of(family)) as ckpt:
        description = ckpt.describe()
        model_type = ckpt.config["model_type"]
    gen = torch.Generator().manual_seed(seed)
    factors, ranks = {}, {}
    for module, info in description.modules.items():
        if module.rsplit(".", 1)[-1] in targets and info.kind == "linear" and module not in description.output_layers:
            out_f, in_f = info.weight_shape
            factors[module] = AdapterModule(module, 0.1 * torch.randn(r, in_f, generator=gen),
                                            0.1 * torch.randn(out_f, r, generator=gen))
            ranks[module] = (r, alpha)
    stacks = {}
    for name, param in description.parameters.items():
        if param.stored and param.name.rsplit(".", 1)[-1] in targets:
            E = param.experts
            stacks[name] = ExpertStack(0.1 * torch.randn(E, r, param.in_features, generator=gen),
                                       0.1 * torch.randn(E, param.out_features, r, generator=gen), r, alpha)
    layout = peft_layout(description, factors, ranks, model_type=model_type, stacks=stacks, form=form,
                         use_rslora=bool(config.get("use_rslora")))
    cfg = LoraConfig(**layout.fields, init_lora_weights=True, task_type="CAUSAL_LM", **config)
    return Adapter(cfg, layout.modules, layout.extra)


def checkpoint_named(adapter: Adapter, family: str) -> Adapter:
    """``adapter`` with every module keyed by its checkpoint name (how adapters for VLMs were written before
    transformers 5)."""
    with Checkpoint.open(base_of(family)) as ckpt:
        names = ckpt.describe().names
    inverse = {model: key for key, model in names.items()}
    modules = {}
    for name, mod in adapter.modules.items():
        key = inverse.get(name, name)
        modules[key] = AdapterModule(key, mod.A, mod.B, mod.bias, mod.magnitude, mod.embedding)
    return Adapter(adapter.config, modules, dict(adapter.extra))
