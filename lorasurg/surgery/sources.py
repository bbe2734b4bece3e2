"""Adapters given to a surgery function: an :class:`~lorasurg.io.adapter.Adapter` or anything ``Adapter.load`` reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from ..engine.factors import lora_scale
from ..errors import InputError, UnsupportedError
from ..io.adapter import Adapter

__all__ = ["AdapterSource", "open_adapter", "source_name", "refuse_grouped", "refuse_zero_scales"]

AdapterSource = Union[Adapter, str, os.PathLike]


def open_adapter(source: AdapterSource, what: str = "adapter") -> tuple[Adapter, str]:
    """``(adapter, name for messages)``: loads a path or repo id strictly; checks an in-memory adapter the same way.

    Raises:
        InputError: unreadable, or tensors that contradict the config or hold NaN/inf (every problem listed).
    """
    if isinstance(source, Adapter):
        found = source.problems()
        if found:
            raise InputError(f"{what} cannot be used as it is (its tensors contradict its config or hold "
                             "NaN/inf):\n  - " + "\n  - ".join(found))
        return source, what
    return Adapter.load(source), os.fspath(source)


def source_name(source: AdapterSource, default: str = "adapter") -> str:
    """The last path component of a path source (for default output names), else ``default``."""
    if isinstance(source, Adapter):
        return default
    return Path(os.fspath(source).rstrip("/")).name or default


def refuse_grouped(adapter: Adapter, name: str, what: str) -> None:
    """Refuse an adapter with LoRA on grouped convolutions, which ``what`` (re-ranked, merged) cannot be.

    Raises:
        UnsupportedError: naming the modules.
    """
    grouped = [m for m, mod in adapter.modules.items() if mod.groups > 1]
    if grouped:
        raise UnsupportedError(
            f"{name} has LoRA on grouped convolutions ({', '.join(grouped[:5])}): its lora_B is grouped (r/groups "
            f"columns per group), so its delta is not a product of two matrices and cannot be {what} here. Leave "
            "those modules out (train without them), or keep the adapter as it is"
        )


def refuse_zero_scales(adapter: Adapter, name: str, operation: str) -> None:
    """Refuse an adapter with modules whose scale is 0 (``lora_alpha`` 0, globally or in ``alpha_pattern``) for an
    operation that keeps each module's scale while it refactors the delta: with scale 0, PEFT applies nothing of the
    module and no factors can carry its product. A negative scale is fine (PEFT subtracts the delta).

    Raises:
        InputError: naming the modules.
    """
    zero = [m for m in adapter.modules if lora_scale(*adapter.rank_alpha(m), adapter.config.use_rslora) == 0]
    if zero:
        shown = ", ".join(zero[:5]) + (f" and {len(zero) - 5} more" if len(zero) > 5 else "")
        raise InputError(
            f"{name}: {len(zero)} module(s) have scale 0 (lora_alpha 0), so PEFT applies nothing of them and "
            f"{operation} (which keeps each module's scale) has no factors to write: {shown}. Set lora_alpha "
            "(or their alpha_pattern entries) to the value the adapter was trained with"
        )
