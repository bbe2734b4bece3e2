"""Sizes written as text, one grammar for every option that takes one (``max_shard_size``, ``--max-memory``).

A size is a number (``123456``, ``1.5``, ``.5``) and an optional unit, case-insensitive, a space allowed between:
``B``; ``K``/``KB``, ``M``/``MB``, ``G``/``GB``, ``T``/``TB`` (powers of 1000); ``KiB``, ``MiB``, ``GiB``, ``TiB``
(powers of 1024); ``%`` where the caller gives it a meaning (:func:`split_size` returns it as the unit). What a
unit multiplies by is :data:`UNITS`; the callers add their own rules (transformers' bits for ``"5Gb"``, percentages
of the available memory).
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = ["UNITS", "split_size", "format_size"]

#: Bytes per unit, by the unit's lower-case spelling.
UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*|%)\s*")


def split_size(text: str) -> Optional[tuple[float, str]]:
    """``(number, unit as written)`` for text in the grammar above (a unit of :data:`UNITS` or ``%``), else None.

    ``split_size("1.5 GiB") == (1.5, "GiB")``; ``split_size("50%") == (50.0, "%")``; ``split_size("5 parsecs")`` is
    None.
    """
    found = _SIZE.fullmatch(text)
    if found is None or (found.group(2) != "%" and found.group(2).lower() not in UNITS):
        return None
    return float(found.group(1)), found.group(2)


def format_size(n: float) -> str:
    """Bytes in the units the grammar above reads back, powers of 1000: ``'412 MB'``, ``'1.5 GB'``."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
