"""``modules_to_save``: a fully trained copy of a module per adapter, PEFT's layout.

The wrapper keeps the frozen original as ``original_module`` and one deep copy per adapter under
``modules_to_save.<adapter>``; forward runs the active adapter's copy (the original when adapters are disabled or
the active adapter has no copy here). These copies are saved with the adapter as ``<module>.<param>``.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from torch import nn

__all__ = ["ModulesToSave"]


class ModulesToSave(nn.Module):
    """Holds ``original_module`` and a trainable copy of it per adapter (``modules_to_save.<adapter>``).

    Attributes:
        active_adapter: the adapter whose copy forward runs, or None.
        disabled: when True, forward runs ``original_module``.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disabled = False

    @property
    def adapter_names(self) -> list[str]:
        """Adapters with a copy of this module."""
        return list(self.modules_to_save.keys())

    def add_adapter(self, name: str) -> None:
        """Give adapter ``name`` its own copy of the original module (the original is frozen)."""
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s copy."""
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def current(self) -> nn.Module:
        """The module forward runs now: the active copy, else the original."""
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "original_module" not in modules or "modules_to_save" not in modules:
                raise
            copies = modules["modules_to_save"]
            active = self.__dict__.get("active_adapter")
            target = copies[active] if not self.__dict__.get("disabled") and active in copies else modules["original_module"]
            return getattr(target, name)
