"""A checkpoint's modules described through the model transformers builds from it (meta device, no memory).

The description is keyed by *checkpoint module names* (key prefixes: ``<name>.weight`` is a key), because every
command reads and writes tensors under BASE's own keys. Where the model names a module otherwise, the description
says so, so that adapters are written in the namespace PEFT loads them in (the model's):

* ``names``: checkpoint module name -> the model's module name, where they differ (Qwen2-VL's ``model.layers.0.mlp``
  is the model's ``model.language_model.layers.0.mlp``; Llava's ``language_model.model.layers.0`` is
  ``model.language_model.layers.0``);
* ``experts``: per-expert matrices of a checkpoint whose model fuses them (Qwen3-MoE's
  ``model.layers.0.mlp.experts.3.gate_proj``) are modules of their own here, ``linear`` with the checkpoint's
  ``(out, in)`` shape and no bias, each with its :class:`~lorasurg.io.keymap.ExpertSlot` in the fused parameter.
  Their name is the checkpoint's in every namespace: it is how adapters name them (see
  :mod:`lorasurg.consumers.experts`), and the model has no module by that name;
* ``parameters``: the model's 3-D expert parameters (:class:`ExpertParameter`), LoRA targets through PEFT's
  ``target_parameters``, whether the checkpoint stores them fused (gpt-oss) or per expert (the slots);
* ``model_modules``: every module name of the model, containers included, in the model's namespace, plus the
  per-expert names: what a ``target_modules`` entry can select;
* ``unplaced``: checkpoint keys the conversion rules give no place (:mod:`lorasurg.io.keymap`), with the reason.

Checkpoint names of modules that hold no tensor of their own (containers, activations) follow from the tensors
below them: module ``M`` is checkpoint module ``C`` when a tensor ``M.rest`` is stored as ``C.rest``. A module
with nothing stored below it keeps the model's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

from torch import nn

from ..modules import ModuleInfo, describe_model, output_layer_names
from .keymap import ExpertSlot, KeyMap, build_keymap

__all__ = ["ExpertParameter", "ModelLayout", "model_layout", "checkpoint_namer"]


@dataclass(frozen=True)
class ExpertParameter:
    """A 3-D expert parameter of the model, the target of a ``target_parameters`` LoRA.

    PEFT's rule for the layout (``ParamWrapper``): a parameter ``(E, d1, d2)`` is ``(experts, in, out)`` when its
    module says ``is_transposed`` (gpt-oss), else ``(experts, out, in)`` (Qwen3-MoE, Mixtral).

    Attributes:
        name: the parameter's model name (``model.layers.0.mlp.experts.gate_up_proj``).
        module: the model name of the module holding it (``model.layers.0.mlp.experts``).
        shape: its shape ``(E, d1, d2)``.
        transposed: stored ``(experts, in, out)``.
        position: its index among the module's own parameters (PEFT nests one wrapper per targeted parameter in
            this order: the first is innermost).
        stored: the checkpoint key holding it whole, or None when the checkpoint holds it per expert.
        type_name: the class name of the module holding it.
    """

    name: str
    module: str
    shape: tuple[int, int, int]
    transposed: bool
    position: int
    stored: Optional[str]
    type_name: str

    @property
    def experts(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1] if self.transposed else self.shape[2]

    @property
    def out_features(self) -> int:
        return self.shape[2] if self.transposed else self.shape[1]


@dataclass(frozen=True)
class ModelLayout:
    """What :func:`model_layout` finds: the fields :class:`~lorasurg.io.architecture.ModelDescription` carries."""

    modules: dict[str, ModuleInfo]
    output_layers: set[str]
    tied: dict[str, str]
    names: dict[str, str]
    experts: dict[str, ExpertSlot]
    parameters: dict[str, ExpertParameter]
    model_modules: tuple[str, ...]
    unplaced: dict[str, str]
    to_checkpoint: Callable[[str], Optional[str]]
    input_embedding: Optional[str]


def model_layout(model: nn.Module, shapes: Mapping[str, Sequence[int]], task_type: Optional[str]) -> ModelLayout:
    """Describe the checkpoint ``{key: shape}`` through ``model`` (see the module docstring)."""
    keymap = build_keymap(model, shapes)
    to_checkpoint = checkpoint_namer(model, keymap)
    infos = describe_model(model)
    modules: dict[str, ModuleInfo] = {}
    names: dict[str, str] = {}
    for name, info in infos.items():
        key = to_checkpoint(name)
        if key is None:
            continue
        stored = shapes.get(f"{key}.weight")
        modules[key] = dataclasses.replace(info, weight_shape=tuple(stored)) if stored is not None else info
        if key != name:
            names[key] = name
    experts: dict[str, ExpertSlot] = {}
    for key, slot in keymap.slots.items():
        module = key[: -len(".weight")] if key.endswith(".weight") else key
        owner = slot.parameter.rpartition(".")[0]
        modules[module] = ModuleInfo(f"{infos[owner].type_name} expert" if owner in infos else "expert", "linear",
                                     False, tuple(shapes[key]), False)
        experts[module] = slot
    outputs = {key for key in (to_checkpoint(n) for n in output_layer_names(model, task_type)) if key is not None}
    tied = _tied(model, shapes, to_checkpoint)
    parameters = _expert_parameters(model, keymap)
    model_modules = tuple(name for name in infos) + tuple(experts)
    return ModelLayout(modules, outputs, tied, names, experts, parameters, model_modules, dict(keymap.unplaced),
                       to_checkpoint, _input_embedding(model, to_checkpoint))


def _input_embedding(model: nn.Module, to_checkpoint: Callable[[str], Optional[str]]) -> Optional[str]:
    """The checkpoint name of the model's token embedding (``get_input_embeddings()``), or None."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    if embedding is None:
        return None
    name = next((n for n, m in model.named_modules() if m is embedding), None)
    return to_checkpoint(name) if name else None


