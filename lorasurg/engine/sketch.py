"""Randomized truncated SVD of an operator known only by its products ``M @ X`` and ``M.T @ Y``.

For matrices too large to hold (their products are sums over row blocks read from disk) or held but costly to
pass over: every product is one pass over ``M``, so the algorithm is counted in passes. See :func:`operator_svd`;
:mod:`lorasurg.engine.svd` has the dense methods.

Batches. A stack of ``E`` matrices of one shape (the experts of one projection in a mixture-of-experts layer) is
factored by the same algorithm at once: ``batch=E``, products ``(E, m, n) @ (E, n, c)``, and every QR and small
SVD batched (``torch.linalg`` factors the leading dimension as a batch). Matrix ``e`` of the result is what the
unbatched call gives for ``M[e]`` with the test matrix ``Omega[e]`` (to rounding), at the cost of a few calls
instead of ``E`` times as many: the many small factorizations of an MoE model's experts cost about what one
matrix of the same bytes costs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .svd import TruncatedSvd
from .threads import one_thread

__all__ = ["sketch_matrix", "operator_svd"]


def sketch_matrix(shape: tuple[int, int], rank: int, oversample: int, generator: Optional[torch.Generator],
                  device: Optional[torch.device] = None, batch: Optional[int] = None) -> Tensor:
    """The Gaussian test matrix ``Omega: (n, l)`` of :func:`operator_svd` for ``M: (m, n)``, with
    ``l = min(rank + oversample, m, n)``, drawn on ``generator.device`` (CPU without one) and moved to ``device``;
    ``(batch, n, l)`` for a batch of matrices (``Omega[e]`` is matrix ``e``'s)."""
    q = min(rank + oversample, *shape)
    size = (shape[1], q) if batch is None else (batch, shape[1], q)
    omega = torch.randn(size, generator=generator, device=generator.device if generator else None)
    return omega.to(device) if device is not None else omega


def operator_svd(
    matmul: Callable[[Tensor], Tensor],
    rmatmul: Callable[[Tensor], Tensor],
    shape: tuple[int, int],
    rank: int,
    *,
    oversample: int,
    passes: int = 4,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
    sketch: Optional[Tensor] = None,
    batch: Optional[int] = None,
) -> TruncatedSvd:
    """Randomized truncated SVD of an operator ``M: (m, n)`` known only by its products ``M @ X`` and ``M.T @ Y``.

    For a matrix too large to hold (its products are sums over row blocks read from disk), or one held but costly
    to pass over. Randomized subspace iteration (Halko, Martinsson & Tropp 2011, Algorithm 4.4) counted in passes
    over ``M``, one product each, with ``l = min(rank + oversample, m, n)`` columns and a QR after each product,
    the basis alternating between the column space and the row space; the last pass projects ``M`` on the ``k``
    leading Ritz vectors of the one before (``k = min(rank, m, n)`` columns, not ``l``)::

        pass 1:              Y = M @ Omega
        passes 2 .. p-1:     Z = M.T @ qr(Y), then Y = M @ qr(Z), alternately (the last product is P)
        Ritz vectors:        W = the k leading left singular vectors of P (with 2 passes: W = qr(Y), l columns)
        pass p:              after a Y: Bt = M.T @ W  (n, k); Bt.T = Ub diag(S) Vh;  U = W @ Ub
                             after a Z: C = M @ W     (m, k); C = U diag(S) Wh;     Vh = Wh @ W.T

    So ``U diag(S) Vh`` is an orthogonal projection of ``M`` of rank ``k`` (``W W.T M``, resp. ``M W W.T``) and its
    error is ``||M||_F^2 - sum(S^2)`` with no further pass. ``passes = 4`` is subspace iteration with one power
    iteration, finished on the Ritz vectors (the last pass costs ``k`` columns instead of ``l``).

    Args:
        matmul: ``X: (n, c) -> M @ X: (m, c)``; rmatmul: ``Y: (m, c) -> M.T @ Y: (n, c)``.
        shape: ``(m, n)``; rank: the triplets wanted.
        oversample: extra columns; passes: products with ``M``, at least 2.
        generator, device: draw ``Omega`` with :func:`sketch_matrix`.
        sketch: ``M @ Omega`` when the caller computed it already (e.g. in the pass that first read ``M``), with
            ``Omega = sketch_matrix(shape, rank, oversample, generator, device, batch)``; saves a pass.
        batch: ``E`` for a stack of matrices ``M: (E, m, n)`` (module docstring): ``matmul`` takes ``(E, n, c)``
            to ``(E, m, c)``, ``rmatmul`` ``(E, m, c)`` to ``(E, n, c)``, and every result gains the leading ``E``.

    Returns:
        :class:`TruncatedSvd` ``(U: (m, k), S: (k,), Vh: (k, n))``, float32 (``(E, m, k)``, ``(E, k)``,
        ``(E, k, n)`` with ``batch``).
    """
    if passes < 2:
        raise ValueError(f"operator_svd needs at least 2 passes, got {passes}")
    product = matmul(sketch_matrix(shape, rank, oversample, generator, device, batch)) if sketch is None else sketch
    left = True  # product = M @ (something): its columns are in M's column space
    for _ in range(passes - 2):
        basis = _orth(product)  # ([E,] m, l) or ([E,] n, l)
        product = rmatmul(basis) if left else matmul(basis)  # (n, m) @ (m, l) or (m, n) @ (n, l), per matrix
        left = not left
    k = min(rank, *shape)
    if passes == 2:  # Omega is not orthonormal, so M @ Omega has no Ritz vectors: project on its whole range
        ritz = _orth(product)  # ([E,] m, l)
    else:
        Qp, Ua, _, _ = _thin_svd(product)
        ritz = Qp @ Ua[..., :k]  # (m or n, l) @ (l, k): the k leading left singular vectors of the last product
        del Qp
    del product
    if left:
        Qb, Ub, S, Wb = _thin_svd(rmatmul(ritz))  # M.T W: (n, k) = Qb Ub diag(S) Wb.T
        U = ritz @ Wb  # W W.T M = (W Wb) diag(S) (Qb Ub).T: (m, k) @ (k, k)
        Vh = (Qb @ Ub).mT  # ((n, k) @ (k, k)).T -> (k, n)
    else:
        Qc, Uc, S, Wc = _thin_svd(matmul(ritz))  # M W: (m, k) = Qc Uc diag(S) Wc.T
        U = Qc @ Uc  # (m, k) @ (k, k)
        Vh = (ritz @ Wc).mT  # M W W.T = (Qc Uc) diag(S) (W Wc).T: ((n, k) @ (k, k)).T -> (k, n)
    return TruncatedSvd(U[..., :k].contiguous(), S[..., :k].contiguous(), Vh[..., :k, :].contiguous())


def _thin_svd(X: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SVD of a tall ``X: (p, l)`` as ``X = Q @ Ua @ diag(S) @ Wa.T`` through its QR: ``X = Q R`` and
    ``R = Ua diag(S) Wa.T`` (``(l, l)``); several times faster than LAPACK's SVD of the tall matrix itself. A batch
    ``(E, p, l)`` is factored matrix by matrix in the same calls."""
    with one_thread():
        Q, R = torch.linalg.qr(X)  # (p, l), (l, l)
        Ua, S, Wh = torch.linalg.svd(R)  # (l, l), (l,), (l, l)
    return Q, Ua, S, Wh.mT


def _orth(X: Tensor) -> Tensor:
    """An orthonormal basis of the columns of ``X``: the Q of its reduced QR."""
    with one_thread():
        return torch.linalg.qr(X).Q
