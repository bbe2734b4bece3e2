"""The memory budget applied to a checkpoint rewrite (``fuse``, ``residualize``): each tensor whole, or in row blocks.

A rewrite (:func:`lorasurg.io.rewrite.rewrite_checkpoint`) handles BASE one tensor at a time. Per tensor the
operation states what it needs (:class:`Work`, bytes):

* ``hold``: processing it whole (read, cast to the output dtype, the float32 arithmetic, the result);
* ``row``, ``fixed``: processing it in row blocks, per row of a block and besides the block;
* whether it can be processed in row blocks at all (``stream``: why not), and whether it must then fit the budget
  (``required``: e.g. a PiSSA/OLoRA target, whose SVD/QR needs the whole matrix) or is held above it with a note
  (a tensor of a ``.bin`` file, which cannot be read by rows).

:func:`place_rewrite` checks before any work that the budget is workable (every streamable tensor's one-row
block, every required tensor whole, each plus the ``reserved`` bytes the operation holds throughout: the adapter)
with :meth:`MemoryBudget.require` (the message names the tensor and the smallest workable budget), then places
every tensor with :meth:`MemoryBudget.place`: held when ``hold + reserved`` fits, else in the largest row blocks
that fit. :class:`MemoryUse` is what the reports say about it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

import torch

from ..io.checkpoint import Checkpoint
from .budget import MemoryBudget, Placement, format_size
from .report import format_table

__all__ = ["Work", "copy_work", "BlockedTensor", "MemoryUse", "place_rewrite"]


@dataclass(frozen=True)
class Work:
    """What processing one BASE tensor needs, in bytes (see the module docstring).

    Attributes:
        hold: to process it whole.
        row: per row of a row block.
        fixed: per streamed tensor besides its block.
        what: what is done to it, for reports (``"copied"``, ``"merged"``, ``"residual"``).
        stream: "" when it can be processed in row blocks; else why it cannot.
        required: it cannot be streamed and must fit the budget whole (refused up front otherwise).
    """

    hold: int
    row: int
    fixed: int = 0
    what: str = "copied"
    stream: str = ""
    required: bool = False


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def copy_work(ckpt: Checkpoint, name: str, out_dtype: Optional[torch.dtype]) -> Work:
    """A tensor copied through: the stored bytes read, plus a cast copy when its output dtype differs."""
    shape = tuple(ckpt.shape(name))
    stored = ckpt.dtype(name)
    cast = out_dtype is not None and stored.is_floating_point and out_dtype != stored
    per = _itemsize(stored) + (_itemsize(out_dtype) if cast else 0)
    cols = math.prod(shape[1:]) if shape else 1
    return Work(math.prod(shape) * per, cols * per, stream=_why_not_rows(ckpt, name))


def _why_not_rows(ckpt: Checkpoint, name: str) -> str:
    if not ckpt.shape(name):
        return "a scalar has no rows"
    if ckpt.shard_of(name).suffix != ".safetensors":
        return ".bin checkpoints cannot be read in row blocks (convert them to safetensors to stream)"
    return ""


@dataclass
class BlockedTensor:
    """A tensor processed in row blocks because processing it whole needs more than the budget leaves."""

    name: str
    what: str
    shape: list[int]
    hold_bytes: int
    block_rows: int
    reason: str


@dataclass
class MemoryUse:
    """The memory budget of a rewrite and what it decided, for a report.

    Attributes:
        max_memory: the budget's size in bytes.
        in_use: bytes the process held at the start that count against it (``--max-memory``).
        budget: where it came from (``"--max-memory 400MB"``, ``"default: 50% of ..."``).
        reserved: bytes held throughout (the adapter), and what they are.
        blocked: tensors processed in row blocks.
        over_budget: tensors held whole although that needs more than the budget (they cannot be streamed), with why.
    """

    max_memory: int = 0
    in_use: int = 0
    budget: str = ""
    reserved: int = 0
    reserved_for: str = ""
    blocked: list[BlockedTensor] = field(default_factory=list)
    over_budget: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, budget: MemoryBudget, reserved: int, reserved_for: str,
           placements: Mapping[str, Placement], works: Mapping[str, Work], ckpt: Checkpoint) -> "MemoryUse":
        use = cls(budget.total, budget.in_use, budget.description, reserved, reserved_for)
        for name, place in placements.items():
            if not place.hold:
                use.blocked.append(BlockedTensor(name, works[name].what, list(ckpt.shape(name)), place.hold_bytes,
                                                 place.block_rows, place.reason))
            elif place.over_budget:
                use.over_budget.append(f"{name}: {place.reason}")
        return use

    def to_dict(self) -> dict[str, Any]:
        return {"max_memory": self.max_memory, "in_use_at_start": self.in_use,
                "for_tensors": self.max_memory - self.in_use, "budget": self.budget,
                "reserved": {"bytes": self.reserved, "for": self.reserved_for},
                "row_blocks": [asdict(t) for t in self.blocked], "held_over_budget": list(self.over_budget)}

    def render(self) -> str:
        head = f"memory budget {format_size(self.max_memory)} ({self.budget})"
        if not self.blocked:
            text = head + ": every tensor processed whole (one read each)"
        else:
            rows = [(t.name, t.what, "x".join(map(str, t.shape)) or "scalar", format_size(t.hold_bytes), t.block_rows)
                    for t in self.blocked]
            left = format_size(self.max_memory - self.in_use - self.reserved)
            besides = f" besides the {format_size(self.reserved)} of {self.reserved_for}" if self.reserved else ""
            text = (head + f": {len(self.blocked)} tensor(s) processed in row blocks, because processing them whole "
                    f"needs more than the {left} the budget leaves{besides}:\n"
                    + format_table(rows, ["tensor", "what", "shape", "whole needs", "block rows"]))
        if self.over_budget:
            text += "\nheld whole above the budget: " + "; ".join(self.over_budget)
        return text


def place_rewrite(budget: MemoryBudget, ckpt: Checkpoint, works: Mapping[str, Work], *, reserved: int = 0,
                  reserved_for: str = "") -> dict[str, Placement]:
    """Check that the budget is workable, then decide for each tensor of ``works`` whether it is held or streamed.

    Raises:
        ConfigError: the budget is below the smallest workable one: a streamable tensor's one-row block, or a
            required tensor whole, plus ``reserved`` (the message names the tensor, what it needs and the minimum).
    """
    plus = f", plus {format_size(reserved)} reserved for {reserved_for}" if reserved else ""
    needs = []
    for name, work in works.items():
        shape = tuple(ckpt.shape(name))
        if work.required:
            needs.append((name, reserved + work.hold, f"{format_size(work.hold)} to hold it whole "
                          f"({work.stream}){plus}"))
        elif not work.stream:
            needs.append((name, reserved + work.fixed + work.row, f"one row of {format_size(work.row)}"
                          + (f" and {format_size(work.fixed)} of working memory" if work.fixed else "")
                          + f" to process its {shape[0]} rows in blocks{plus}"))
    budget.require(needs)
    result = {}
    for name, work in works.items():
        shape = tuple(ckpt.shape(name))
        result[name] = budget.place(
            name, hold_bytes=work.hold, row_bytes=work.row, fixed_bytes=work.fixed, rows=shape[0] if shape else 1,
            reserved=reserved, can_stream=not work.stream, cannot_stream_reason=work.stream)
    return result