def checkpoint_namer(model: nn.Module, keymap: KeyMap) -> Callable[[str], Optional[str]]:
    """A function from a model name (module, parameter or buffer) to its checkpoint name.

    Tensors: the key map's inverse. Modules: ``M`` is ``C`` when a tensor ``M.rest`` is stored as ``C.rest``
    (the root module ``""`` is None: it has no name). A name with nothing stored below it is returned unchanged.
    """
    stored = keymap.checkpoint_keys()
    modules: dict[str, str] = {}
    for model_name, key in stored.items():
        parts = model_name.split(".")
        for cut in range(1, len(parts)):
            module, rest = ".".join(parts[:cut]), ".".join(parts[cut:])
            if module in modules:
                continue
            if key.endswith("." + rest):
                modules[module] = key[: -len(rest) - 1]

    def to_checkpoint(name: str) -> Optional[str]:
        if not name:
            return None
        return stored.get(name) or modules.get(name) or name

    return to_checkpoint


def _tied(model: nn.Module, shapes: Mapping[str, Sequence[int]],
          to_checkpoint: Callable[[str], Optional[str]]) -> dict[str, str]:
    """``{alias key: canonical key}`` for parameters that are one tensor in the model, in checkpoint names; the
    canonical key is one the checkpoint holds where possible (the first in checkpoint order)."""
    order = {key: i for i, key in enumerate(shapes)}
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = to_checkpoint(name)
        if key is not None:
            groups.setdefault(id(param), []).append(key)
    tied: dict[str, str] = {}
    for keys in groups.values():
        if len(keys) > 1:
            canonical = min(keys, key=lambda k: order.get(k, len(order)))
            tied.update({k: canonical for k in keys if k != canonical})
    return tied


def _expert_parameters(model: nn.Module, keymap: KeyMap) -> dict[str, ExpertParameter]:
    """The model's 3-D parameters of modules that LoRA cannot target as layers (fused experts)."""
    stored = keymap.checkpoint_keys()
    found: dict[str, ExpertParameter] = {}
    for module_name, module in model.named_modules():
        if not module_name or isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        for position, (leaf, param) in enumerate(module.named_parameters(recurse=False)):
            if param.dim() != 3:
                continue
            name = f"{module_name}.{leaf}"
            if name not in stored and name not in keymap.fused:
                continue
            found[name] = ExpertParameter(name, module_name, tuple(int(d) for d in param.shape),
                                          bool(getattr(module, "is_transposed", False)), position, stored.get(name),
                                          type(module).__name__)
    return found
