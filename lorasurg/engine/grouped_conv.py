"""LoRA on a grouped convolution (``groups = g > 1``), PEFT 0.21.2's way: tensors, kernel, DoRA norm, initial draws.

PEFT keeps ``A`` a full conv and makes ``B`` a grouped 1x1 conv (``peft/tuners/lora/layer.py``, ``_ConvNd``):

    A: (r, in, *k)          (the base layer's kernel, stride, padding; groups = 1)
    B: (out, r / g, 1, ...) (groups = g: output ``o`` of group ``c = o // (out / g)`` reads rank channels
                             ``c * r/g .. (c + 1) * r/g - 1``)

so ``r`` must be a multiple of ``g`` (PEFT's rule; a multiple works, and every other rank is refused). The delta
``B(A(x))`` is the convolution with the *dense* kernel (:func:`grouped_delta_kernel`)

    K[o] = scale * sum_j B[o, j] * A[c(o) * r/g + j]        K: (out, in, *k)

which a grouped weight ``(out, in / g, *k)`` cannot hold: the delta reaches every input channel. Merging is
therefore impossible without changing the layer's type (PEFT refuses it too).

DoRA (PEFT's ``_DoraConvNdLayer``) divides by the per-output norm of ``W + scale * L`` with
``L = (B.view(-1, r) @ A.view(r, -1)).reshape(W.shape)``: for ``g > 1`` that ``view`` regroups B's entries, so ``L`` is
not the delta above and the norm is not that of the adapted kernel. A magnitude trained with PEFT is calibrated
against this norm, so :func:`peft_dora_norm` computes PEFT's value (the tests show it differs from the adapted
kernel's norm).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .factors import compute_dtype

__all__ = ["grouped_factor_shapes", "grouped_delta_kernel", "peft_dora_norm", "grouped_init"]


def grouped_factor_shapes(weight_shape: tuple[int, ...], groups: int, r: int
                          ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(A shape, B shape)`` of a rank-``r`` LoRA on a grouped conv weight ``(out, in / g, *k)``."""
    out, per_group, *kernel = (int(d) for d in weight_shape)
    ones = (1,) * len(kernel)
    return (r, per_group * groups, *kernel), (out, r // groups, *ones)


def grouped_delta_kernel(A: Tensor, B: Tensor, scale: float, groups: int) -> Tensor:
    """The dense kernel ``(out, in, *k)`` of ``scale * B(A(x))`` (module docstring), in the compute dtype."""
    work = compute_dtype(A, B)
    r, out = A.shape[0], B.shape[0]
    per_rank, per_out = r // groups, out // groups
    A_g = A.reshape(groups, per_rank, -1).to(work)  # (g, r/g, in*prod(k))
    B_g = B.reshape(groups, per_out, per_rank).to(work)  # (g, out/g, r/g)
    kernel = torch.bmm(B_g, A_g) * scale  # (g, out/g, r/g) @ (g, r/g, in*prod(k)) -> (g, out/g, in*prod(k))
    return kernel.reshape(out, *A.shape[1:])  # (out, in, *k)


def peft_dora_norm(A: Tensor, B: Tensor, weight: Tensor, scale: float) -> Tensor:
    """PEFT's DoRA norm ``||W + scale * (B.view(-1, r) @ A.view(r, -1)).reshape(W.shape)||_row``, shape ``(out,)``."""
    work = compute_dtype(weight, A)
    r = A.shape[0]
    regrouped = (B.reshape(-1, r).to(work) @ A.reshape(r, -1).to(work)).reshape(weight.shape)  # (out/g, r) @ (r, ...)
    adapted = weight.to(work) + scale * regrouped  # (out, in/g, *k)
    return torch.linalg.vector_norm(adapted.reshape(adapted.shape[0], -1), dim=1)  # (out,)


def _kaiming(shape: tuple[int, ...], generator: Optional[torch.Generator]) -> Tensor:
    """nn.ConvNd's default weight init (kaiming-uniform, ``a = sqrt(5)``), on the CPU."""
    return torch.nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=generator)


def grouped_init(method: str, weight_shape: tuple[int, ...], groups: int, r: int, *, lora_bias: bool = False,
                 generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Initial ``(A, B, lora_B bias)`` with PEFT's draws, in its order: the ``lora_A`` and (grouped) ``lora_B``
    modules' default weights (and bias), then ``kaiming`` (True) redraws A and zeroes B, ``random`` (False) keeps the
    modules' weights, ``gaussian`` draws ``A ~ N(0, (1/r)^2)`` and zeroes B. On the CPU in float32.

    Raises:
        ValueError: another method (PEFT has no PiSSA/OLoRA/orthogonal on convolutions).
    """
    if method not in ("kaiming", "random", "gaussian"):
        raise ValueError(f"no {method!r} initialisation for a grouped convolution")
    A_shape, B_shape = grouped_factor_shapes(weight_shape, groups, r)
    A = _kaiming(A_shape, generator)
    B = _kaiming(B_shape, generator)
    bias = None
    if lora_bias:
        bound = 1 / math.sqrt(math.prod(B_shape[1:]))  # nn.ConvNd's bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bias = torch.empty(B_shape[0]).uniform_(-bound, bound, generator=generator)
    if method == "random":
        return A, B, bias
    if method == "kaiming":
        A = _kaiming(A_shape, generator)
    else:
        A = torch.nn.init.normal_(torch.empty(A_shape), std=1 / r, generator=generator)
    return A, torch.zeros(B_shape), None if bias is None else torch.zeros_like(bias)
