"""DoRA's magnitude vector and the per-output factor its forward pass scales by.

DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353, eq. 5) splits the adapted weight into a direction and a
trained magnitude ``m``:

    W' = m / ||W + delta||_row * (W + delta),        delta = scale * B @ A

so the layer's output is ``f * (W x) + f * (scale * B A x)`` with ``f = m / ||W + delta||_row`` (one factor per
output). Following section 4.3 of the paper, ``||W + delta||_row`` is treated as a constant (detached): only ``m``,
``A`` and ``B`` receive gradients through ``f``. The norm itself is :func:`lorasurg.engine.factors.dora_weight_norm`,
the definition the offline tools use too.

PEFT stores ``m`` as the ``weight`` of a small module under ``lora_magnitude_vector.<adapter>``; its shape is
``(out,)`` for linear and embedding layers and ``(1, out, 1, ...)`` for convolutions. :class:`DoraMagnitude` keeps that
layout so state_dict keys line up with PEFT's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..engine.factors import LoraFactors, dora_weight_norm

__all__ = ["DoraMagnitude", "magnitude_shape", "dora_factor"]


class DoraMagnitude(nn.Module):
    """Holds DoRA's magnitude ``m`` as ``self.weight`` (PEFT's key: ``lora_magnitude_vector.<adapter>.weight``)."""

    def __init__(self, magnitude: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)

    def forward(self, *args, **kwargs):  # pragma: no cover - a parameter holder, never called
        raise RuntimeError("DoraMagnitude holds a parameter; it is not a layer")


def magnitude_shape(kind: str, out_features: int) -> tuple[int, ...]:
    """PEFT's stored shape of the magnitude: ``(out,)``, or ``(1, out, 1, ...)`` for a convolution."""
    if kind.startswith("conv"):
        kernel_dims = int(kind[4])  # "conv2d" -> 2
        return (1, out_features) + (1,) * kernel_dims
    return (out_features,)


def dora_factor(factors: LoraFactors, weight: Tensor, magnitude: Tensor, dtype: torch.dtype) -> Tensor:
    """``m / ||W + delta||_row`` as a ``(out,)`` tensor of ``dtype``; the norm is detached (paper, section 4.3).

    Args:
        factors: the adapter's factors; their tensors are detached here, so pass live parameters freely.
        weight: the base weight (its layout follows ``factors.kind``).
        magnitude: ``m`` in any shape with ``out`` elements; gradients flow into it.
        dtype: the dtype of the result (the activations' dtype).
    """
    detached = LoraFactors(
        factors.kind, factors.A.detach(), factors.B.detach(), factors.scale, fan_in_fan_out=factors.fan_in_fan_out
    )
    with torch.no_grad():
        norm = dora_weight_norm(detached, weight.detach()).to(dtype)  # (out,)
    return magnitude.reshape(-1).to(dtype) / norm  # (out,)
