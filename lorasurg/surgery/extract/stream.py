"""Fit LoRA to a delta too large to hold in memory as float32: row blocks read from disk, several passes.

A large embedding (vocab 32000 x 2048) is 131 MB per bf16 checkpoint but its float32 delta is 262 MB; with
both inputs that is 0.5 GB for one tensor. Here the delta ``M = matrix view of (W_tuned - W_base)`` is never
formed: it is an operator whose products ``M @ X`` and ``M.T @ Y`` are sums over row blocks of the two stored
tensors, each block read straight from the safetensors file (:meth:`lorasurg.io.checkpoint.Checkpoint.row_reader`:
no mmap, no whole-tensor read).
Memory is one block pair plus ``(out + in) * (r + oversample)`` floats, whatever the tensor's size.

The SVD is the randomized range finder with power iterations (Halko, Martinsson, Tropp 2011, Alg. 4.4),
re-orthonormalised after each product:

    Y = M @ Omega;  Q = qr(Y);  repeat niter times: Q = qr(M @ qr(M.T @ Q));
    B = Q.T @ M = (M.T @ Q).T;  B = Ub diag(S) Vh;  U = Q @ Ub

(``1 + 2 niter + 1`` passes; the first also finds whether the delta is zero or not finite and its norm). Since
``U_r S_r Vh_r = P M`` with ``P`` the orthogonal projection onto ``U_r``, the error is
``||M - P M||_F**2 = ||M||_F**2 - ||S_r||_F**2`` with no further pass; only when that is below 1% of ``||M||_F``
(where the subtraction loses digits) is the residual measured by one more pass.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from ...io.checkpoint import Checkpoint, RowReader

__all__ = ["STREAM_ABOVE", "DeltaOperator", "max_abs", "sketch_matrix", "open_delta", "operator_svd"]

#: Tensors with more elements than this are streamed (64 MB as float32): embeddings and output heads of real
#: models; a transformer block's weights are fitted in memory (one pass over the data instead of several).
STREAM_ABOVE = 2**24
#: Elements per row block (8 MB as float32).
_BLOCK_ELEMENTS = 2**21


class DeltaOperator:
    """The matrix view ``M: (out, in)`` of ``W_tuned - W_base``, applied one row block at a time.

    ``transposed``: the stored rows are columns of ``M`` (embedding ``(num, dim)`` -> ``M = W.T``; GPT-2
    ``Conv1D`` ``(in, out)``); otherwise they are rows of ``M`` (linear, conv flattened to ``(out, in * k)``).
    """

    def __init__(self, base: RowReader, tuned: RowReader, transposed: bool, device: torch.device) -> None:
        self.base, self.tuned, self.transposed, self.device = base, tuned, transposed, device
        rows, cols = base.shape[0], math.prod(base.shape[1:])
        self.stored_shape = (rows, cols)
        self.shape = (cols, rows) if transposed else (rows, cols)
        self.block = max(1, _BLOCK_ELEMENTS // max(cols, 1))

    def blocks(self) -> Iterator[tuple[int, int, Tensor]]:
        """``(start, stop, float32 delta rows [start, stop) in the stored layout)``."""
        rows = self.stored_shape[0]
        for start in range(0, rows, self.block):
            stop = min(start + self.block, rows)
            d = self.tuned.rows(start, stop).to(self.device, torch.float32)
            d.sub_(self.base.rows(start, stop).to(self.device))
            yield start, stop, d
            del d  # before the next block is read, so only one block is held

    def stats(self, X: Optional[Tensor] = None) -> tuple[float, float, Optional[Tensor]]:
        """``(max |delta|, ||delta||_F**2, M @ X or None)`` in one pass; the first is NaN/inf when the delta is
        not finite (the pass then stops early and the product is None)."""
        peak, energy = 0.0, 0.0
        product = None
        if X is not None:
            product = torch.zeros(self.shape[0], X.shape[1], device=self.device)
        for a, b, d in self.blocks():
            block_peak = max_abs(d)
            if not math.isfinite(block_peak):
                return block_peak, energy, None
            peak = max(peak, block_peak)
            energy += float(torch.linalg.vector_norm(d)) ** 2
            if product is not None:
                self._accumulate(product, a, b, d, X)
        return peak, energy, product

    def _accumulate(self, out: Tensor, a: int, b: int, d: Tensor, X: Tensor) -> None:
        """Add one block's share of ``M @ X`` to ``out``."""
        if self.transposed:
            out.addmm_(d.T, X[a:b])  # M = W.T: (out, rows) @ (rows, q)
        else:
            torch.mm(d, X, out=out[a:b])  # (rows, in) @ (in, q)

    def matmul(self, X: Tensor) -> Tensor:
        """``M @ X`` for ``X: (in, q)``, returns ``(out, q)``."""
        out = torch.zeros(self.shape[0], X.shape[1], device=self.device)
        for a, b, d in self.blocks():
            self._accumulate(out, a, b, d, X)
        return out

    def rmatmul(self, Y: Tensor) -> Tensor:
        """``M.T @ Y`` for ``Y: (out, q)``, returns ``(in, q)``."""
        # Outputs are allocated once up front: small results allocated between the large block buffers would
        # pin the heap and keep freed blocks from being reused (glibc), growing the resident size per pass.
        if self.transposed:
            out = torch.empty(self.shape[1], Y.shape[1], device=self.device)
            for a, b, d in self.blocks():
                torch.mm(d, Y, out=out[a:b])  # M.T = W: (rows, out) @ (out, q)
            return out
        out = torch.zeros(self.shape[1], Y.shape[1], device=self.device)
        for a, b, d in self.blocks():
            out.addmm_(d.T, Y[a:b])  # (in, rows) @ (rows, q)
        return out

    def residual_norm(self, B: Tensor, A: Tensor, scale: float) -> float:
        """``||M - scale * B @ A||_F`` for ``B: (out, r)``, ``A: (r, in)``."""
        total = 0.0
        for a, b, d in self.blocks():
            if self.transposed:
                d.addmm_(A[:, a:b].T, B.T, alpha=-scale)  # rows a:b of M.T: (rows, r) @ (r, out)
            else:
                d.addmm_(B[a:b], A, alpha=-scale)  # rows a:b of M: (rows, r) @ (r, in)
            total += float(torch.linalg.vector_norm(d)) ** 2
        return math.sqrt(total)

    def close(self) -> None:
        self.base.close()
        self.tuned.close()


