"""Where each tensor of an adapter goes in BASE: PEFT's names (the model's namespace) placed among BASE's checkpoint
keys through the key map (:class:`~lorasurg.io.architecture.ModelDescription`).

An adapter's module path is, in this order:

* a ``target_parameters`` wrapper (PEFT's ``ParamWrapper``): one of the paths :func:`~lorasurg.io.adapter.wrapper_paths`
  gives the parameters the config's ``target_parameters`` select among the model's
  (:func:`~lorasurg.targeting.select_parameters`). On a 3-D expert parameter (:class:`ExpertTarget`) its
  ``lora_A (r E, in)`` and ``lora_B (out, r E)`` hold one LoRA per expert
  (:func:`~lorasurg.engine.experts.split_experts`); on a 2-D weight (``model.layers.0.mlp.gate_proj.weight``, a
  router's weight) it is a linear LoRA on that weight. PEFT looks a wrapper's rank and alpha up by the parameter's
  name (``current_key`` in ``BaseTuner._inject_parameters``), so :attr:`ModuleTarget.rank_key` is that name;
* a module of the model by the model's name (Qwen2-VL's ``model.language_model.layers.0.mlp.up_proj``, stored as
  ``model.layers.0.mlp.up_proj``), per-expert modules by the checkpoint's names
  (``model.layers.0.mlp.experts.3.gate_proj``: PEFT's per-expert layout, which it converts when it loads);
* a module by the checkpoint's name where the model names it otherwise, for the types whose LoRA keys PEFT renames as
  transformers renames the checkpoint's (:func:`~lorasurg.consumers.experts.peft_renames_adapter_keys`: Llava's
  ``language_model.``, Mixtral's ``block_sparse_moe``): it is then the model's module of that name. Elsewhere
  (Qwen2-VL) PEFT does not load such a name, so neither does fuse: it is refused, with the model's name.

A LoRA on a module that has no LoRA layer kind but a 2-D weight (a router: PEFT converts a ``gate`` target of a
per-expert adapter to ``gate.weight``) is a linear LoRA on that weight (:attr:`ModuleTarget.linear`).

Saved tensors (``modules_to_save`` copies; PEFT never renames them) are named by the model: each goes to the checkpoint
key that holds it; a fused expert parameter the checkpoint stores per expert goes to each expert's keys as slices
(:class:`~lorasurg.io.keymap.ExpertSlot`: ``key = parameter[e, rows]``).

Nothing is skipped: every path and tensor without a place is collected with why, for the caller to refuse.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Mapping, Optional

from torch import Tensor

from ...consumers.experts import peft_renames_adapter_keys
from ...io.adapter import Adapter, wrapper_paths
from ...io.architecture import ModelDescription
from ...io.keymap import ExpertSlot
from ...io.model_layout import ExpertParameter
from ...targeting import select_parameters

__all__ = ["ModuleTarget", "ExpertTarget", "Placement", "place_adapter"]


@dataclass(frozen=True)
class ModuleTarget:
    """Adapter module ``path`` is a LoRA on checkpoint module ``module`` (its weight ``<module>.weight``).

    Attributes:
        rank_key: the name PEFT looks its rank and alpha up by: the path, or the wrapped parameter's name.
        linear: the module has no LoRA layer kind, but a 2-D weight the LoRA is linear on (a router).
    """

    path: str
    module: str
    rank_key: str
    linear: bool = False


@dataclass(frozen=True)
class ExpertTarget:
    """Adapter module ``path`` is PEFT's ``target_parameters`` LoRA on the 3-D expert ``parameter``.

    Attributes:
        slots: ``(checkpoint module, slot)`` of each per-expert key holding the parameter, by expert then part; empty
            when BASE stores the parameter whole (``parameter.stored``, gpt-oss).
    """

    path: str
    parameter: ExpertParameter
    slots: tuple[tuple[str, ExpertSlot], ...] = ()


@dataclass
class Placement:
    """What :func:`place_adapter` finds.

    Attributes:
        modules: LoRA paths on one checkpoint module each.
        experts: LoRA paths on 3-D expert parameters.
        saved: ``{checkpoint key: (adapter key, tensor)}`` for the adapter's saved tensors (slices for per-expert keys).
        renamed: paths under checkpoint names that PEFT renames to the model's, as ``"path -> model name"``.
        unplaced_modules / unplaced_tensors: ``"name (why)"`` for every LoRA path / saved tensor without a place.
    """

    modules: list[ModuleTarget] = field(default_factory=list)
    experts: list[ExpertTarget] = field(default_factory=list)
    saved: dict[str, tuple[str, Tensor]] = field(default_factory=dict)
    renamed: list[str] = field(default_factory=list)
    unplaced_modules: list[str] = field(default_factory=list)
    unplaced_tensors: list[str] = field(default_factory=list)


def place_adapter(description: ModelDescription, adapter: Adapter, stored: Mapping[str, object],
                  model_type: Optional[str]) -> Placement:
    """Place every LoRA module and saved tensor of ``adapter`` in BASE (see the module docstring).

    Args:
        description: BASE's description.
        stored: BASE's tensor names (and the tied aliases it does not store): ``name in stored``.
        model_type: BASE's ``model_type`` (whether PEFT renames checkpoint-named keys).
    """
    placement = Placement()
    wrappers = _wrappers(description, adapter, stored)
    renames = peft_renames_adapter_keys(model_type)
    slots = _slots_by_parameter(description)
    for path in adapter.modules:
        name, problem = _model_name(description, path, renames, model_type)
        if problem is not None:
            placement.unplaced_modules.append(f"{path} ({problem})")
            continue
        if name != path:
            placement.renamed.append(f"{path} -> {name}")
        wrapped = wrappers.get(name)
        if isinstance(wrapped, ExpertParameter):
            placement.experts.append(ExpertTarget(path, wrapped, tuple(slots.get(wrapped.name, ()))))
            continue
        module = wrapped[0] if wrapped is not None else description.checkpoint_module(name)
        info = description.modules.get(module) if module is not None else None
        shape = tuple(info.weight_shape or ()) if info is not None else ()
        if info is None or f"{module}.weight" not in stored or (info.kind is None and len(shape) != 2):
            placement.unplaced_modules.append(f"{path} ({_why_not(description, name, wrappers)})")
            continue
        rank_key = wrapped[1] if wrapped is not None else name
        placement.modules.append(ModuleTarget(path, module, rank_key, linear=info.kind is None))
    _place_saved(description, adapter, stored, slots, placement)
    return placement


def _model_name(description: ModelDescription, path: str, renames: bool,
                model_type: Optional[str]) -> tuple[str, Optional[str]]:
    """The model's name for ``path`` (itself, or the model's name of a checkpoint name PEFT renames), or why not."""
    if description.checkpoint_module(path) is not None or path not in description.names:
        return path, None
    model = description.model_name(path)
    if renames:
        return model, None
    return path, (f"BASE's checkpoint name of the model's {model}: PEFT on transformers 5 does not rename adapter "
                  f"keys for {model_type or 'this model type'} and would not load it; rename the adapter's keys to "
                  "the model's names")


def _why_not(description: ModelDescription, name: str, wrappers: Mapping[str, object]) -> str:
    if ".base_layer" in name:
        return "a target_parameters path, but the config's target_parameters select no parameter wrapped there"
    module = description.checkpoint_module(name)
    if module is not None and module in description.modules:
        return f"{description.modules[module].type_name} in BASE, no layer LoRA can be merged into"
    near = difflib.get_close_matches(name, description.all_module_names() + list(wrappers), n=2, cutoff=0.6)
    return "not a module of BASE" + (f"; nearest: {', '.join(near)}" if near else "")


def _wrappers(description: ModelDescription, adapter: Adapter,
              stored: Mapping[str, object]) -> dict[str, object]:
    """``{path: ExpertParameter}`` for wrappers on 3-D expert parameters and ``{path: (checkpoint module, parameter
    name)}`` for wrappers on 2-D weights, for the parameters ``target_parameters`` selects."""
    if not adapter.config.target_parameters:
        return {}
    weights: dict[str, str] = {}  # model parameter name -> checkpoint module
    for module, info in description.modules.items():
        shape = info.weight_shape
        if module not in description.experts and shape is not None and len(shape) == 2 and f"{module}.weight" in stored:
            weights[f"{description.model_name(module)}.weight"] = module
    candidates = list(weights) + list(description.parameters)
    owners: dict[str, list[tuple[int, str]]] = {}
    for name in select_parameters(adapter.config, candidates):
        owner, _, leaf = name.rpartition(".")
        position = description.parameters[name].position if name in description.parameters else 0
        owners.setdefault(owner, []).append((position, leaf))
    found: dict[str, object] = {}
    for owner, leaves in owners.items():
        paths = wrapper_paths(owner, [leaf for _, leaf in sorted(leaves)])
        for leaf, path in paths.items():
            name = f"{owner}.{leaf}"
            found[path] = description.parameters[name] if name in description.parameters else (weights[name], name)
    return found


def _slots_by_parameter(description: ModelDescription) -> dict[str, list[tuple[str, ExpertSlot]]]:
    by: dict[str, list[tuple[str, ExpertSlot]]] = {}
    for module, slot in description.experts.items():
        by.setdefault(slot.parameter, []).append((module, slot))
    return {p: sorted(items, key=lambda item: (item[1].expert, item[1].part)) for p, items in by.items()}


def _place_saved(description: ModelDescription, adapter: Adapter, stored: Mapping[str, object],
                 slots: Mapping[str, list[tuple[str, ExpertSlot]]], placement: Placement) -> None:
    """Each saved tensor (``.base_layer`` removed from its name) to the checkpoint key(s) holding it."""
    for key, tensor in adapter.extra.items():
        name = key.replace(".base_layer.", ".")
        module, _, leaf = name.rpartition(".")
        if module in description.names and description.checkpoint_module(module) is None:
            placement.unplaced_tensors.append(
                f"{key} (BASE's checkpoint name; PEFT loads saved copies under the model's names only: "
                f"{description.model_name(module)}.{leaf})")
            continue
        ckpt = description.checkpoint_module(module) if module else None
        target = f"{ckpt}.{leaf}" if ckpt is not None else name
        parameter = description.parameters.get(name)
        if target in stored:
            placement.saved[target] = (key, tensor)
        elif parameter is not None and parameter.stored is None and name in slots:
            if tuple(tensor.shape) != parameter.shape:
                placement.unplaced_tensors.append(f"{key} (shape {tuple(tensor.shape)}, the model's {name} is "
                                                  f"{parameter.shape})")
                continue
            for expert_module, slot in slots[name]:
                placement.saved[f"{expert_module}.weight"] = (key, tensor[slot.expert, slot.rows[0]:slot.rows[1]])
        else:
            placement.unplaced_tensors.append(f"{key} (BASE has no tensor {target})")
