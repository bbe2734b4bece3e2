"""The delta of one tensor pair, read from disk in row blocks: held in memory after one read, or streamed.

``M`` is the matrix view ``(out, in)`` of ``W_tuned - W_base``. Both tensors are read in row blocks straight from
their safetensors files (:meth:`lorasurg.io.checkpoint.Checkpoint.row_reader`) into buffers reused from block to
block and tensor to tensor (:class:`Workspace`), and each block's float32 delta is formed once, in place:
``d = float32(tuned rows); d -= float32(base rows)``. The first pass over the blocks (:meth:`DeltaOperator.stats`)
also finds, while the block is in cache, what the change check, the fit and the report need: ``max |delta|``
(zero: unchanged; NaN/inf: refused), ``||delta||_F^2`` and the randomized SVD's first product ``M @ Omega``.

Then, as the memory budget decided (:mod:`lorasurg.surgery.budget`, :func:`memory_needs`):

* **held**: the first pass wrote the blocks into one float32 matrix, and the later products ``M @ X``,
  ``M.T @ Y`` are single matrix multiplications on it. Memory: ``4 * out * in`` bytes plus the SVD's
  ``(out + in) * l`` arrays;
* **streamed**: every product is a sum over row blocks read again from disk, so memory is one block plus the
  SVD's arrays whatever the tensor's size (``1 + 2 * niter + 1`` passes, see :mod:`.fit`).

Either way the products are the same sums, so a held and a streamed fit agree to float32 rounding.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from ...engine.threads import one_thread
from ...io.checkpoint import Checkpoint, RowReader

__all__ = ["Workspace", "DeltaOperator", "Stats", "check_delta", "max_abs", "open_delta", "memory_needs", "block_rows"]

#: Elements per row block (4 MB as float32): large enough for efficient matrix products, small enough that a
#: block's raw rows and float32 delta stay in cache while they are converted, checked and multiplied.
_BLOCK_ELEMENTS = 2**20
#: float32 ``(out + in, l)`` arrays the randomized SVD holds at its peak (Omega, the products, their QR factors
#: and workspaces, the small SVD), counted generously.
_SVD_ARRAYS = 8


def block_rows(cols: int) -> int:
    """The preferred rows per block for rows of ``cols`` elements."""
    return max(1, _BLOCK_ELEMENTS // max(cols, 1))


def memory_needs(shape: tuple[int, ...], tuned_dtype: torch.dtype, base_dtype: torch.dtype, *, sketch: int,
                 exact: bool = False) -> tuple[int, int, int]:
    """``(hold_bytes, row_bytes, fixed_bytes)`` of fitting one stored tensor of ``shape`` (see
    :meth:`lorasurg.surgery.budget.MemoryBudget.place`).

    ``sketch``: the randomized SVD's column count ``l``. ``exact``: the SVD needs the whole delta (``--svd exact``
    or a policy that needs the whole spectrum); LAPACK's divide-and-conquer SVD then holds a copy of the matrix,
    ``U`` and ``O(min(out, in)^2)`` work arrays besides it.
    """
    rows, cols = int(shape[0]) if shape else 1, math.prod(shape[1:])
    raw = cols * (_itemsize(tuned_dtype) + _itemsize(base_dtype))  # one row of both inputs, as stored
    convert = cols * 8  # both inputs' rows as float32
    row_bytes = raw + convert + cols * 4  # and the float32 delta row of a streamed block
    fixed = (rows + cols) * sketch * 4 * _SVD_ARRAYS
    matrix = rows * cols * 4
    reading = min(rows, block_rows(cols)) * (raw + convert)  # the block buffers while reading a held delta
    if exact:
        p = min(rows, cols)
        return matrix + reading + 4 * (2 * rows * cols + 6 * p * p), row_bytes, fixed
    return matrix + reading + fixed, row_bytes, fixed


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Workspace:
    """Buffers reused from block to block and tensor to tensor, so reading allocates (and page-faults) each once.

    ``raw(i, nbytes)``: CPU byte buffers the row readers read into; ``block(i, n)``: float32 blocks on the device;
    ``matrix(n)``: the float32 matrix a held delta lives in (grown when a larger one is needed). :meth:`release`
    frees them (before a streamed tensor, whose budget does not include a held matrix, and at the end).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._raw: list[Optional[Tensor]] = [None, None]
        self._block: list[Optional[Tensor]] = [None, None]
        self._matrix: Optional[Tensor] = None

    def raw(self, i: int, nbytes: int) -> Tensor:
        if self._raw[i] is None or self._raw[i].numel() < nbytes:
            self._raw[i] = None
            self._raw[i] = torch.empty(nbytes, dtype=torch.uint8)
        return self._raw[i]

    def block(self, i: int, numel: int) -> Tensor:
        if self._block[i] is None or self._block[i].numel() < numel:
            self._block[i] = None
            self._block[i] = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._block[i][:numel]

    def matrix(self, numel: int) -> Tensor:
        if self._matrix is None or self._matrix.numel() < numel:
            self._matrix = None
            self._matrix = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._matrix[:numel]

    def release_matrix(self) -> None:
        self._matrix = None

    def release(self) -> None:
        self._raw, self._block, self._matrix = [None, None], [None, None], None


