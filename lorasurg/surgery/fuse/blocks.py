"""``fuse`` under a memory budget: what each BASE tensor needs, and a merged tensor computed in row blocks.

A tensor whose work does not fit the budget (:mod:`lorasurg.surgery.rewrite_memory`) is read, merged and written
in row blocks of the stored layout (dim 0): for a LoRA weight, block ``[i, j)`` of ``W' = W + s * B @ A`` is
:func:`lorasurg.engine.factors.merged_rows` of those rows of ``W`` (rows of ``B`` for linear/conv, columns of ``A``
for embedding and fan_in_fan_out); DoRA's row norms are the block's own rows for linear/conv, and are summed over
a first pass of blocks where stored rows are matrix columns (:func:`~lorasurg.engine.factors.merged_row_norms_sq`).
A 3-D expert tensor BASE stores whole (gpt-oss) is merged in blocks of experts (dim 0 is the expert:
:func:`lorasurg.engine.experts.merged_experts`).
Each block is spooled to disk as it is computed (:class:`lorasurg.io.rewrite.RowBlocks`), so neither the weight
nor the merged result is ever whole in memory. The same float32 arithmetic as :func:`merged_weight`, in another
grouping: results agree to float32 rounding of the sum (a few ulps), then are cast to the tensor's dtype.

Bytes per element (``i``: stored item size, ``o``: output item size) counted for a merged weight held whole: the
stored tensor, its cast, the float32 matrix, ``B @ A`` and its scaled copy, the sum, the result (``i + 2o + 12``;
DoRA ``+4``; an untied alias written from the same tensor ``+o``); per row of a block: the stored rows, their cast,
the float32 copy ``B @ A`` is added into in place, the result (``i + 2o + 4``); of a block of experts, the rows, their
float32 copy, the deltas and their sum, the result (``i + o + 12``). A copied tensor: ``i`` (``+o`` when cast). Measured on a 4096x4096 float32 weight: peak memory above the interpreter's within the budget.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch import Tensor

from ...engine.experts import merged_experts
from ...engine.factors import LoraFactors, merged_row_norms_sq, merged_rows, stored_rows_are_columns
from ...io._memory import return_freed_memory
from ...io.checkpoint import Checkpoint
from ...io.rewrite import RowBlocks, TensorSource
from ..rewrite_memory import Work, copy_work
from .plan import FusePlan

__all__ = ["fuse_works", "merged_blocks", "touched"]


def touched(plan: FusePlan, name: str) -> bool:
    """Whether the fuse writes BASE tensor ``name`` other than as a copy."""
    return (name in plan.module_of or name in plan.replace or name in plan.zero_bias or name in plan.untie
            or name in plan.stacked or name in plan.rows)


def _merge_factors(plan: FusePlan, key: str) -> Optional[LoraFactors]:
    """The factors merged into weight ``key``, or None (a bias, a copy, a saved copy)."""
    module = plan.module_of.get(key)
    f = plan.factors.get(module) if module is not None else None
    return f if f is not None and key == f"{module}.weight" else None


def fuse_works(ckpt: Checkpoint, plan: FusePlan, out_dtype: Optional[torch.dtype]) -> dict[str, Work]:
    """What processing each BASE tensor needs (see the module docstring)."""
    works = {}
    for name in ckpt.names():
        copy = copy_work(ckpt, name, out_dtype)
        if not touched(plan, name):
            works[name] = copy
            continue
        shape = tuple(ckpt.shape(name))
        n, cols = math.prod(shape), (math.prod(shape[1:]) if shape else 1)
        stored = ckpt.dtype(name)
        out = out_dtype if out_dtype is not None and stored.is_floating_point else stored
        i, o = stored.itemsize, out.itemsize
        keys = [name] + ([plan.untie[name]] if name in plan.untie else [])
        merges = [f for f in map(lambda k: _merge_factors(plan, k), keys) if f is not None]
        dora = any(f.magnitude is not None for f in merges)
        merged = bool(merges) or name in plan.stacked
        per = i + len(keys) * o + ((o + 12 + 4 * dora) if merged else 0)  # whole: merged_weight's temporaries
        per_row = i + o + ((4 + o) if merges else 12 if merged else 0)  # blocks: merged_rows adds B @ A in place
        module = plan.module_of.get(name)
        f = plan.factors.get(module) if module is not None else None
        if f is not None and name == f"{module}.bias":
            stream = "a bias with lora_B's bias added is processed whole"
        elif any(k in plan.rows for k in keys):
            stream = "its trainable-token rows are written into it whole"
        elif shape and all(k in plan.replace for k in keys):
            stream = ""  # the adapter's saved copy, already in memory: sliced
        else:
            stream = copy.stream
        what = "merged" if merged else "replaced" if name in plan.replace else "copied"
        works[name] = Work(n * per, cols * per_row, fixed=8 * cols if dora else 0, what=what, stream=stream)
    return works


def _rows(key: str, name: str, plan: FusePlan, source: TensorSource, block_rows: int, device: torch.device,
          dtype: torch.dtype) -> Iterator[tuple[int, Tensor]]:
    """``(start, rows)`` of what output ``key`` starts from, in ``dtype`` on ``device``: the adapter's saved copy, or
    BASE tensor ``name``'s rows."""
    if key in plan.replace:
        saved = plan.replace[key]
        for start in range(0, saved.shape[0], block_rows):
            yield start, saved[start:start + block_rows].to(device, dtype)
    else:
        yield from source.row_blocks(name, block_rows, device)


def merged_blocks(key: str, name: str, plan: FusePlan, source: TensorSource, block_rows: int,
                  device: torch.device, on_device) -> RowBlocks:
    """Output ``key`` (BASE tensor ``name``, or the untied alias written from it) as row blocks of ``block_rows``
    rows, merged with its module's LoRA where it has one; computed as the writer consumes them.

    ``on_device(factors)``: the factors (LoraFactors or ExpertFactors) on ``device``.
    """
    dtype = source.output_dtype(name)
    f = _merge_factors(plan, key)
    experts = plan.stacked.get(key)

    def blocks() -> Iterator[Tensor]:
        if experts is not None:
            fd = on_device(experts)
            for start, rows in _rows(key, name, plan, source, block_rows, device, dtype):
                out = merged_experts(fd.A, fd.B, fd.scale, rows, start, fd.transposed).to("cpu")  # (n, d1, d2)
                del rows
                yield out
                del out
                return_freed_memory()
            return
        if f is None:
            for _, rows in _rows(key, name, plan, source, block_rows, device, dtype):
                out = rows.to("cpu")
                del rows  # not alive while the next block is read
                yield out
                del out
                return_freed_memory()
            return
        fd = on_device(f)
        norm = None
        if f.magnitude is not None and stored_rows_are_columns(f):  # DoRA's norms span every block: a first pass
            total = None
            for start, rows in _rows(key, name, plan, source, block_rows, device, dtype):
                part = merged_row_norms_sq(fd, rows, start)  # (out,)
                total = part if total is None else total + part
                del rows
            norm = total.sqrt()
        for start, rows in _rows(key, name, plan, source, block_rows, device, dtype):
            out = merged_rows(fd, rows, start, norm).to("cpu")  # (rows, *shape[1:])
            del rows  # not alive while the next block is read
            yield out
            del out
            return_freed_memory()

    return RowBlocks(tuple(source.checkpoint.shape(name)), dtype, blocks())
