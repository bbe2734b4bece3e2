"""``residualize`` under a memory budget: each target is factored whole, every other tensor copied in row blocks
when it does not fit.

PiSSA's SVD and OLoRA's QR need the whole matrix, so a target is held whole; one whose working set does not fit the
budget is refused before anything is written (:func:`lorasurg.surgery.rewrite_memory.place_rewrite`: the message
names the tensor, its working set and the smallest workable budget). Tensors that are not targets are copied through
as :func:`~lorasurg.surgery.rewrite_memory.copy_work` says, in row blocks when they do not fit.

A target's working set, in bytes per element of the weight (``i``: stored item size, ``o``: the output's, ``w``: the
compute dtype's, 4 or 8 for float64), an upper estimate of what :func:`lorasurg.engine.init.init_factors` allocates:
the read and its cast (``i + o``), the matrix in the compute dtype (``w``), ``(s * B) @ A`` and the residual
(``2w``) and its cast (``o``); plus exact PiSSA's float64 copy (8, float32/float64 outputs) and its Gram matrix and
eigenvectors (``3 * 8 * q**2``, ``q = min(out, in)``), ``pissa_niter_N``'s sketches and copies (``2w``), OLoRA's
QR copy and factors (``3w``). An embedding target (PEFT's default init: the weight is not changed) is only read. A 3-D
expert tensor stored whole is factored one expert at a time: the read and its cast, the residual experts and their
stack (``i + o + 2w``) for the whole tensor, plus one expert matrix's working set as above.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from ...engine.init import InitMethod
from ...io.checkpoint import Checkpoint
from ..rewrite_memory import Work, copy_work

__all__ = ["residualize_works", "adapter_bytes"]


def _matrix_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def _matrix_work(rows: int, cols: int, method: InitMethod, i: int, out: torch.dtype) -> tuple[int, int, str]:
    """``(bytes per element, fixed bytes, why it is held whole)`` of factoring one ``(rows, cols)`` matrix."""
    o = out.itemsize
    w = 8 if out == torch.float64 else 4
    per = i + o + w + 2 * w + o
    if method.name == "pissa" and method.niter is None:
        per += 8 if out in (torch.float32, torch.float64) else 0
        return per, 3 * 8 * min(rows, cols) ** 2, "PiSSA's SVD needs the whole matrix"
    if method.name == "pissa":
        return per + 2 * w, 0, "PiSSA's randomized SVD needs the whole matrix"
    return per + 3 * w, 0, "OLoRA's QR needs the whole matrix"


def target_work(ckpt: Checkpoint, name: str, kind: str, method: InitMethod, out_dtype: Optional[torch.dtype],
                matrix: Optional[tuple[int, int]] = None) -> Work:
    """The working set of factoring target weight ``name`` whole (see the module docstring); ``matrix``: one expert's
    ``(out, in)`` for a 3-D expert tensor factored expert by expert."""
    shape = tuple(ckpt.shape(name))
    stored = ckpt.dtype(name)
    out = out_dtype if out_dtype is not None else stored
    n, (rows, cols) = math.prod(shape), _matrix_dims(shape)
    i, o = stored.itemsize, out.itemsize
    if kind == "embedding":
        return Work(n * (i + o), cols * (i + o), what="target", stream="an embedding target is read whole",
                    required=True)
    if matrix is None:
        per, extra, why = _matrix_work(rows, cols, method, i, out)
        return Work(n * per + extra, cols * per, what="residual", stream=why, required=True)
    per, extra, why = _matrix_work(*matrix, method, i, out)
    whole = i + o + 2 * (8 if out == torch.float64 else 4)  # the read, its cast, the residual experts, their stack
    return Work(n * whole + math.prod(matrix) * per + extra, cols * whole, what="residual",
                stream=f"{why} (one expert at a time)", required=True)


def residualize_works(ckpt: Checkpoint, targets: Mapping[str, object], method: InitMethod,
                      out_dtype: Optional[torch.dtype]) -> dict[str, Work]:
    """What processing each BASE tensor needs: a target weight whole, every other tensor as a copy."""
    by_key = {target.key: target for target in targets.values()}
    works = {}
    for name in ckpt.names():
        target = by_key.get(name)
        if target is None:
            works[name] = copy_work(ckpt, name, out_dtype)
        else:
            matrix = tuple(target.info.weight_shape) if target.parameter is not None else None
            works[name] = target_work(ckpt, name, target.info.kind, method, out_dtype, matrix)
    return works


def adapter_bytes(targets: Mapping[str, object], ckpt: Checkpoint) -> int:
    """The initial adapter held until the end: ``rank * (out + in)`` factors per target matrix (every expert of a
    stored 3-D tensor), float32 (float64 BASE)."""
    total = 0
    for target in targets.values():
        rows, cols = _matrix_dims(tuple(target.info.weight_shape))
        experts = target.parameter.experts if target.parameter is not None else 1
        total += experts * target.rank * (rows + cols) * (8 if ckpt.dtype(target.key) == torch.float64 else 4)
    return total