class Stats(NamedTuple):
    """What the first pass over a delta finds. ``finite`` False: NaN/inf (the pass stopped there; ``energy`` and
    ``product`` are incomplete). ``energy``: ``||delta||_F^2``. ``product``: ``M @ X`` (None without ``X``)."""

    changed: bool
    finite: bool
    energy: float
    product: Optional[Tensor]


class DeltaOperator:
    """The matrix view ``M: (out, in)`` of ``W_tuned - W_base``, read in row blocks (see the module docstring).

    ``transposed``: the stored rows are columns of ``M`` (embedding ``(num, dim)`` -> ``M = W.T``; GPT-2
    ``Conv1D`` ``(in, out)``); otherwise they are rows of ``M`` (linear, conv flattened to ``(out, in * k)``).
    ``hold``: keep the float32 delta in memory after the first pass (in ``work``'s matrix buffer).
    """

    def __init__(self, base: RowReader, tuned: RowReader, transposed: bool, device: torch.device, work: Workspace,
                 *, rows_per_block: Optional[int] = None, hold: bool = False) -> None:
        self.base, self.tuned, self.transposed, self.device, self.work = base, tuned, transposed, device, work
        rows, cols = base.shape[0] if base.shape else 1, math.prod(base.shape[1:])
        self.stored_shape = (rows, cols)
        self.shape = (cols, rows) if transposed else (rows, cols)
        self.block = max(1, min(rows, rows_per_block or block_rows(cols)))
        self.hold = hold
        self.matrix: Optional[Tensor] = None  # (rows, cols) float32 once the first pass has held it

    # --- reading -------------------------------------------------------------------------------------------

    def _read(self) -> Iterator[tuple[int, int, Tensor]]:
        """``(start, stop, float32 delta rows [start, stop))`` formed from the files; with ``hold`` the rows are
        views of the held matrix, otherwise of one block buffer reused for every block.

        Both inputs' rows are read into one buffer, converted to float32 by one copy and subtracted by one
        ``sub`` into the destination, on one thread (a mixed-dtype ``sub_`` is several times slower on CPU, and
        ``torch.sub`` of two bfloat16 tensors rounds its result to bfloat16).
        """
        rows, cols = self.stored_shape
        target = self.work.matrix(rows * cols).view(rows, cols) if self.hold else None
        same = self.tuned.dtype == self.base.dtype
        for start in range(0, rows, self.block):
            stop = min(start + self.block, rows)
            n = stop - start
            d = target[start:stop] if target is not None else self.work.block(0, n * cols).view(n, cols)
            with one_thread():
                self._form(start, stop, d, same)
            yield start, stop, d
        if target is not None:
            self.matrix = target

    def _form(self, start: int, stop: int, d: Tensor, same: bool) -> None:
        """Rows ``[start, stop)`` of the float32 delta into ``d`` (see :meth:`_read`)."""
        n, cols = stop - start, self.stored_shape[1]
        if same:
            nbytes = n * self.tuned.row_bytes
            raw = self.work.raw(0, 2 * self.block * self.tuned.row_bytes)
            self.tuned.rows_into(start, stop, raw)
            self.base.rows_into(start, stop, raw[nbytes:])
            pair = raw[:2 * nbytes].view(self.tuned.dtype).view(2 * n, cols)  # tuned rows, then base rows
            if pair.dtype != torch.float32 or self.device.type != "cpu":
                pair = self.work.block(1, 2 * n * cols).view(2 * n, cols).copy_(pair)  # float32, on the device
            torch.sub(pair[:n], pair[n:], out=d)
        else:
            t = self.tuned.rows_into(start, stop, self.work.raw(0, self.block * self.tuned.row_bytes))
            b = self.base.rows_into(start, stop, self.work.raw(1, self.block * self.base.row_bytes))
            d.copy_(t)
            d.sub_(self.work.block(1, n * cols).view(n, cols).copy_(b))

    def blocks(self) -> Iterator[tuple[int, int, Tensor]]:
        """Row blocks of the float32 delta in the stored layout: from the held matrix, or read again."""
        if self.matrix is None:
            yield from self._read()
            return
        for start in range(0, self.stored_shape[0], self.block):
            stop = min(start + self.block, self.stored_shape[0])
            yield start, stop, self.matrix[start:stop]

    def stats(self, X: Optional[Tensor] = None) -> Stats:
        """The first pass: whether the delta changed and is finite, ``||delta||_F^2`` and ``M @ X`` (see
        :class:`Stats`).

        A held delta is formed block by block on one thread (:func:`~lorasurg.engine.threads.one_thread`: a few
        element-wise operations per block, memory-bound), then its norm and ``M @ X`` are one operation each on
        the whole matrix. A streamed delta gets them block by block, while the block is in memory. ``max |delta|``
        is only taken where a norm is 0 (all zero, or too small to square in float32) or not finite (NaN/inf, or
        too large to square).
        """
        if self.hold:
            with one_thread():
                for _ in self._read():
                    pass
            changed, finite, energy = check_delta(self.matrix)
            if not finite:
                self.matrix = None
                return Stats(True, False, energy, None)
            return Stats(changed, True, energy, self.matmul(X) if X is not None else None)
        changed, energy = False, 0.0
        product = torch.zeros(self.shape[0], X.shape[1], device=self.device) if X is not None else None
        for a, b, d in self._read():
            with one_thread():
                block_changed, finite, block_energy = check_delta(d)
            if not finite:
                return Stats(True, False, energy, None)
            changed, energy = changed or block_changed, energy + block_energy
            if product is not None:
                self._accumulate(product, a, b, d, X)
        return Stats(changed, True, energy, product)

    def _accumulate(self, out: Tensor, a: int, b: int, d: Tensor, X: Tensor) -> None:
        """Add one block's share of ``M @ X`` to ``out``."""
        if self.transposed:
            out.addmm_(d.T, X[a:b])  # M = W.T: (out, rows) @ (rows, q)
        else:
            torch.mm(d, X, out=out[a:b])  # (rows, in) @ (in, q)

    # --- products ------------------------------------------------------------------------------------------

    def view(self) -> Tensor:
        """The held delta as ``M: (out, in)`` (a view; requires :meth:`stats` to have held it)."""
        assert self.matrix is not None, "the delta is not held"
        return self.matrix.T if self.transposed else self.matrix

    def matmul(self, X: Tensor) -> Tensor:
        """``M @ X`` for ``X: (in, q)``, returns ``(out, q)``."""
        if self.matrix is not None:
            return self.view() @ X  # (out, in) @ (in, q)
        out = torch.zeros(self.shape[0], X.shape[1], device=self.device)
        for a, b, d in self.blocks():
            self._accumulate(out, a, b, d, X)
        return out

    def rmatmul(self, Y: Tensor) -> Tensor:
        """``M.T @ Y`` for ``Y: (out, q)``, returns ``(in, q)``."""
        if self.matrix is not None:
            return self.view().T @ Y  # (in, out) @ (out, q)
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
        """``||M - scale * B @ A||_F`` for ``B: (out, r)``, ``A: (r, in)`` (overwrites a held delta)."""
        total = 0.0
        for a, b, d in self.blocks():
            if self.transposed:
                d.addmm_(A[:, a:b].T, B.T, alpha=-scale)  # rows a:b of M.T: (rows, r) @ (r, out)
            else:
                d.addmm_(B[a:b], A, alpha=-scale)  # rows a:b of M: (rows, r) @ (r, in)
            total += float(torch.linalg.vector_norm(d)) ** 2
        return math.sqrt(total)

    def close(self) -> None:
        self.matrix = None
        self.base.close()
        self.tuned.close()


