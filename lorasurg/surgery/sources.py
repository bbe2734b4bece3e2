"""Adapters given to a surgery function: an :class:`~lorasurg.io.adapter.Adapter` or anything ``Adapter.load`` reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from ..errors import InputError
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
