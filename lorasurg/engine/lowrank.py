"""Exact SVD of a sum of scaled low-rank products, without forming the dense matrix.

For terms ``(s_i, B_i: (out, r_i), A_i: (r_i, in))`` the sum ``M = sum_i s_i B_i @ A_i`` is one product of stacked
factors, ``M = Bs @ As`` with

    Bs = [s_1 B_1 | s_2 B_2 | ...]   (out, R)        As = [A_1; A_2; ...]   (R, in),     R = sum_i r_i.

With the reduced QRs ``Bs = Qb Rb`` and ``As.T = Qa Ra``:

    M = Qb (Rb @ Ra.T) Qa.T,   and the small core  C = Rb @ Ra.T = Uc diag(S) Vch

gives the SVD ``M = (Qb Uc) diag(S) (Vch Qa.T)``: exact (up to rounding), in ``O((out + in) R^2 + R^3)`` time and
``O((out + in) R)`` memory instead of ``O(out * in * min(out, in))`` and ``O(out * in)``. The rank of M is at most
``min(R, out, in)``, so that many triplets come back.

Used to re-rank a LoRA (``B @ A``), to merge adapters by the exact sum of their deltas, and to convert PiSSA/OLoRA
adapters (``B A - B0 A0``): :func:`truncate_terms` (a sum of terms) and :func:`truncate_factors` (one LoRA) return the
best rank-k LoRA factors of the sum (Eckart-Young: the truncated SVD is optimal in the Frobenius norm), at a fixed
rank or at the rank a policy (:mod:`lorasurg.engine.ranks`) chooses from the exact spectrum, for any target scale.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..errors import ShapeMismatchError
from .factors import compute_dtype
from .ranks import RankPolicy
from .svd import TruncatedSvd, split_factors
from .threads import threads_for

__all__ = [
    "lowrank_svd", "stack_terms", "lowrank_norm_sq", "LowRankFit", "fit_from_svd", "truncate_terms", "truncate_factors",
]


def stack_terms(terms: Sequence[tuple[float, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The stacked factors ``Bs: (out, R)``, ``As: (R, in)`` with ``Bs @ As = sum_i s_i B_i @ A_i``.

    Each term is ``(scale, B, A)``; ``B`` may be stored ``(out, r, 1, ...)`` and ``A`` ``(r, in, *kernel)``
    (conv layout): they are read as matrices ``(out, r)`` and ``(r, in * prod(kernel))``. Computed in float32
    (float64 if any factor is float64).

    Raises:
        ValueError: no terms.
        ShapeMismatchError: a term whose A and B ranks differ, or whose (out, in) differs from the first term's;
            every such term is listed.
    """
    if not terms:
        raise ValueError("stack_terms needs at least one (scale, B, A) term")
    work = compute_dtype(*(t for _, B, A in terms for t in (B, A)))
    Bs, As, problems = [], [], []
    first = None
    for index, (scale, B, A) in enumerate(terms):
        B_mat = B.reshape(B.shape[0], -1)  # (out, r, 1, ...) -> (out, r)
        A_mat = A.reshape(A.shape[0], -1)  # (r, in, *k) -> (r, in*prod(k))
        shape = (B_mat.shape[0], A_mat.shape[1])
        first = shape if first is None else first
        if B_mat.shape[1] != A_mat.shape[0]:
            problems.append(f"term {index}: B {tuple(B.shape)} has rank {B_mat.shape[1]} but A {tuple(A.shape)} "
                            f"has rank {A_mat.shape[0]}")
        elif shape != first:
            problems.append(f"term {index}: delta shape {shape} differs from term 0's {first}")
        Bs.append(B_mat.to(work) * scale)
        As.append(A_mat.to(work))
    if problems:
        raise ShapeMismatchError("low-rank terms do not add up: " + "; ".join(problems))
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)  # (out, R), (R, in)


