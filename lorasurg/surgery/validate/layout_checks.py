"""Mixture-of-experts and multimodal layouts: what PEFT 0.21.2 on transformers 5 refuses, drops or misapplies.

PEFT is the reference, but on transformers 5 it reads per-expert LoRA (``…mlp.experts.E.gate_proj``) only under the
conditions of :data:`~lorasurg.consumers.layouts.CONDITIONS` ``["peft"]``, and vision-tower LoRA only under the
model's own names. This check reports each broken condition by the adapter's module names (no base needed); with
``--base`` the number of experts per layer comes from the base checkpoint's keys, and MoE layers with no expert
LoRA at all are reported too. vLLM's and llama.cpp's conditions are reported by the consumers check (``--for``).
"""

from __future__ import annotations

from ...consumers.layouts import checkpoint_experts, layout_features, layout_violations, missing_layers
from ...findings import Finding
from .subject import Subject

__all__ = ["LAYOUT_CODES", "check_layouts"]

#: condition code -> finding code.
LAYOUT_CODES: dict[str, str] = {
    "all-experts": "moe-incomplete",
    "all-projections": "moe-incomplete",
    "one-rank": "moe-rank",
    "one-alpha": "moe-scale",
    "no-rslora": "moe-scale",
    "plain-options": "moe-options",
    "non-expert-mlp": "moe-dropped",
    "converted-type": "moe-dropped",
}

_REWRITE = ("rewrite it with lorasurg.prepare_for(lorasurg.Adapter.load({source!r}, strict=False), 'peft')[0]"
            ".save(OUT): {what}")
_FIXES = {
    "moe-incomplete": "missing experts and projections get zero factors (lossless)",
    "moe-rank": "every expert module is zero-padded to one rank, the config's r (lossless)",
    "moe-scale": "the experts are written at one scale, lora_alpha / r, without rsLoRA (lossless)",
    "moe-options": "lora_dropout is written as 0; lora_bias and DoRA are left out and listed",
}


def check_layouts(subject: Subject) -> list[Finding]:
    """The MoE / multimodal layout findings for ``subject``'s adapter (config and tensors needed)."""
    adapter = subject.adapter
    experts = checkpoint_experts(subject.base.shapes) if subject.base is not None else None
    model_type = subject.base.model_type if subject.base is not None else None
    found = []
    for v in layout_violations(adapter, "peft", experts or None, model_type):
        code = LAYOUT_CODES[v.condition.code]
        message = f"PEFT 0.21.2 on transformers 5 {v.condition.treatment} this ({v.detail}): {v.condition.says}"
        if v.condition.code == "converted-type":
            fix = ("write the config in PEFT's converted form (target_parameters gate_up_proj and down_proj, "
                   "rank_pattern/alpha_pattern '.*\\.gate_up_proj' at 2 r and 2 lora_alpha; vLLM and llama.cpp "
                   "ignore target_parameters), or the experts as target_parameters LoRA on the fused parameters")
        elif code == "moe-dropped":
            fix = ("list each of these modules in target_parameters as '<module>.weight' (PEFT then loads them "
                   "exactly), or leave them out; vLLM and llama.cpp read them as they are")
        else:
            fix = _REWRITE.format(source=subject.source, what=_FIXES[code])
        found.append(Finding(code, _where(v.where), message, fix + f"; source: {v.condition.source}", v.where))
    if experts:
        absent = missing_layers(adapter, experts)
        if absent:
            found.append(Finding(
                "moe-layer-missing", _where(tuple(absent)),
                f"{len(absent)} MoE layer(s) of the base have no expert LoRA while others have it: PEFT 0.21.2 on "
                "transformers 5 wraps the experts of every layer, warns of missing keys for these and applies zero",
                "give these layers zero factors for every expert (lorasurg extract writes them for unchanged experts)",
                tuple(absent)))
    towers = layout_features(adapter).get("checkpoint_tower_names", [])
    if towers:
        found.append(Finding(
            "tower-checkpoint-names", _where(tuple(towers)),
            f"{len(towers)} vision-tower/connector module(s) under the checkpoint's top-level names: PEFT 0.21.2 on "
            "transformers 5 loads none of them (it warns of missing keys under model.visual / model.vision_tower)",
            "rename the keys to the model's names (visual. -> model.visual., vision_tower. -> model.vision_tower., "
            "multi_modal_projector. -> model.multi_modal_projector.); vLLM accepts both names (and applies tower "
            "LoRA only with --enable-tower-connector-lora)",
            tuple(towers)))
    return found


def _where(modules: tuple[str, ...]) -> str:
    more = f" and {len(modules) - 1} more" if len(modules) > 1 else ""
    return f"{modules[0]}{more}"
