"""What PEFT 0.21.2 on transformers 5 does to an adapter's config and key names when it loads it, on names alone.

Two conversions run in ``PeftModel.from_pretrained`` (``peft/utils/transformers_weight_conversion.py``; measured on
the fixtures, see tests/parity/test_validate_moe_parity.py):

**The MoE config conversion** (``_convert_peft_config_moe``), for model types whose transformers conversion pattern is
``mixtral`` or ``qwen2_moe`` (:func:`~lorasurg.consumers.experts.peft_converts_experts`): every ``target_modules``
entry equal to, or ending in ``"." +``, a leaf of :data:`CONVERTED_TARGETS` leaves ``target_modules`` and its fused
parameter joins ``target_parameters`` (as the bare leaf, so it selects that parameter in *every* layer); when every
part of a fused parameter is targeted (``gate_proj`` and ``up_proj``), ``rank_pattern`` and ``alpha_pattern`` get
``".*\\.gate_up_proj"`` at ``len(parts)`` times the global ``r`` and ``lora_alpha``, after the keys already there;
when only some are, PEFT raises. A string ``target_modules`` (a regex, ``"all-linear"``) is first replaced by the
leaf names it selects (so a regex that names one layer's ``q_proj`` selects every layer's).
:func:`peft_converted_config` does the same to a :class:`~lorasurg.config.LoraConfig`.

**Key renaming** (``convert_peft_adapter_state_dict_for_transformers``), for model types with a registered checkpoint
conversion (``transformers.conversion_mapping.get_checkpoint_conversion_mapping``: Llava and its family, the MoE
types; not Qwen2-VL): the LoRA keys are renamed by the model's own renaming rules, as checkpoint keys are, except
where the model's name is a suffix of ``"base_model.model." + key`` (a rename that only adds a prefix, such as
Llava's ``vision_tower`` -> ``model.vision_tower``, is undone). Non-LoRA keys (``modules_to_save`` copies) are not
renamed. :func:`peft_loaded_name` gives the name a module's LoRA keys end up under.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from ..targeting import ALL_LINEAR
from .experts import peft_conversion_pattern

__all__ = ["CONVERTED_TARGETS", "FUSED_TARGETS", "ConvertedConfig", "peft_converted_config",
           "peft_renames_adapter_keys", "peft_loaded_name"]

_PREFIX = "base_model.model."

#: conversion pattern -> {target_modules leaf: the parameter leaf PEFT targets instead} (``_MOE_TARGET_MODULE_MAPPING``)
CONVERTED_TARGETS: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
#: conversion pattern -> {fused parameter leaf: the leaves fused into it, in order} (``_MOE_FUSED_TARGETS``)
FUSED_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"gate_up_proj": ("w1", "w3")},
    "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")},
}


@dataclass(frozen=True)
class ConvertedConfig:
    """The config PEFT's MoE conversion gives, and what the conversion did.

    Attributes:
        config: the converted config (the input unchanged when nothing was converted).
        converted: the conversion applies to this model type.
        moved: ``{target_modules entry: the parameter leaf it became}``.
        partial: ``{fused parameter leaf: (the parts targeted, the parts not targeted)}`` where only some parts are
            targeted: PEFT raises ("Cannot convert PEFT target(s) ... without also targeting ...").
    """

    config: Any
    converted: bool = False
    moved: dict[str, str] = field(default_factory=dict)
    partial: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)


def peft_converted_config(config: Any, model_type: Optional[str], module_names: Iterable[str] = (),
                          linear_names: Iterable[str] = (), parameter_names: Iterable[str] = ()) -> ConvertedConfig:
    """``config`` as PEFT 0.21.2 converts it for a transformers-5 model of ``model_type`` (module docstring).

    Args:
        config: a :class:`~lorasurg.config.LoraConfig`.
        module_names, parameter_names: the model's module and parameter names (a string ``target_modules`` is
            resolved against them); ``linear_names``: its linear layers outside the output head (``"all-linear"``).
    """
    pattern = peft_conversion_pattern(model_type)
    mapping = CONVERTED_TARGETS.get(pattern or "")
    if not mapping:
        return ConvertedConfig(config)
    targets, resolved = config.target_modules, False
    if isinstance(targets, str):
        targets = _resolved_leaves(config, mapping, module_names, linear_names, parameter_names)
        if not targets:
            return ConvertedConfig(config, converted=True)
        resolved = True
    fused = FUSED_TARGETS[pattern]
    moved: dict[str, str] = {}
    parameters = set(config.target_parameters or [])
    remaining: set[str] = set()
    present: dict[str, set[str]] = {name: set() for name in fused}
    for target in sorted(targets or ()):
        old = next((o for o in mapping if target == o or target.endswith("." + o)), None)
        if old is None:
            remaining.add(target)
            continue
        moved[target] = mapping[old]
        parameters.add(mapping[old])
        if mapping[old] in fused:
            present[mapping[old]].add(old)
    rank_pattern, alpha_pattern = dict(config.rank_pattern or {}), dict(config.alpha_pattern or {})
    partial = {}
    for name, parts in fused.items():
        got = tuple(p for p in parts if p in present[name])
        if 0 < len(got) < len(parts):
            partial[name] = (got, tuple(p for p in parts if p not in got))
        elif len(got) == len(parts) > 1:
            rank_pattern[rf".*\.{re.escape(name)}"] = config.r * len(parts)
            alpha_pattern[rf".*\.{re.escape(name)}"] = config.lora_alpha * len(parts)
    if not moved and not resolved:
        return ConvertedConfig(config, converted=True)
    converted = dataclasses.replace(config, target_modules=remaining, target_parameters=sorted(parameters),
                                    rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    return ConvertedConfig(converted, True, moved, partial)


def _resolved_leaves(config: Any, mapping: Mapping[str, str], module_names: Iterable[str],
                     linear_names: Iterable[str], parameter_names: Iterable[str]) -> set[str]:
    """PEFT's ``_resolve_string_target_modules``: the leaf names a string ``target_modules`` selects."""
    target = config.target_modules
    if target.lower() == ALL_LINEAR:
        return {name.rsplit(".", 1)[-1] for name in linear_names} | set(mapping)
    regex = re.compile(target)
    parameters = list(parameter_names)
    found = {name.rsplit(".", 1)[-1] for name in [*module_names, *parameters] if regex.fullmatch(name)}
    containers: dict[str, set[str]] = {}
    for name in parameters:
        container, _, leaf = name.rpartition(".")
        containers.setdefault(leaf, set()).add(container)
    for old, new in mapping.items():
        if old not in found and any(regex.fullmatch(f"{c}.{old}") for c in containers.get(new, ())):
            found.add(old)
    return found


def peft_renames_adapter_keys(model_type: Optional[str]) -> bool:
    """Whether PEFT 0.21.2 renames an adapter's LoRA keys by the model's conversion rules when it loads it (a
    checkpoint conversion is registered for ``model_type``)."""
    if not model_type:
        return False
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4.x: no conversion
        return False
    return get_checkpoint_conversion_mapping(model_type) is not None


def peft_loaded_name(module: str, model_name: str, renames: bool) -> str:
    """The module name PEFT loads the LoRA of adapter module ``module`` under, where the model names that checkpoint
    module ``model_name``: ``module`` itself unless PEFT renames the keys (``renames``) and the rename is not one it
    undoes (``model_name`` a suffix of ``"base_model.model." + module``)."""
    if not renames or model_name == module or (_PREFIX + module).endswith(model_name):
        return module
    return model_name