def max_abs(t: Tensor) -> float:
    """``max |t|`` (NaN if ``t`` holds one); ``aminmax`` is several times faster than an inf-norm on CPU."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t)
    lo, hi = float(lo), float(hi)
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)


def sketch_matrix(shape: tuple[int, int], rank: int, oversample: int, generator: Optional[torch.Generator],
                device: Optional[torch.device]) -> Tensor:
    """The Gaussian ``Omega: (in, rank + oversample)`` (capped at ``min(out, in)`` columns) of :func:`operator_svd`."""
    q = min(rank + oversample, *shape)
    omega = torch.randn(shape[1], q, generator=generator, device=generator.device if generator else device)
    return omega.to(device)


def open_delta(base: Checkpoint, tuned: Checkpoint, name: str, transposed: bool,
               device: torch.device) -> Optional[DeltaOperator]:
    """A :class:`DeltaOperator` for tensor ``name``, or None when either side is not a safetensors file."""
    readers = [ckpt.row_reader(name) for ckpt in (base, tuned)]
    if any(reader is None for reader in readers):
        for reader in readers:
            if reader is not None:
                reader.close()
        return None
    return DeltaOperator(readers[0], readers[1], transposed, device)


def operator_svd(
    matmul: Callable[[Tensor], Tensor],
    rmatmul: Callable[[Tensor], Tensor],
    shape: tuple[int, int],
    rank: int,
    *,
    oversample: int = 10,
    niter: int = 2,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
    sketch: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized truncated SVD of an operator ``M: (out, in)`` given ``M @ X`` and ``M.T @ Y``.

    ``sketch``: ``M @ Omega`` already computed with ``Omega = sketch_matrix(shape, rank, oversample, ...)`` (saves
    a pass). Returns ``U: (out, k)``, ``S: (k,)``, ``Vh: (k, in)`` with ``k = rank``, float32.
    """
    if sketch is None:
        sketch = matmul(sketch_matrix(shape, rank, oversample, generator, device))  # (out, q)
    Q, _ = torch.linalg.qr(sketch)  # (out, q)
    for _ in range(niter):
        Z, _ = torch.linalg.qr(rmatmul(Q))  # (in, q)
        Q, _ = torch.linalg.qr(matmul(Z))  # (out, q)
    Bt = rmatmul(Q)  # (in, q) = (Q.T @ M).T
    Ub, S, Vh = torch.linalg.svd(Bt.T, full_matrices=False)  # (q, q), (q,), (q, in)
    U = Q @ Ub  # (out, q) @ (q, q)
    return U[:, :rank], S[:rank], Vh[:rank]
