"""Model-level control of injected adapters: activate, disable, delete, merge, unload, count parameters.

Free functions over the wrappers found in ``model.named_modules()`` (see :mod:`lorasurg.runtime.walk`). One
adapter is active at a time (as with PEFT's ``PeftModel.set_adapter``); only its parameters train, unless its
config says ``inference_mode``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from .walk import (
    active_adapter,
    adapter_configs,
    forget_adapters,
    lora_layers,
    replace_module,
    require_adapter,
    save_wrappers,
    set_active_name,
)

__all__ = [
    "ParameterCount",
    "trainable_parameters",
    "set_adapter",
    "disable_adapters",
    "delete_adapter",
    "merge_adapter",
    "unmerge_adapter",
    "merge_and_unload",
    "unload",
    "apply_trainability",
]


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts of a model, as PEFT's ``get_nb_trainable_parameters`` gives them.

    Attributes:
        trainable: elements of parameters with ``requires_grad``.
        total: elements of all parameters (shared parameters counted once).
    """

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        """``100 * trainable / total``."""
        return 100 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Count trainable and all parameters, like PEFT's ``get_nb_trainable_parameters``.

    ``str()`` of the result reads like PEFT's ``print_trainable_parameters``.
    """
    trainable = total = 0
    for _, param in model.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return ParameterCount(trainable, total)


def apply_trainability(model: nn.Module) -> None:
    """Set ``requires_grad`` of every adapter tensor: true for the active adapter's (unless adapters are disabled
    or its config has ``inference_mode``), false for the rest. Base parameters are left as they are.
    """
    configs = adapter_configs(model)
    active = active_adapter(model)

    def trains(name: str, disabled: bool) -> bool:
        return name == active and not disabled and not getattr(configs.get(name), "inference_mode", False)

    for _, layer in lora_layers(model):
        for container in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
            for name, module in container.items():
                module.requires_grad_(trains(name, layer.disabled))
        for container in (layer.lora_embedding_A, layer.lora_embedding_B):
            for name, param in container.items():
                param.requires_grad_(trains(name, layer.disabled))
    for _, wrapper in save_wrappers(model):
        wrapper.original_module.requires_grad_(False)
        for name, module in wrapper.modules_to_save.items():
            module.requires_grad_(trains(name, wrapper.disabled))


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the active one: forward uses it, and only its tensors train.

    Raises:
        ConfigError: the model has no adapter ``name``.
    """
    require_adapter(model, name)
    for _, layer in lora_layers(model):
        layer.active_adapters = [name] if name in layer.r else []
    for _, wrapper in save_wrappers(model):
        wrapper.active_adapter = name if name in wrapper.modules_to_save else None
    set_active_name(model, name)
    apply_trainability(model)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside, the model computes as its base (merged adapters are unmerged) and no adapter
    tensor trains; on exit the previous state comes back, merges included.
    """
    layers = [layer for _, layer in lora_layers(model)]
    wrappers = [w for _, w in save_wrappers(model)]
    merged = {id(layer): list(layer.merged_adapters) for layer in layers}
    before = [(m, m.disabled) for m in [*layers, *wrappers]]
    for layer in layers:
        layer.unmerge()
    for m, _ in before:
        m.disabled = True
    apply_trainability(model)
    try:
        yield model
    finally:
        for m, flag in before:
            m.disabled = flag
        for layer in layers:
            if merged[id(layer)]:
                layer.merge(merged[id(layer)])
        apply_trainability(model)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; wrappers left with no adapter give their layer back.

    If it was active, the first remaining adapter (by name) becomes active, as in PEFT.

    Raises:
        ConfigError: the model has no adapter ``name``.
    """
    require_adapter(model, name)
    for module_name, layer in reversed(lora_layers(model)):  # nested parameter wrappers: innermost first
        layer.delete_adapter(name)
        if not layer.r:
            layer.unmerge()
            replace_module(model, module_name, layer.base_layer)
    for module_name, wrapper in save_wrappers(model):
        wrapper.delete_adapter(name)
        if not wrapper.modules_to_save:
            replace_module(model, module_name, wrapper.original_module)
    configs = adapter_configs(model)
    del configs[name]
    if active_adapter(model) == name:
        set_active_name(model, None)
        if configs:
            set_adapter(model, sorted(configs)[0])
    if not configs:
        forget_adapters(model)


def merge_adapter(model: nn.Module) -> None:
    """Merge the active adapter into the base weights (forward then runs the base layers alone)."""
    for _, layer in lora_layers(model):
        if not layer.disabled:
            layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter into the base weights and remove every wrapper; returns ``model``.

    A modules_to_save wrapper is replaced by the active adapter's trained copy. Works for every layer type,
    including DoRA, ``lora_bias`` on a layer without a bias (the bias is created) and 1x1x1 Conv3d.
    """
    for name, layer in reversed(lora_layers(model)):  # nested parameter wrappers: innermost first
        if not layer.disabled:
            layer.merge()
        replace_module(model, name, layer.base_layer)
    for name, wrapper in save_wrappers(model):
        replace_module(model, name, wrapper.current())
    forget_adapters(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every wrapper without merging and give back the base model; returns ``model``.

    Merged adapters are unmerged first, and modules_to_save wrappers give back the original module, so the result
    is the base model as it was before injection (PEFT 0.21.2 keeps merged weights and the trained copies). A
    base weight that a PiSSA/OLoRA init replaced by its residual stays the residual.
    """
    for name, layer in reversed(lora_layers(model)):  # nested parameter wrappers: innermost first
        layer.unmerge()
        replace_module(model, name, layer.base_layer)
    for name, wrapper in save_wrappers(model):
        replace_module(model, name, wrapper.original_module)
    forget_adapters(model)
    return model