def check_delta(d: Tensor) -> tuple[bool, bool, float]:
    """``(changed, finite, ||d||_F^2)`` from one norm; ``max |d|`` only when the norm is 0 or not finite."""
    norm = float(torch.linalg.vector_norm(d))
    if norm != 0.0 and math.isfinite(norm):
        return True, True, norm**2
    peak = max_abs(d)
    if not math.isfinite(peak):
        return True, False, 0.0
    return peak > 0.0, True, float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2


def max_abs(t: Tensor) -> float:
    """``max |t|`` (NaN if ``t`` holds one); ``aminmax`` is several times faster than an inf-norm on CPU."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t)
    lo, hi = float(lo), float(hi)
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)


def open_delta(base: Checkpoint, tuned: Checkpoint, name: str, transposed: bool, device: torch.device,
               work: Workspace, *, rows_per_block: Optional[int] = None, hold: bool = False) -> Optional[DeltaOperator]:
    """A :class:`DeltaOperator` for tensor ``name``, or None when either side is not a safetensors file."""
    readers = [ckpt.row_reader(name) for ckpt in (base, tuned)]
    if any(reader is None for reader in readers):
        for reader in readers:
            if reader is not None:
                reader.close()
        return None
    return DeltaOperator(readers[0], readers[1], transposed, device, work, rows_per_block=rows_per_block, hold=hold)