def lowrank_svd(terms: Sequence[tuple[float, Tensor, Tensor]], rank: Optional[int] = None) -> TruncatedSvd:
    """SVD of ``sum_i s_i B_i @ A_i`` through QR of the stacked factors (see the module docstring).

    Args:
        terms: ``(scale, B, A)`` with ``B: (out, r_i)``, ``A: (r_i, in)`` (conv layouts accepted, as in
            :func:`stack_terms`). A single term ``(scale, B, A)`` gives the SVD of a LoRA's delta.
        rank: keep at most this many triplets; default all ``min(R, out, in)``.

    Returns:
        :class:`~lorasurg.engine.svd.TruncatedSvd` ``(U: (out, k), S: (k,), Vh: (k, in))``, S descending, in the
        compute dtype on the factors' device.

    Raises:
        ValueError: no terms, or ``rank < 1``.
        ShapeMismatchError: as :func:`stack_terms`.
    """
    if rank is not None and rank < 1:
        raise ValueError(f"lowrank_svd needs rank >= 1, got {rank}")
    Bs, As = stack_terms(terms)  # (out, R), (R, in)
    with threads_for((Bs.shape[0] + As.shape[1]) * Bs.shape[1] ** 2):
        Qb, Rb = torch.linalg.qr(Bs)  # (out, p), (p, R), p = min(out, R)
        Qa, Ra = torch.linalg.qr(As.mT)  # (in, q), (q, R), q = min(in, R)
        core = Rb @ Ra.mT  # (p, R) @ (R, q) -> (p, q)
        Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)  # (p, t), (t,), (t, q), t = min(p, q)
        k = S.shape[0] if rank is None else min(rank, S.shape[0])
        U = Qb @ Uc[:, :k]  # (out, p) @ (p, k) -> (out, k)
        Vh = Vch[:k] @ Qa.mT  # (k, q) @ (q, in) -> (k, in)
    return TruncatedSvd(U, S[:k].contiguous(), Vh)


class LowRankFit(NamedTuple):
    """LoRA factors of the best rank-``rank`` approximation of a matrix ``M``, with ``scale * B @ A ~= M``.

    Attributes:
        A: ``(k, in)`` and B: ``(out, k)``, matrix views in the compute dtype; ``k >= rank``, the last ``k - rank``
            rows of A and columns of B are zero (padding asked for by the caller, lossless).
        S: every singular value of ``M`` that was computed, descending (the whole spectrum for
            :func:`truncate_terms`).
        rank: the number of singular triplets kept.
        total_sq: ``||M||_F^2``.
    """

    A: Tensor
    B: Tensor
    S: Tensor
    rank: int
    total_sq: float

    @property
    def kept_sq(self) -> float:
        """``sum_{i <= rank} S_i^2``: the energy of the approximation."""
        return float(self.S[: self.rank].double().pow(2).sum())

    @property
    def energy_kept(self) -> float:
        """``kept_sq / total_sq`` in [0, 1]; 1.0 for a zero matrix."""
        return 1.0 if self.total_sq <= 0 else min(self.kept_sq / self.total_sq, 1.0)

    @property
    def relative_error(self) -> float:
        """``||M - scale B A||_F / ||M||_F = sqrt(1 - energy_kept)`` (Eckart-Young); 0.0 for a zero matrix."""
        return math.sqrt(max(1.0 - self.energy_kept, 0.0)) if self.total_sq > 0 else 0.0


def fit_from_svd(
    svd: TruncatedSvd,
    total_sq: float,
    rank: Optional[int] = None,
    *,
    policy: Optional[RankPolicy] = None,
    scale: float = 1.0,
    pad: bool = True,
) -> LowRankFit:
    """LoRA factors from the SVD ``U diag(S) Vh`` of a matrix ``M: (out, in)`` with ``||M||_F^2 = total_sq``.

    The rank kept is ``min(rank, len(S))`` (default ``len(S)``), or what ``policy`` chooses with ``rank`` as its cap
    (default cap ``min(out, in)``). The factors are the balanced split ``A = sqrt(S / scale) Vh``,
    ``B = U sqrt(S / scale)`` (:func:`lorasurg.engine.svd.split_factors`). With ``pad`` and no policy, A and B are
    zero-padded to ``min(rank, out, in)`` when the matrix has fewer singular values than that (a LoRA of rank 8
    asked for rank 16 stays exactly the same delta).

    Raises:
        ValueError: ``rank < 1`` or ``scale <= 0``.
    """
    U, S, Vh = svd
    out_f, in_f = U.shape[0], Vh.shape[1]
    if rank is not None and rank < 1:
        raise ValueError(f"a LoRA rank must be >= 1, got {rank}")
    cap = min(out_f, in_f) if rank is None else min(rank, out_f, in_f)
    k = min(cap, S.shape[0]) if policy is None else policy.choose(S, cap, total_sq=total_sq)
    A, B = split_factors(U[:, :k], S[:k], Vh[:k], scale)  # (k, in), (out, k)
    width = cap if pad and policy is None and rank is not None else k
    if width > k:
        A = torch.cat([A, A.new_zeros(width - k, in_f)], dim=0)  # (width, in)
        B = torch.cat([B, B.new_zeros(out_f, width - k)], dim=1)  # (out, width)
    return LowRankFit(A, B, S, k, float(total_sq))


