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
adapters (``B A - B0 A0``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import ShapeMismatchError
from .factors import compute_dtype
from .svd import TruncatedSvd

__all__ = ["lowrank_svd", "stack_terms"]


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
    Qb, Rb = torch.linalg.qr(Bs)  # (out, p), (p, R), p = min(out, R)
    Qa, Ra = torch.linalg.qr(As.mT)  # (in, q), (q, R), q = min(in, R)
    core = Rb @ Ra.mT  # (p, R) @ (R, q) -> (p, q)
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)  # (p, t), (t,), (t, q), t = min(p, q)
    k = S.shape[0] if rank is None else min(rank, S.shape[0])
    U = Qb @ Uc[:, :k]  # (out, p) @ (p, k) -> (out, k)
    Vh = Vch[:k] @ Qa.mT  # (k, q) @ (q, in) -> (k, in)
    return TruncatedSvd(U, S[:k].contiguous(), Vh)
