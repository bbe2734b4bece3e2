"""Fit LoRA factors to one weight delta: truncated SVD, a rank policy, and the split into ``A`` and ``B``.

For a delta ``dW: (out, in)`` with truncated SVD ``U_r diag(S_r) Vh_r`` and the module's scale ``s``:

    A = sqrt(S_r / s) * Vh_r      (r, in)
    B = U_r * sqrt(S_r / s)       (out, r)
    s * B @ A = U_r diag(S_r) Vh_r

(the singular values are split evenly between the two factors, as PEFT's PiSSA does). By Eckart-Young this is
the best rank-r approximation in Frobenius norm when the SVD is exact; the randomized SVD is within 1% of it.
The error ``||dW - s B A||_F`` is measured on the delta itself, not estimated from singular values.

Two entry points: :func:`fit_delta` for a delta held in memory, :func:`fit_operator` for one streamed from
disk (:mod:`lorasurg.surgery.extract.stream`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ...engine.ranks import RankPolicy
from ...engine.svd import decompose, split_factors
from .stream import DeltaOperator, operator_svd

__all__ = ["NITER", "oversample", "Fit", "fit_delta", "fit_operator"]

#: Power iterations of the streamed randomized SVD. Each costs two passes over the tensor on disk while extra
#: columns are nearly free (the passes are bound by reading), so it uses one iteration and oversamples by
#: ``r + 32`` (:func:`oversample`). Measured error / optimal, worst case over flat and power-law spectra
#: (decay 0.5 and 1) on 512x256 and 2048x2048 at r = 16 and 64: 1.0055 (niter=1 with a fixed oversample of 32:
#: 1.026; niter=2, oversample 10: 1.015); on the benchmark's vocab x 2048 deltas at r = 16: 1.0025.
NITER = 1


def oversample(rank: int) -> int:
    """Columns beyond ``rank`` in the streamed SVD's test matrix: ``rank + 32``."""
    return rank + 32


@dataclass
class Fit:
    """LoRA factors of one delta and how well they fit.

    Attributes:
        A: ``(rank, in)`` float32, on the delta's device (None when the rank is 0).
        B: ``(out, rank)`` float32 (None when the rank is 0).
        rank: chosen rank (0: the policy keeps nothing).
        max_rank: the largest rank allowed here, ``min(r, out, in)``.
        clamped: the requested r exceeded ``min(out, in)``.
        energy: ``||dW||_F**2``.
        energy_kept: ``sum(S[:rank]**2) / ||dW||_F**2``.
        rel_error: ``||dW - scale * B @ A||_F / ||dW||_F``.
    """

    A: Optional[Tensor]
    B: Optional[Tensor]
    rank: int
    max_rank: int
    clamped: bool
    energy: float
    energy_kept: float
    rel_error: float


def fit_delta(
    delta: Tensor,
    *,
    r: int,
    scale: float,
    policy: Optional[RankPolicy] = None,
    method: str = "randomized",
    generator: Optional[torch.Generator] = None,
) -> Fit:
    """Fit ``scale * B @ A`` to ``delta`` (a float32 ``(out, in)`` matrix, overwritten with the residual).

    Args:
        delta: the weight change in matrix view; used as scratch space (it holds the residual afterwards).
        r: the largest rank to keep (clamped to ``min(out, in)``).
        scale: the module's LoRA scale ``alpha / r``; the factors are divided by ``sqrt(scale)`` each.
        policy: a rank policy (:func:`lorasurg.engine.ranks.parse_rank_policy`); None keeps ``min(r, out, in)``.
        method: ``randomized`` or ``exact`` (:func:`lorasurg.engine.svd.truncated_svd`).
        generator: seeds the randomized SVD.
    """
    d = decompose(delta, min(r, *delta.shape), policy or "fixed", method=method, generator=generator)

    def residual(B: Tensor, A: Tensor) -> float:
        delta.addmm_(B, A, alpha=-scale)  # dW - scale * (out, rank) @ (rank, in), in place
        return float(torch.linalg.vector_norm(delta))

    return _finish(d.U, d.S, d.Vh, residual, tuple(delta.shape), r=r, scale=scale, policy=None, energy=d.total_sq)


def fit_operator(
    op: DeltaOperator,
    *,
    r: int,
    scale: float,
    energy: float,
    sketch: Tensor,
    policy: Optional[RankPolicy] = None,
    generator: Optional[torch.Generator] = None,
) -> Fit:
    """:func:`fit_delta` for a delta streamed from disk (randomized SVD only).

    Args:
        energy: ``||dW||_F**2``; sketch: ``M @ sketch_matrix(op.shape, k, oversample(k), generator)`` with
            ``k = min(r, *op.shape)``,
            both from the pass that found the delta non-zero (:meth:`DeltaOperator.stats`).
    """
    max_rank = min(r, *op.shape)
    U, S, Vh = operator_svd(op.matmul, op.rmatmul, op.shape, max_rank, generator=generator, device=op.device,
                            oversample=oversample(max_rank), niter=NITER, sketch=sketch)

    def residual(B: Tensor, A: Tensor) -> float:
        rank = A.shape[0]
        left = energy - float((S[:rank].double() ** 2).sum())  # ||M - P M||^2 = ||M||^2 - ||P M||^2
        if left >= 1e-4 * energy:
            return math.sqrt(left)
        return op.residual_norm(B, A, scale)  # too few digits left in the subtraction: measure it

    return _finish(U, S, Vh, residual, op.shape, r=r, scale=scale, policy=policy, energy=energy)


def _finish(U: Tensor, S: Tensor, Vh: Tensor, residual: Callable[[Tensor, Tensor], float], shape: tuple[int, int],
            *, r: int, scale: float, policy: Optional[RankPolicy], energy: float) -> Fit:
    """Choose the rank, split the factors, measure the error."""
    cap = min(shape)
    max_rank = min(r, cap)
    rank = min(max_rank, S.shape[0]) if policy is None else int(policy.choose(S, max_rank, total_sq=energy))
    if rank <= 0 or energy == 0.0:
        return Fit(None, None, 0, max_rank, r > cap, energy, 0.0, 1.0 if energy else 0.0)
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    A, B = split_factors(U, S, Vh, scale)  # (rank, in), (out, rank)
    kept = float((S.double() ** 2).sum())
    error = residual(B, A)
    return Fit(A, B, rank, max_rank, r > cap, energy, min(kept / energy, 1.0), error / math.sqrt(energy))
