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
QR copy and factors (``3w``). An embedding target (PEFT's default init: the weight is not changed) is only read.
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


def target_work(ckpt: Checkpoint, name: str, kind: str, method: InitMethod, out_dtype: Optional[torch.dtype]) -> Work:
    """The working set of factoring target weight ``name`` whole (see the module docstring)."""
    shape = tuple(ckpt.shape(name))
    stored = ckpt.dtype(name)
    out = out_dtype if out_dtype is not None else stored
    n, (rows, cols) = math.prod(shape), _matrix_dims(shape)
    i, o = stored.itemsize, out.itemsize
    if kind == "embedding":
        return Work(n * (i + o), cols * (i + o), what="target", stream="an embedding target is read whole",
                    required=True)
    w = 8 if out == torch.float64 else 4
    per = i + o + w + 2 * w + o
    extra = 0
    if method.name == "pissa" and method.niter is None:
        per += 8 if out in (torch.float32, torch.float64) else 0
        extra = 3 * 8 * min(rows, cols) ** 2
        why = "PiSSA's SVD needs the whole matrix"
    elif method.name == "pissa":
        per += 2 * w
        why = "PiSSA's randomized SVD needs the whole matrix"
    else:
        per += 3 * w
        why = "OLoRA's QR needs the whole matrix"
    return Work(n * per + extra, cols * per, what="residual", stream=why, required=True)


def residualize_works(ckpt: Checkpoint, targets: Mapping[str, object], method: InitMethod,
                      out_dtype: Optional[torch.dtype]) -> dict[str, Work]:
    """What processing each BASE tensor needs: a target weight whole, every other tensor as a copy."""
    weights = {f"{module}.weight": target.info.kind for module, target in targets.items()}
    return {name: target_work(ckpt, name, weights[name], method, out_dtype) if name in weights
            else copy_work(ckpt, name, out_dtype) for name in ckpt.names()}


def adapter_bytes(targets: Mapping[str, object], ckpt: Checkpoint) -> int:
    """The initial adapter held until the end: ``rank * (out + in)`` factors per target, float32 (float64 BASE)."""
    total = 0
    for module, target in targets.items():
        name = f"{module}.weight"
        rows, cols = _matrix_dims(tuple(ckpt.shape(name)))
        total += target.rank * (rows + cols) * (8 if ckpt.dtype(name) == torch.float64 else 4)
    return total
