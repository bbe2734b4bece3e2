"""How PEFT 0.21.2 on transformers 5 reads LoRA on mixture-of-experts models, as data (measured, and read in
``peft/utils/transformers_weight_conversion.py`` and ``peft/tuners/tuners_utils.py``; the wording is ours).

transformers 5 fuses the experts of most MoE classes into 3-D parameters (:mod:`lorasurg.io.keymap`). PEFT then
adapts them in one of two ways:

``per-expert``
    Adapters written as they were before transformers 5: one LoRA per expert matrix, keyed by the checkpoint's
    names (``mlp.experts.3.gate_proj.lora_A.weight``, Mixtral's ``block_sparse_moe.experts.3.w1``), the leaf names in
    ``target_modules``. When it loads (and in ``get_peft_model``), PEFT converts the config and the keys to
    ``target_parameters`` on the fused parameters (``convert_peft_config_for_transformers``,
    ``convert_peft_adapter_state_dict_for_transformers``), **only** for the model types whose transformers
    conversion pattern (``transformers.conversion_mapping._MODEL_TO_CONVERSION_PATTERN``, plus ``mixtral``
    itself, which PEFT adds) is ``mixtral`` or ``qwen2_moe``: Qwen3-MoE, DeepSeek-V2/V3, OLMoE, GLM-4.5 MoE, ...
    ``qwen2_moe`` itself is not among them (its pattern is itself, not an entry of the table), so PEFT 0.21.2 loads
    a per-expert Qwen2-MoE adapter without its experts, silently. Conditions of the conversion:

    * every expert of every adapted projection present, both parts of a fused ``gate_up_proj`` targeted;
    * every expert at the config's global ``r`` and ``lora_alpha`` (the conversion appends
      ``rank_pattern[".*\\.gate_up_proj"] = 2 r``, ``alpha_pattern[...] = 2 lora_alpha`` and reads ``down_proj`` at
      ``r``; per-expert ``rank_pattern`` entries are ignored);
    * every ``target_modules`` entry equal to, or ending in ``"." +``, one of the per-type names
      (:data:`CONVERTED_NAMES`) is taken out of ``target_modules`` and mapped to a fused parameter — also when it
      names a plain linear layer (DeepSeek-V3's dense first layers ``mlp.gate_proj``, its ``shared_experts``,
      Qwen2-MoE-style ``shared_expert``): such a layer is then not adapted. Listing it in ``target_parameters`` as
      ``"<module>.weight"`` instead keeps it (a ``ParamWrapper`` on the 2-D weight, tensors stored as a linear
      layer's); measured exact on the DeepSeek-V3 fixture.

``target-parameters``
    ``target_parameters`` on the fused parameters, PEFT's ``ParamWrapper`` layout (:mod:`lorasurg.engine.experts`,
    :func:`lorasurg.io.adapter.wrapper_paths`): what PEFT itself writes for a transformers-5 MoE model, and the only
    form for types it does not convert (Qwen2-MoE) and for checkpoints that store experts fused (gpt-oss).

A ``ParamWrapper`` refuses ``lora_dropout``, ``lora_bias``, ``use_dora`` and ``fan_in_fan_out``, for the whole
config (``peft/tuners/lora/layer.py``, ``ParamWrapper.__init__``).
"""

from __future__ import annotations

from typing import Optional

__all__ = ["PEFT_MOE_SOURCE", "CONVERTED_NAMES", "peft_conversion_pattern", "peft_converts_experts",
           "PARAM_WRAPPER_REFUSES", "peft_renames_adapter_keys"]

PEFT_MOE_SOURCE = "peft 0.21.2, peft/utils/transformers_weight_conversion.py (_convert_peft_config_moe)"

#: conversion pattern -> the ``target_modules`` leaf names PEFT maps to fused parameters (``_MOE_TARGET_MODULE_MAPPING``)
CONVERTED_NAMES: dict[str, frozenset[str]] = {
    "mixtral": frozenset({"gate", "w1", "w2", "w3"}),
    "qwen2_moe": frozenset({"gate", "gate_proj", "up_proj", "down_proj"}),
}

#: config fields a ``target_parameters`` LoRA cannot have (PEFT's ``ParamWrapper`` raises)
PARAM_WRAPPER_REFUSES: tuple[str, ...] = ("lora_dropout", "lora_bias", "use_dora", "fan_in_fan_out")


def peft_conversion_pattern(model_type: Optional[str]) -> Optional[str]:
    """The conversion pattern PEFT 0.21.2 finds for ``model_type`` (``mixtral``, ``qwen2_moe``, another, or None):
    transformers' ``_MODEL_TO_CONVERSION_PATTERN`` entry, with ``mixtral`` mapped to itself as PEFT adds."""
    if not model_type:
        return None
    if model_type == "mixtral":
        return "mixtral"
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN
    except ImportError:  # transformers 4.x: no conversion, no fused experts
        return None
    return _MODEL_TO_CONVERSION_PATTERN.get(model_type)


def peft_converts_experts(model_type: Optional[str]) -> bool:
    """Whether PEFT 0.21.2 converts a per-expert adapter of ``model_type`` to the fused parameters on load."""
    return peft_conversion_pattern(model_type) in CONVERTED_NAMES


def peft_renames_adapter_keys(model_type: Optional[str]) -> bool:
    """Whether PEFT 0.21.2 renames a loaded adapter's LoRA keys by transformers' conversion rules for ``model_type``
    (``convert_peft_adapter_state_dict_for_transformers``: for every type with a checkpoint conversion mapping, e.g.
    Llava's ``language_model.`` -> ``model.language_model.``, Mixtral's ``block_sparse_moe`` -> ``mlp``), so that
    LoRA keys under the checkpoint's module names load too. Types without one (Qwen2-VL) load only the model's names.
    Saved copies (``modules_to_save``) are never renamed. Measured exception: where the model's name ends with the
    checkpoint's (Llava's ``vision_tower.`` -> ``model.vision_tower.``), PEFT takes the key as renamed already, undoes
    the rename and reports those keys missing; a checkpoint-named adapter is still meant for those modules."""
    if not model_type:
        return False
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4.x: the checkpoint's names are the model's
        return False
    return get_checkpoint_conversion_mapping(model_type) is not None
