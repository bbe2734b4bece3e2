"""Checks of tensor values shared by the readers and writers: whether a tensor holds only finite numbers, and the
``value-nonfinite`` findings of a set of tensors (:meth:`lorasurg.io.adapter.Adapter.findings`, ``validate``).

:func:`all_finite` is one ``aminmax`` pass (NaN propagates to the minimum and maximum, an infinity is one of them),
with no temporary the size of the tensor, unlike ``torch.isfinite(t).all()`` (a bool per element); the counts of
:func:`nonfinite_counts` are only taken for a message, once a tensor failed.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from ..findings import Finding

__all__ = ["all_finite", "nonfinite_counts", "describe_nonfinite", "nonfinite_findings"]


def all_finite(tensor: Tensor) -> bool:
    """True when ``tensor`` holds no NaN and no infinity (always for integer, bool and meta tensors)."""
    if tensor.is_meta or not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def nonfinite_counts(tensor: Tensor) -> tuple[int, int]:
    """``(NaN count, infinity count)`` of ``tensor``."""
    return int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())


def describe_nonfinite(tensor: Tensor) -> str:
    """``"1 NaN and 2 inf"``."""
    nan, inf = nonfinite_counts(tensor)
    return f"{nan} NaN and {inf} inf"


def nonfinite_findings(tensors: Mapping[str, Tensor]) -> list[Finding]:
    """``value-nonfinite`` for each floating tensor of ``tensors`` that holds NaN or inf (where: its key); tensors on
    the meta device (shapes only) are skipped."""
    found = []
    for key, tensor in tensors.items():
        if all_finite(tensor):
            continue
        found.append(Finding(
            "value-nonfinite", key, f"{describe_nonfinite(tensor)} among its {tensor.numel()} values "
            f"(shape {tuple(tensor.shape)}, {str(tensor.dtype).removeprefix('torch.')})",
            "the training diverged or the file was written from a broken state: use an earlier checkpoint",
        ))
    return found
