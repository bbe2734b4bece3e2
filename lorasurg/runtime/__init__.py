"""nn.Module wrappers that inject LoRA into a live model; their math calls lorasurg.engine.

Free functions over a model's modules (no object owns the model):

- :func:`inject`, :func:`load_adapter`, :func:`save_adapter`: put an adapter in (from a config or a saved
  adapter) and write one out, in PEFT's format and with PEFT's state_dict keys;
- :func:`set_adapter`, :func:`disable_adapters`, :func:`delete_adapter`: several adapters on one model;
- :func:`merge_adapter`, :func:`unmerge_adapter`, :func:`merge_and_unload`, :func:`unload`;
- :func:`trainable_parameters`: counts like PEFT's ``print_trainable_parameters``.
"""

from .adapters import (
    ParameterCount,
    delete_adapter,
    disable_adapters,
    merge_adapter,
    merge_and_unload,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge_adapter,
)
from .inject import inject
from .state import load_adapter, save_adapter

__all__ = [
    "inject",
    "load_adapter",
    "save_adapter",
    "set_adapter",
    "disable_adapters",
    "delete_adapter",
    "merge_adapter",
    "unmerge_adapter",
    "merge_and_unload",
    "unload",
    "trainable_parameters",
    "ParameterCount",
]
