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

from .replication import forget_replication, undo_replication, unshare_for_merge
from .tokens import token_wrappers, unshare_conflicting
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
    for _, tokens in token_wrappers(model):
        for name, param in tokens.token_adapter.trainable_tokens_delta.items():
            param.requires_grad_(trains(name, tokens.disabled))


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
    for _, tokens in token_wrappers(model):
        tokens.active_adapter = name if name in tokens.adapter_names else None
    set_active_name(model, name)
    apply_trainability(model)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside, the model computes as its base (merged adapters are unmerged) and no adapter
    tensor trains; on exit the previous state comes back, merges included.
    """
    layers = [layer for _, layer in lora_layers(model)]
    wrappers = [w for _, w in save_wrappers(model)]
    tokens = [w for _, w in token_wrappers(model)]
    merged = {id(layer): list(layer.merged_adapters) for layer in layers}
    merged_tokens = [w for w in tokens if w.token_adapter.merged_adapters]
    before = [(m, m.disabled) for m in [*layers, *wrappers, *tokens]]
    for layer in [*layers, *tokens]:
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
        for wrapper in merged_tokens:
            wrapper.merge()
        apply_trainability(model)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; wrappers left with no adapter give their layer back.

    If it was active, the first remaining adapter (by name) becomes active, as in PEFT.

    Raises:
        ConfigError: the model has no adapter ``name``.
    """
    require_adapter(model, name)
    for module_name, layer in reversed(lora_layers(model)):  # nested wrappers innermost first
        layer.delete_adapter(name)
        if not layer.r:
            layer.unmerge()
            replace_module(model, module_name, layer.base_layer)
    for module_name, wrapper in save_wrappers(model):
        wrapper.delete_adapter(name)
        if not wrapper.modules_to_save:
            replace_module(model, module_name, wrapper.original_module)
    for module_name, tokens in token_wrappers(model):
        if name in tokens.token_adapter.merged_adapters:
            tokens.unmerge()
        tokens.token_adapter.delete_adapter(name)
        if tokens.active_adapter == name:
            tokens.active_adapter = None
    for module_name, tokens in token_wrappers(model):
        if not tokens.adapter_names:
            replace_module(model, module_name, tokens.base_layer)
    configs = adapter_configs(model)
    del configs[name]
    if active_adapter(model) == name:
        set_active_name(model, None)
        if configs:
            set_adapter(model, sorted(configs)[0])
    if not configs:
        forget_adapters(model)


def merge_adapter(model: nn.Module) -> None:
    """Merge the active adapter into the base weights (forward then runs the base layers alone).

    Trainable tokens are written into their rows. Layers of a replicated stack whose base weights copies share
    first get weights of their own (PEFT merges every copy into the shared weight).
    """
    _prepare_merge(model)
    for _, layer in lora_layers(model):
        if not layer.disabled:
            layer.merge()
    for _, tokens in token_wrappers(model):
        tokens.merge()


def _prepare_merge(model: nn.Module) -> None:
    """Unshare what copies of replicated layers, and heads tied to embeddings with other rows, share."""
    unshare_for_merge(model)
    unshare_conflicting(model)


def unmerge_adapter(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    for _, tokens in token_wrappers(model):
        tokens.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter into the base weights and remove every wrapper; returns ``model``.

    A modules_to_save wrapper is replaced by the active adapter's trained copy, a trainable-tokens wrapper by its
    layer with the rows written in. Works for every layer type, including DoRA, ``lora_bias`` on a layer without a
    bias (the bias is created), 1x1x1 Conv3d and replicated layers (each copy keeps its own merged weights; the model
    keeps the replicated stack). A LoRA on a grouped convolution cannot be merged (UnsupportedError, before any
    change).
    """
    _refuse_unmergeable(model)
    _prepare_merge(model)
    for name, layer in reversed(lora_layers(model)):  # nested wrappers innermost first
        if not layer.disabled:
            layer.merge()
        replace_module(model, name, layer.base_layer)
    for name, wrapper in save_wrappers(model):
        replace_module(model, name, wrapper.current())
    for name, tokens in token_wrappers(model):
        tokens.merge()
    for name, tokens in token_wrappers(model):
        replace_module(model, name, tokens.base_layer)
    forget_adapters(model)
    forget_replication(model)
    return model


def _refuse_unmergeable(model: nn.Module) -> None:
    """Raise the merge error of the first layer that cannot merge an active adapter, before anything changes."""
    from .grouped_conv import GroupedLoraConv

    for _, layer in lora_layers(model):
        if isinstance(layer, GroupedLoraConv) and layer.active_adapters and not layer.disabled:
            layer.merge()


def unload(model: nn.Module) -> nn.Module:
    """Remove every wrapper without merging and give back the base model; returns ``model``.

    Merged adapters are unmerged first, modules_to_save wrappers give back the original module, trainable tokens
    their original rows, and a replicated stack of layers the original one, so the result is the base model as it was
    before injection (PEFT 0.21.2 keeps merged weights, the trained copies and the replicated layers). A base weight
    that a PiSSA/OLoRA init replaced by its residual stays the residual.
    """
    for name, layer in reversed(lora_layers(model)):  # nested wrappers innermost first
        layer.unmerge()
        replace_module(model, name, layer.base_layer)
    for name, wrapper in save_wrappers(model):
        replace_module(model, name, wrapper.original_module)
    for name, tokens in token_wrappers(model):
        tokens.unmerge()
    for name, tokens in token_wrappers(model):
        replace_module(model, name, tokens.base_layer)
    undo_replication(model)
    forget_adapters(model)
    return model