def truncate_terms(
    terms: Sequence[tuple[float, Tensor, Tensor]],
    rank: Optional[int] = None,
    *,
    policy: Optional[RankPolicy] = None,
    scale: float = 1.0,
    pad: bool = True,
) -> LowRankFit:
    """The best rank-k LoRA of ``M = sum_i s_i B_i @ A_i``, exactly, without forming M.

    The whole spectrum of M comes from :func:`lowrank_svd` (``min(R, out, in)`` values, so ``||M||_F^2`` and every
    rank policy are exact); then :func:`fit_from_svd` keeps ``rank`` triplets (or the policy's choice, capped by
    ``rank``) and splits them for ``scale``.

    Args:
        terms: ``(s_i, B_i, A_i)``, as :func:`lowrank_svd` takes them (conv layouts read as matrices).
        rank: the rank to keep (the policy's cap); default every singular value (lossless).
        policy: a rank policy; None keeps ``min(rank, out, in)``.
        scale: the LoRA scale the returned factors are for: ``scale * B @ A`` approximates M.
        pad: zero-pad to ``min(rank, out, in)`` when M has a lower rank (fixed rank only).

    Returns:
        :class:`LowRankFit` with matrix-view factors ``A: (k, in)``, ``B: (out, k)``.

    Raises:
        ValueError, ShapeMismatchError: as :func:`lowrank_svd`; ``rank < 1``; ``scale <= 0``.
    """
    svd = lowrank_svd(terms)
    total = float(svd.S.double().pow(2).sum())
    return fit_from_svd(svd, total, rank, policy=policy, scale=scale, pad=pad)


def truncate_factors(
    A: Tensor,
    B: Tensor,
    scale: float,
    rank: Optional[int] = None,
    *,
    policy: Optional[RankPolicy] = None,
    out_scale: Optional[float] = None,
    pad: bool = True,
) -> LowRankFit:
    """Re-rank one LoRA: the best rank-k factors of ``scale * B @ A`` (:func:`truncate_terms` of one term).

    Args:
        A: ``(r, in[, *k])``; B: ``(out, r[, 1, ...])``; scale: the LoRA's scale.
        rank, policy, pad: as :func:`truncate_terms`; ``rank >= r`` keeps the delta exactly.
        out_scale: the scale of the new factors; default ``scale`` (the module keeps its scale).
    """
    return truncate_terms([(scale, B, A)], rank, policy=policy, scale=scale if out_scale is None else out_scale,
                          pad=pad)


def lowrank_norm_sq(terms: Sequence[tuple[float, Tensor, Tensor]]) -> float:
    """``||sum_i s_i B_i @ A_i||_F^2`` without forming the matrix, in float64.

    With the stacked factors ``Bs: (out, R)``, ``As: (R, in)`` (:func:`stack_terms`),
    ``||Bs @ As||_F^2 = trace(As^T Bs^T Bs As) = sum((Bs^T Bs) * (As As^T))``: two ``R x R`` Gram matrices. Float64
    keeps the difference of nearly equal sums accurate to ~1e-8 relative (float32 would give ~3e-4).
    """
    width = sum(B.shape[1] for _, B, _ in terms)
    with threads_for(sum(B.shape[0] + A[0].numel() for _, B, A in terms[:1]) * width**2):
        Bs, As = stack_terms([(s, B.double(), A.double()) for s, B, A in terms])  # (out, R), (R, in)
        gram_b = Bs.mT @ Bs  # (R, out) @ (out, R) -> (R, R)
        gram_a = As @ As.mT  # (R, in) @ (in, R) -> (R, R)
        return max(float((gram_b * gram_a).sum()), 0.0)
