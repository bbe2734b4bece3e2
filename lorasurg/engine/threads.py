"""How many threads small factorizations run on.

The exact low-rank SVD (:mod:`lorasurg.engine.lowrank`) works on ``(out, R)`` and ``(in, R)`` factors and an
``R x R`` core with R a few dozen: too little work per call for threads to help, while OpenMP's barriers make
such calls 10-100x slower when the cores are busy with other processes (measured on a shared 2-core machine: a QR
of a 5632 x 32 matrix took 6 ms on one thread and 167 ms on two). So work below :data:`SMALL_WORK` multiply-adds
runs on one thread; larger work keeps torch's setting.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["SMALL_WORK", "threads_for", "one_thread"]

#: Multiply-adds below which a computation runs on one thread (a QR of 32000 x 90 is about this size).
SMALL_WORK = 2**28


@contextlib.contextmanager
def threads_for(work: float) -> Iterator[None]:
    """Run the block on one thread when ``work`` (multiply-adds) is below :data:`SMALL_WORK`; restores the setting.

    torch's thread count is process-wide: do not enter this from several Python threads at once.
    """
    threads = torch.get_num_threads()
    if work >= SMALL_WORK or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_thread() -> "contextlib.AbstractContextManager[None]":
    """Run the block on one thread whatever its size: for many small operations in a row (the QR of a tall
    ``(p, l)`` panel, row-block conversions), where each would stay below :data:`SMALL_WORK` anyway."""
    return threads_for(0)
