"""Finding and replacing the runtime's wrappers in a model, and the per-model record of adapter configs.

The runtime owns no model object: everything is a free function over ``model.named_modules()``. The one piece of
state kept on the model is ``model._lorasurg_adapters``, an ordered ``{adapter name: LoraConfig}`` (a plain
attribute: not a parameter, not in the state_dict), plus ``model._lorasurg_active``, the active adapter's name.
"""

from __future__ import annotations

import difflib
from typing import Any, Optional

from torch import nn

from ..errors import ConfigError
from ..modules import ModuleInfo, describe_module
from .base import LoraLayer
from .modules_to_save import ModulesToSave
from .tokens import TrainableTokens

__all__ = [
    "lora_layers",
    "save_wrappers",
    "describe_unwrapped",
    "unwrapped",
    "replace_module",
    "adapter_configs",
    "active_adapter",
    "set_active_name",
    "forget_adapters",
    "require_adapter",
]

_CONFIGS_ATTR = "_lorasurg_adapters"
_ACTIVE_ATTR = "_lorasurg_active"


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """Every LoRA wrapper in ``model`` with its module name, in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def save_wrappers(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    """Every modules_to_save wrapper in ``model`` with its module name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ModulesToSave)]


def describe_unwrapped(model: nn.Module) -> dict[str, ModuleInfo]:
    """``{name: ModuleInfo}`` as if no wrapper were there: a wrapper is described by the layer it wraps, under
    the wrapper's name, and the wrapper's insides are left out. Names are those of the unwrapped model.
    """
    infos: dict[str, ModuleInfo] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if isinstance(child, LoraLayer):
                infos[name] = describe_module(unwrapped(child))
            elif isinstance(child, ModulesToSave):
                infos[name] = describe_module(child.original_module)
            elif isinstance(child, TrainableTokens):
                infos[name] = describe_module(child.base_layer)
            else:
                infos[name] = describe_module(child)
                visit(child, f"{name}.")

    visit(model, "")
    return infos


def unwrapped(module: nn.Module) -> nn.Module:
    """The layer a wrapper wraps (the module itself when it is no wrapper; through nested parameter wrappers)."""
    if isinstance(module, ModulesToSave):
        return module.original_module
    while isinstance(module, LoraLayer):
        module = module.base_layer
    if isinstance(module, TrainableTokens):
        return module.base_layer
    return module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name`` (dotted path)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def adapter_configs(model: nn.Module) -> dict[str, Any]:
    """The model's ``{adapter name: config}`` (empty when nothing was injected); the dict itself, not a copy."""
    configs = model.__dict__.get(_CONFIGS_ATTR)
    if configs is None:
        configs = {}
        model.__dict__[_CONFIGS_ATTR] = configs
    return configs


def active_adapter(model: nn.Module) -> Optional[str]:
    """The active adapter's name, or None."""
    return model.__dict__.get(_ACTIVE_ATTR)


def set_active_name(model: nn.Module, name: Optional[str]) -> None:
    """Record ``name`` as the active adapter (no layer is touched)."""
    model.__dict__[_ACTIVE_ATTR] = name


def forget_adapters(model: nn.Module) -> None:
    """Drop the runtime's record of adapters from ``model`` (after unload)."""
    model.__dict__.pop(_CONFIGS_ATTR, None)
    model.__dict__.pop(_ACTIVE_ATTR, None)


def require_adapter(model: nn.Module, name: str) -> Any:
    """The config of adapter ``name``.

    Raises:
        ConfigError: the model has no adapter of that name (the message lists the ones it has).
    """
    configs = adapter_configs(model)
    if name not in configs:
        near = difflib.get_close_matches(name, list(configs), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(
            f"unknown adapter {name!r}: the model has adapters {sorted(configs) or 'none'}{hint}"
        )
    return configs[name]
