"""Mixture-of-experts and multimodal layouts judged from the adapter's names alone, without ``--base``.

PEFT is the reference, but on transformers 5 it reads per-expert LoRA (``…mlp.experts.E.gate_proj``) only under the
conditions of :data:`~lorasurg.consumers.layouts.CONDITIONS` ``["peft"]``, and vision-tower LoRA only under the
model's own names. Without a base this check reports each broken condition by the adapter's module names, under the
codes the base-aware experts check (:mod:`.expert_checks`) gives the same conditions; with ``--base`` that check
judges them against the model and this one stays silent, so no condition is reported twice. vLLM's and llama.cpp's
conditions are reported by the consumers check (``--for``).
"""

from __future__ import annotations

from ...consumers.layouts import layout_features, layout_violations
from ...findings import Finding
from .subject import Subject

__all__ = ["LAYOUT_CODES", "check_layouts"]

#: condition code -> finding code.
LAYOUT_CODES: dict[str, str] = {
    "all-experts": "expert-missing",
    "all-projections": "expert-missing",
    "one-rank": "expert-rank",
    "one-alpha": "expert-scale",
    "no-rslora": "expert-scale",
    "plain-options": "parameter-refused",
    "non-expert-mlp": "dense-converted",
    "converted-type": "expert-unconverted",
}

_REWRITE = ("rewrite it with lorasurg.prepare_for(lorasurg.Adapter.load({source!r}, strict=False), 'peft')[0]"
            ".save(OUT): {what}")
_FIXES = {
    "expert-missing": "missing experts and projections get zero factors (lossless)",
    "expert-rank": "every expert module is zero-padded to one rank, the config's r (lossless)",
    "expert-scale": "the experts are written at one scale, lora_alpha / r, without rsLoRA (lossless)",
    "parameter-refused": "lora_dropout is written as 0; lora_bias and DoRA are left out and listed",
}


def check_layouts(subject: Subject) -> list[Finding]:
    """The MoE / multimodal layout findings for ``subject``'s adapter (config and tensors needed), without a base."""
    if subject.base is not None:
        return []  # the experts check judges the same conditions against the model
    adapter = subject.adapter
    found = []
    for v in layout_violations(adapter, "peft", None, None):
        code = LAYOUT_CODES[v.condition.code]
        message = f"PEFT 0.21.2 on transformers 5 {v.condition.treatment} this ({v.detail}): {v.condition.says}"
        if code == "expert-unconverted":
            fix = ("write the config in PEFT's converted form (target_parameters gate_up_proj and down_proj, "
                   "rank_pattern/alpha_pattern '.*\\.gate_up_proj' at 2 r and 2 lora_alpha; vLLM and llama.cpp "
                   "ignore target_parameters), or the experts as target_parameters LoRA on the fused parameters")
        elif code == "dense-converted":
            fix = ("list each of these modules in target_parameters as '<module>.weight' (PEFT then loads them "
                   "exactly), or leave them out; vLLM and llama.cpp read them as they are")
        else:
            fix = _REWRITE.format(source=subject.source, what=_FIXES[code])
        found.append(Finding(code, _where(v.where), message, fix + f"; source: {v.condition.source}", v.where))
    towers = layout_features(adapter).get("checkpoint_tower_names", [])
    if towers:
        found.append(Finding(
            "key-checkpoint-name", _where(tuple(towers)),
            f"{len(towers)} vision-tower/connector module(s) under the checkpoint's top-level names: PEFT 0.21.2 on "
            "transformers 5 loads none of them (it warns of missing keys under model.visual / model.vision_tower)",
            "rename the keys to the model's names (visual. -> model.visual., vision_tower. -> model.vision_tower., "
            "multi_modal_projector. -> model.multi_modal_projector.); vLLM accepts both names (and applies tower "
            "LoRA only with --enable-tower-connector-lora)",
            tuple(towers)))
    return found


def _where(modules: tuple[str, ...]) -> str:
    """``"<first module by name> and N more"``: the same text whatever order the adapter file lists them in."""
    more = f" and {len(modules) - 1} more" if len(modules) > 1 else ""
    return f"{min(modules)}{more}"
