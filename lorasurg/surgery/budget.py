"""A memory budget for operations that read checkpoints: hold a tensor's work in memory, or stream it in row blocks.

An operation that processes one checkpoint tensor at a time (``extract``, ``residualize``, ``fuse``) has two ways
to do it:

* **hold**: read the tensor once and keep its working set in memory (e.g. ``extract``: the float32 delta of a
  ``(out, in)`` weight, ``4 * out * in`` bytes, plus the SVD's work arrays);
* **stream**: read it in row blocks, as many passes as the algorithm needs, holding one block and a fixed
  working set (sketches, factors) at a time.

Holding is faster (one read); streaming bounds memory whatever the tensor's size. :class:`MemoryBudget` makes the
choice per tensor from byte counts the operation supplies (:meth:`MemoryBudget.place`), and checks before any
work that the budget is workable at all (:meth:`MemoryBudget.require`). The budget counts the tensors an operation
allocates, not the Python interpreter and torch themselves (about 0.25 GB resident on CPU).

Sizes (:func:`parse_size`): a number of bytes (``123456``), a number with a unit (``500MB``, ``2GB``, ``1.5GiB``,
``512MiB``, ``2G``; ``KB``/``MB``/``GB``/``TB`` and ``K``/``M``/``G``/``T`` are powers of 1000, ``KiB``/``MiB``/
``GiB``/``TiB`` powers of 1024; case and a space before the unit do not matter), or a percentage of the memory
available when the operation starts (``50%``). The default is :data:`DEFAULT_MAX_MEMORY` (``50%``).

Usage (what a command does)::

    budget = MemoryBudget.resolve(max_memory, device)        # None -> the default; raises ConfigError
    budget.require([(name, smallest_bytes, why), ...])       # before any work; ConfigError names the minimum
    placement = budget.place(name, hold_bytes=..., row_bytes=..., fixed_bytes=..., rows=..., reserved=...)
    if placement.hold: ...  else: ... read placement.block_rows rows at a time
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

from ..errors import ConfigError
from ..io.sizes import UNITS, format_size, split_size

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MAX_MEMORY", "SIZE_FORMS", "parse_size", "format_size", "available_memory", "resident_memory",
    "Placement", "WholeProcess", "MemoryBudget",
]

#: The default budget: this share of the memory available when the operation starts.
DEFAULT_MAX_MEMORY = "50%"
#: The accepted forms of a size, for messages and ``--help``.
SIZE_FORMS = (
    "a number of bytes (123456), a number with a unit (500MB, 2GB, 1.5GiB, 512MiB, 2G; KB/MB/GB/TB and K/M/G/T "
    "are powers of 1000, KiB/MiB/GiB/TiB powers of 1024), or a percentage of the available memory (50%)"
)
#: Assumed available memory when the system does not say (no /proc/meminfo, no sysconf).
_FALLBACK_AVAILABLE = 4 * 10**9

Size = Union[int, float, str]


def parse_size(value: Size, *, available: Optional[int] = None, what: str = "--max-memory") -> int:
    """Bytes from a size given as an int (bytes) or text in one of :data:`SIZE_FORMS`.

    Args:
        value: ``123456``, ``"500MB"``, ``"1.5GiB"``, ``"50%"``, ...
        available: the bytes a percentage is a share of (default :func:`available_memory`).
        what: the option's name, for messages.

    Raises:
        ConfigError: text that is not a size (the message lists the accepted forms), or a size that is not
            positive, or a percentage above 100.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a size, got {value!r}; accepted forms: {SIZE_FORMS}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        found = split_size(str(value))
        if found is None:
            raise ConfigError(f"{what} {value!r} is not a size; accepted forms: {SIZE_FORMS}")
        number, unit = found[0], found[1].lower()
    if unit == "%":
        if not 0 < number <= 100:
            raise ConfigError(f"{what} {value!r}: a percentage must be above 0 and at most 100")
        size = int(number / 100 * (available_memory() if available is None else available))
    else:
        size = int(number * UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{what} {value!r} must be a positive size; accepted forms: {SIZE_FORMS}")
    return size


def _round_up_size(n: int) -> str:
    """A size of at least ``n`` bytes, rounded up to two significant digits, the way a user would type it."""
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= factor:
            value = n / factor
            step = 10 ** (math.floor(math.log10(value)) - 1) if value >= 10 else 0.1
            return f"{math.ceil(value / step - 1e-9) * step:.{0 if step >= 1 else 1}f}{unit}"
    return str(int(n))


def available_memory(device: Union[str, "torch.device", None] = None) -> int:
    """Bytes available for new allocations now: free GPU memory for a CUDA device, else the system's
    ``MemAvailable`` (``/proc/meminfo``), else free physical pages (``sysconf``), else 4 GB."""
    if device is not None and str(device).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return _FALLBACK_AVAILABLE


@dataclass(frozen=True)
class Placement:
    """How one tensor is processed under a budget.

    Attributes:
        name: the tensor.
        hold: read once and held in memory (True), or streamed in row blocks over several passes (False).
        block_rows: rows per block when reading it (for a held tensor too: it is read in blocks into memory).
        hold_bytes: what holding it needs.
        stream_bytes: what streaming it needs with ``block_rows``-row blocks.
        reason: why, in words (for a report).
        over_budget: held although that needs more than the budget (the tensor cannot be streamed).
    """

    name: str
    hold: bool
    block_rows: int
    hold_bytes: int
    stream_bytes: int
    reason: str
    over_budget: bool = False


@dataclass(frozen=True)
class WholeProcess:
    """A size meant for the whole process's peak memory (what the CLI's ``--max-memory`` means), not only for the
    operation's tensors: on a CPU device, the memory the process already holds when the operation starts
    (Python, torch, whatever else is loaded) counts against it. ``size`` None: the default."""

    size: Optional[Size] = None


class MemoryBudget:
    """At most ``limit`` bytes for the tensors an operation holds at once (see the module docstring).

    Attributes:
        limit: bytes for the operation's tensors (``total - in_use``).
        total: the size asked for.
        in_use: bytes the process held at the start that count against ``total`` (:class:`WholeProcess` on a CPU
            device; else 0).
        description: where it came from, for reports (``"--max-memory 400MB"``, ``"default: 50% of the 21.4 GB
            available"``).
    """

    def __init__(self, total: int, description: str, in_use: int = 0) -> None:
        if total <= 0:
            raise ConfigError(f"a memory budget must be positive, got {total}")
        self.total, self.in_use = int(total), int(in_use)
        self.limit = self.total - self.in_use
        self.description = description

    @classmethod
    def resolve(cls, max_memory: Union[Size, WholeProcess, "MemoryBudget", None] = None,
                device: Union[str, "torch.device", None] = None, what: str = "--max-memory") -> "MemoryBudget":
        """The budget for ``max_memory`` on ``device``.

        Args:
            max_memory: bytes or text (:func:`parse_size`); None: :data:`DEFAULT_MAX_MEMORY`; a
                :class:`WholeProcess` for a size that includes what the process already holds (CPU only); a
                :class:`MemoryBudget` is returned as it is. A percentage is a share of the memory available on
                ``device`` now, for the operation's tensors.
            device: where the held tensors live (a CUDA device: its free memory is what percentages refer to).

        Raises:
            ConfigError: ``max_memory`` is not a size.
        """
        if isinstance(max_memory, MemoryBudget):
            return max_memory
        whole = isinstance(max_memory, WholeProcess)
        size = max_memory.size if whole else max_memory
        text = DEFAULT_MAX_MEMORY if size is None else size
        relative = isinstance(text, str) and text.strip().endswith("%")
        available = available_memory(device) if relative else None
        total = parse_size(text, available=available, what=what)
        in_use = 0
        if size is None:
            description = f"default: {text} of the {format_size(available)} available"
        elif relative:
            description = f"{what} {text.strip()}: {format_size(total)} of the {format_size(available)} available"
        else:
            description = f"{what} {text}" if isinstance(text, str) else f"{what} {format_size(total)}"
            if whole and (device is None or not str(device).startswith("cuda")):
                in_use = resident_memory()
                description += f" for the whole process, {format_size(in_use)} of it in use at the start"
        return cls(total, description, in_use)

    def require(self, needs: Sequence[tuple[str, int, str]]) -> None:
        """Check that the budget is workable: every ``(tensor, smallest bytes, what makes it up)`` fits.

        Raises:
            ConfigError: the budget is below the largest of ``needs``; the message names that tensor, the
                smallest workable budget and what makes it up.
        """
        if not needs:
            return
        name, smallest, why = max(needs, key=lambda need: need[1])
        if smallest > self.limit:
            minimum = _round_up_size(smallest + self.in_use)
            held = f" and {format_size(self.in_use)} the process already holds (Python, torch)" if self.in_use else ""
            raise ConfigError(
                f"the memory budget ({self.description}) is below the smallest workable budget for this input, "
                f"{minimum}: {name} needs {why}{held}. Use --max-memory {minimum} or more"
            )

    def place(self, name: str, *, hold_bytes: int, row_bytes: int, fixed_bytes: int, rows: int,
              reserved: int = 0, max_block_rows: Optional[int] = None, can_stream: bool = True,
              cannot_stream_reason: str = "") -> Placement:
        """Hold ``name`` when ``hold_bytes + reserved`` fits the budget, else stream it in the largest row blocks
        that fit (at most ``max_block_rows``).

        Args:
            hold_bytes: bytes to hold the tensor's working set.
            row_bytes: bytes per row of one streamed block (the raw rows read plus their converted copies).
            fixed_bytes: bytes a streamed pass holds besides the block (sketches, factors).
            rows: the tensor's row count.
            reserved: bytes already committed elsewhere (the output being built).
            max_block_rows: the preferred block size (rows) when memory is plentiful.
            can_stream: False when the algorithm needs the whole tensor (it is then held whatever the budget, and
                ``cannot_stream_reason`` says why).
        """
        best = max(1, min(rows, max_block_rows or rows))
        free = self.limit - reserved
        if hold_bytes <= free:
            return Placement(name, True, best, hold_bytes, fixed_bytes + best * row_bytes,
                             f"holding it needs {format_size(hold_bytes)}, within the budget")
        left = f"the {format_size(max(free, 0))} left in the budget"
        if not can_stream:
            return Placement(name, True, best, hold_bytes, fixed_bytes + best * row_bytes,
                             f"held although holding it needs {format_size(hold_bytes)}, above {left}: "
                             f"{cannot_stream_reason}", over_budget=True)
        block = int(min(best, max(1, (free - fixed_bytes) // max(row_bytes, 1))))
        return Placement(name, False, block, hold_bytes, fixed_bytes + block * row_bytes,
                         f"holding it needs {format_size(hold_bytes)}, above {left}; streamed in blocks of "
                         f"{block} rows")

    def __repr__(self) -> str:
        return f"MemoryBudget({format_size(self.total)}, {self.description!r})"


def resident_memory() -> int:
    """This process's resident memory now (``VmRSS``), or 0 where the system does not say."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
