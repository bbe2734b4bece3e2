"""Fit LoRA factors to one weight delta: truncated SVD, a rank policy, and the split into ``A`` and ``B``.

For a delta ``dW: (out, in)`` with truncated SVD ``U_r diag(S_r) Vh_r`` and the module's scale ``s``:

    A = sqrt(S_r / s) * Vh_r      (r, in)
    B = U_r * sqrt(S_r / s)       (out, r)
    s * B @ A = U_r diag(S_r) Vh_r

(the singular values are split evenly between the two factors, as PEFT's PiSSA does). By Eckart-Young this is
the best rank-r approximation in Frobenius norm when the SVD is exact; the randomized SVD is within 1% of it.

The randomized SVD (:func:`lorasurg.engine.sketch.operator_svd`) is the same for a delta held in memory and one
streamed from disk: :data:`PASSES` passes over the delta, :func:`oversample` extra columns, and the first
product ``M @ Omega`` taken in the pass that read the delta (:meth:`.stream.DeltaOperator.stats`). The error
``||dW - s B A||_F`` comes from that pass's ``||dW||_F^2`` without another pass: ``U_r diag(S_r) Vh_r = P dW``
with ``P`` the orthogonal projection onto ``U_r``, so ``||dW - P dW||_F^2 = ||dW||_F^2 - sum(S_r^2)``; only
when that is below :data:`MEASURE_BELOW` of ``||dW||_F^2`` (where the subtraction loses digits) is the residual
measured.

Entry points: :func:`fit_operator` for a delta read by a :class:`.stream.DeltaOperator` (held or streamed),
:func:`fit_delta` for a float32 matrix in memory (and for ``--svd exact`` or a policy needing the whole spectrum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ...engine.ranks import RankPolicy
from ...engine.sketch import operator_svd
from ...engine.svd import decompose, frobenius_sq, split_factors
from .stream import DeltaOperator

__all__ = ["PASSES", "MEASURE_BELOW", "oversample", "sketch_size", "Fit", "fit_delta", "fit_operator"]

#: Passes of the randomized SVD over the delta (:func:`lorasurg.engine.sketch.operator_svd`; the first is the read
#: itself, the last one has ``k`` columns instead of ``l``). Error / optimal (Eckart-Young), worst of 3 seeds, on
#: power-law spectra ``i**-a`` with a = 0.5 and 1 (a = 0.5 is the hard case; a flat spectrum is fitted exactly
#: by any subspace) at 160x96, 512x256, 2048x2048 and 5632x2048, by passes and columns ``l``:
#:
#: ====================================  ========  ========  ========
#: passes, columns                       r = 4     r = 16    r = 64
#: ====================================  ========  ========  ========
#: 2 (no power iteration), l = 4r + 64   1.016     1.036     1.049
#: 3 (half an iteration), l = 2r + 32    1.0015    1.009     1.019
#: 4, l = r + 16                         1.0018    1.015     1.041
#: 4, l = r + max(16, r / 2) (chosen)    1.0011    1.0043    1.0063
#: ====================================  ========  ========  ========
#:
#: Fewer passes need several times the columns (a pass costs about its column count in flops), so 4 passes with
#: :func:`oversample`; at r = 16 that is ``3 * 48 + 16 = 160`` columns-passes, against 6+ passes of 26 columns
#: for the adaptive in-memory method this replaces.
PASSES = 4
#: Below this share of ``||dW||_F^2`` left, the error is measured by a pass instead of subtracted.
MEASURE_BELOW = 1e-2


def oversample(rank: int) -> int:
    """Columns beyond ``rank`` in the randomized SVD's test matrix: ``rank + max(16, rank // 2)``."""
    return rank + max(16, rank // 2)


def sketch_size(rank: int, shape: tuple[int, int]) -> int:
    """The randomized SVD's column count ``l = min(k + oversample(k), out, in)`` for ``k = min(rank, out, in)``."""
    k = min(rank, *shape)
    return min(k + oversample(k), *shape)


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
    energy: Optional[float] = None,
) -> Fit:
    """Fit ``scale * B @ A`` to ``delta`` (a float32 ``(out, in)`` matrix, possibly overwritten with the residual).

    Args:
        delta: the weight change in matrix view (a view is fine); used as scratch space.
        r: the largest rank to keep (clamped to ``min(out, in)``).
        scale: the module's LoRA scale ``alpha / r``; the factors are divided by ``sqrt(scale)`` each.
        policy: a rank policy (:func:`lorasurg.engine.ranks.parse_rank_policy`); None keeps ``min(r, out, in)``.
        method: ``randomized`` (the scheme in the module docstring) or ``exact`` (``torch.linalg.svd``).
        generator: seeds the randomized SVD.
        energy: ``||delta||_F**2`` when the caller has it (saves a pass).
    """
    energy = frobenius_sq(delta) if energy is None else energy

    def measured(B: Tensor, A: Tensor) -> float:
        delta.addmm_(B, A, alpha=-scale)  # dW - scale * (out, rank) @ (rank, in), in place
        return float(torch.linalg.vector_norm(delta))

    max_rank = min(r, *delta.shape)
    if method == "randomized" and not (policy is not None and policy.needs_full_spectrum):
        U, S, Vh = operator_svd(
            lambda X: delta @ X, lambda Y: delta.mT @ Y, tuple(delta.shape), max_rank,  # (out, in) @ (in, l), ...
            oversample=oversample(max_rank), passes=PASSES, generator=generator, device=delta.device)
        return _finish(U, S, Vh, _from_energy(S, energy, measured), tuple(delta.shape), r=r, scale=scale,
                       policy=policy, energy=energy)
    d = decompose(delta, max_rank, policy or "fixed", method=method, generator=generator, total_sq=energy)
    return _finish(d.U, d.S, d.Vh, measured, tuple(delta.shape), r=r, scale=scale, policy=None, energy=energy)


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
    """:func:`fit_delta` (randomized) for a delta read by ``op``, held in memory or streamed from disk.

    Args:
        energy: ``||dW||_F**2``; sketch: ``M @ sketch_matrix(op.shape, k, oversample(k), generator)`` with
            ``k = min(r, *op.shape)``, both from the pass that read the delta (:meth:`DeltaOperator.stats`).
    """
    max_rank = min(r, *op.shape)
    U, S, Vh = operator_svd(op.matmul, op.rmatmul, op.shape, max_rank, generator=generator, device=op.device,
                            oversample=oversample(max_rank), passes=PASSES, sketch=sketch)
    measured = lambda B, A: op.residual_norm(B, A, scale)  # noqa: E731
    return _finish(U, S, Vh, _from_energy(S, energy, measured), op.shape, r=r, scale=scale, policy=policy,
                   energy=energy)


def _from_energy(S: Tensor, energy: float, measured: Callable[[Tensor, Tensor], float]):
    """The residual ``||dW - scale B A||_F`` of a rank-``rank`` fit from ``||dW||^2 - sum(S[:rank]^2)``, measured
    by ``measured`` when too little is left for the subtraction to keep its digits."""

    def residual(B: Tensor, A: Tensor) -> float:
        left = energy - float((S[: A.shape[0]].double() ** 2).sum())
        if left >= MEASURE_BELOW * energy:
            return math.sqrt(left)
        return measured(B, A)

    return residual


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
