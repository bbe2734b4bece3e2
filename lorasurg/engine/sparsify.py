"""Element-wise merges of task tensors: trim, elect a sign, disjoint mean, random drop with rescale.

A *task tensor* is one adapter's contribution to one weight (a LoRA factor, or a dense delta). The merges here
combine ``n`` task tensors ``T_1 .. T_n`` of one shape with weights ``w_1 .. w_n``; they are the building blocks of
TIES (Yadav et al. 2023, https://arxiv.org/abs/2306.01708), DARE (Yu et al. 2023, https://arxiv.org/abs/2311.03099)
and magnitude pruning, with the conventions of PEFT's ``add_weighted_adapter`` (``peft.utils.merge_utils``, 0.21.2):

==================  =====================================================================================
primitive           definition
==================  =====================================================================================
magnitude_trim      keep the ``k = floor(density * numel)`` entries of largest ``|T|``, zero the rest
                    (``density >= 1`` keeps everything)
random_drop         keep each entry with probability ``density`` (a seeded Bernoulli draw), zero the rest,
                    and divide the survivors by ``density`` so the expectation is ``T``
elect_sign          per entry, ``sigma = sign(sum_i T_i)`` (``total``) or ``sign(sum_i sign(T_i))``
                    (``frequency``); ``+1`` where that sum is 0. The mask is ``sign(T_i) == sigma`` (a zero
                    entry never agrees)
disjoint_mean       per entry, ``sum_i mask_i * X_i / max(1, sum_i mask_i)``
==================  =====================================================================================

and the merges (the *tensor methods* of :data:`TENSOR_METHODS`):

====================  ===============================================================================
name                  result
====================  ===============================================================================
``linear``            ``sum_i w_i T_i`` (task arithmetic)
``magnitude_prune``   ``sum_i w_i trim(T_i)``
``ties``              ``disjoint_mean(w_i trim(T_i), elect_sign(trim(T_i)))``
``dare_linear``       ``sum_i w_i drop(T_i)``
``dare_ties``         ``disjoint_mean(w_i drop(T_i), elect_sign(drop(T_i)))``
====================  ===============================================================================

As in PEFT the sign is elected on the trimmed (dropped) tensors *before* weighting. Random draws come from the
``generator`` passed in, one tensor after the other in the order given, so a seeded generator gives the same result
on every run. All are pure: tensors in, new tensors out, in the inputs' dtype.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "SIGN_METHODS",
    "check_density",
    "magnitude_trim",
    "random_drop",
    "elect_sign",
    "disjoint_mean",
    "weighted_sum",
    "TENSOR_METHODS",
]

SIGN_METHODS: tuple[str, ...] = ("total", "frequency")


def check_density(density: float) -> float:
    """``density`` as a float, or ValueError unless ``0 < density <= 1``."""
    value = float(density)
    if not 0 < value <= 1:
        raise ValueError(f"density must be in (0, 1] (the fraction of entries kept), got {density}")
    return value


def magnitude_trim(tensor: Tensor, density: float) -> Tensor:
    """Keep the ``floor(density * numel)`` entries of largest magnitude, zero the others.

    Ties at the threshold are broken by :func:`torch.topk`. ``density >= 1`` returns the tensor unchanged (a copy is
    not made).
    """
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs(), k=k, largest=True).indices] = True
    return (flat * keep).reshape(tensor.shape)


def random_drop(tensor: Tensor, density: float, generator: Optional[torch.Generator] = None,
                rescale: bool = True) -> Tensor:
    """DARE's drop: keep each entry with probability ``density``, then divide the survivors by ``density``.

    Args:
        tensor: the task tensor.
        density: keep probability, in (0, 1]; 1 returns the tensor unchanged and draws nothing.
        generator: the source of the Bernoulli draws (on the tensor's device).
        rescale: divide the survivors by ``density`` (DARE's rescaling; keeps ``E[result] = tensor``).
    """
    if density >= 1:
        return tensor
    probabilities = torch.full(tensor.shape, density, dtype=torch.float32, device=tensor.device)
    keep = torch.bernoulli(probabilities, generator=generator).to(tensor.dtype)  # 1 with probability density
    kept = tensor * keep
    return kept / density if rescale else kept


def elect_sign(stacked: Tensor, method: str = "total") -> Tensor:
    """The mask of entries whose sign agrees with the elected sign, per position (see the module docstring).

    Args:
        stacked: ``(n, *shape)``, the task tensors stacked on dim 0.
        method: ``total`` (sign of the sum) or ``frequency`` (sign of the sum of signs).

    Returns:
        A bool tensor ``(n, *shape)``.
    """
    signs = stacked.sign()
    if method == "total":
        tally = stacked.sum(dim=0)
    elif method == "frequency":
        tally = signs.sum(dim=0)
    else:
        raise ValueError(f"unknown majority sign method {method!r}; use one of {SIGN_METHODS}")
    elected = torch.where(tally >= 0, 1.0, -1.0).to(signs.dtype)
    return signs == elected


def disjoint_mean(weighted: Tensor, mask: Tensor) -> Tensor:
    """``sum_i mask_i * X_i / max(1, sum_i mask_i)`` over dim 0: the mean of the agreeing entries only."""
    total = (weighted * mask).sum(dim=0)
    count = mask.sum(dim=0).clamp(min=1)
    return total / count


def _weights(weights: Sequence[float], like: Tensor) -> Tensor:
    """Weights as a ``(n, 1, ...)`` tensor broadcasting against ``(n, *shape)``."""
    w = torch.as_tensor(list(weights), dtype=like.dtype, device=like.device)
    return w.reshape(-1, *([1] * (like.dim() - 1)))


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i w_i T_i`` (task arithmetic)."""
    stacked = torch.stack(list(tensors))  # (n, *shape)
    return (stacked * _weights(weights, stacked)).sum(dim=0)


def _magnitude_prune(tensors, weights, density, sign, generator):
    return weighted_sum([magnitude_trim(t, density) for t in tensors], weights)


def _ties(tensors, weights, density, sign, generator):
    stacked = torch.stack([magnitude_trim(t, density) for t in tensors])  # (n, *shape)
    return disjoint_mean(stacked * _weights(weights, stacked), elect_sign(stacked, sign))


def _dare_linear(tensors, weights, density, sign, generator):
    return weighted_sum([random_drop(t, density, generator) for t in tensors], weights)


def _dare_ties(tensors, weights, density, sign, generator):
    stacked = torch.stack([random_drop(t, density, generator) for t in tensors])  # (n, *shape)
    return disjoint_mean(stacked * _weights(weights, stacked), elect_sign(stacked, sign))


def _linear(tensors, weights, density, sign, generator):
    return weighted_sum(tensors, weights)


TensorMethod = Callable[[Sequence[Tensor], Sequence[float], float, str, Optional[torch.Generator]], Tensor]

TENSOR_METHODS: dict[str, TensorMethod] = {
    "linear": _linear,
    "magnitude_prune": _magnitude_prune,
    "ties": _ties,
    "dare_linear": _dare_linear,
    "dare_ties": _dare_ties,
}
"""Element-wise merges by name, each called as ``f(tensors, weights, density, sign_method, generator)``."""
