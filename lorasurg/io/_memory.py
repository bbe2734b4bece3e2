"""Giving freed heap memory back to the operating system (glibc), for code that allocates and frees large blocks."""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["return_freed_memory"]


def return_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Blocks of a few MB to a few tens of MB are allocated and freed once per module or row block; glibc keeps such
    freed chunks in the heap (its mmap threshold rises with the first one freed), so without this the resident size
    creeps up to several times what is alive at once.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()
