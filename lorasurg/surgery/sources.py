"""Adapters given to a surgery function: an :class:`~lorasurg.io.adapter.Adapter` or anything ``Adapter.load`` reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from ..errors import InputError, UnsupportedError
from ..io.adapter import Adapter

__all__ = ["AdapterSource", "open_adapter", "source_name"]

AdapterSource = Union[Adapter, str, os.PathLike]


def open_adapter(source: AdapterSource, what: str = "adapter") -> tuple[Adapter, str]:
    """``(adapter, name for messages)``: loads a path or repo id strictly; checks an in-memory adapter the same way.

    Raises:
        InputError: unreadable, or tensors that contradict the config (every problem listed).
    """
    if isinstance(source, Adapter):
        found = source.problems()
        if found:
            raise InputError(f"{what} does not match its config:\n  - " + "\n  - ".join(found))
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
