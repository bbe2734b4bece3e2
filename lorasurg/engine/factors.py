"""LoRA factors of one module and the weight change they stand for.

One orientation everywhere: a module's weight seen as a matrix is ``M: (out, in)`` and its LoRA is

    delta_M = scale * B @ A,        A: (r, in),  B: (out, r),   scale = alpha / r  (alpha / sqrt(r) with rsLoRA)

The stored tensors keep PEFT's file layout, which differs by layer kind:

===========  ==========================  ===========================  =====================================
kind         base weight W               A (stored)                   B (stored)
===========  ==========================  ===========================  =====================================
linear       (out, in); (in, out) when   (r, in)                      (out, r)
             ``fan_in_fan_out`` (GPT-2
             Conv1D)
embedding    (num_embeddings, dim)       (r, num_embeddings)          (dim, r)
conv1d/2d/3d (out, in, *k)               (r, in, *k)                  (out, r, 1, ...)
===========  ==========================  ===========================  =====================================

so the matrix view is ``W`` (linear), ``W.T`` (fan_in_fan_out, embedding) or ``W.reshape(out, in * prod(k))``
(conv: A is a conv with the base kernel, B a 1x1 conv, and their composition is the product of the flattened
kernels). A ``lora_B`` bias ``b`` (shape ``(out,)``) adds ``scale * b`` to the layer's bias.

DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353, eq. 5) rescales each output row of the adapted weight:

    W' = m / ||W + delta||_row * (W + delta)

with ``||.||_row`` the L2 norm of each output's weights (per embedding dimension for an embedding) and ``m``
the stored ``lora_magnitude_vector``.

Every function here is pure: tensors and numbers in, new tensors out. Arithmetic is done in float32 (float64
inputs stay float64) and results are cast to the dtype of the tensor they modify.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch
from torch import Tensor

from ..errors import ShapeMismatchError, UnsupportedError

__all__ = [
    "LayerKind",
    "LAYER_KINDS",
    "LoraFactors",
    "lora_scale",
    "lora_alpha_for",
    "compute_dtype",
    "weight_to_matrix",
    "matrix_to_weight",
    "factors_from_matrices",
    "factor_shapes",
    "delta_matrix",
    "delta_frobenius_sq",
    "delta_weight",
    "delta_bias",
    "dora_weight_norm",
    "merged_weight",
    "merged_rows",
    "merged_row_norms_sq",
    "stored_rows_are_columns",
    "unmerged_weight",
    "pad_factors",
]

LayerKind = Literal["linear", "embedding", "conv1d", "conv2d", "conv3d"]
LAYER_KINDS: tuple[str, ...] = ("linear", "embedding", "conv1d", "conv2d", "conv3d")
_CONV_KERNEL_DIMS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor LoRA multiplies ``B @ A`` by: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.

    Raises:
        ValueError: ``r`` is not positive.
    """
    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got r={r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_alpha_for(scale: float, r: int, use_rslora: bool = False) -> float:
    """The ``lora_alpha`` that gives ``scale`` at rank ``r``: ``scale * r`` (``scale * sqrt(r)`` with rsLoRA);
    the inverse of :func:`lora_scale`."""
    return scale * (math.sqrt(r) if use_rslora else r)


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """The dtype arithmetic on these tensors is done in: float64 if any is float64, else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


@dataclass(frozen=True)
class LoraFactors:
    """The LoRA tensors of one module, in PEFT's stored layout (see the module docstring).

    Attributes:
        kind: the layer kind, one of :data:`LAYER_KINDS`.
        A: ``lora_A`` (``lora_embedding_A`` for an embedding).
        B: ``lora_B`` (``lora_embedding_B`` for an embedding).
        scale: ``alpha / r`` or ``alpha / sqrt(r)``; not stored in files, it comes from the config.
        bias: ``lora_B.bias``, shape ``(out,)``, or None.
        magnitude: DoRA's ``lora_magnitude_vector`` or None. Its stored shape is PEFT's (``(out,)`` for
            linear/embedding, ``(1, out, 1, ...)`` for conv); functions here only rely on its ``numel() == out``.
        fan_in_fan_out: the base weight is stored ``(in, out)`` (transformers' GPT-2 ``Conv1D``); linear only.
    """

    kind: str
    A: Tensor
    B: Tensor
    scale: float
    bias: Optional[Tensor] = None
    magnitude: Optional[Tensor] = None
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; expected one of {LAYER_KINDS}")
        if self.fan_in_fan_out and self.kind != "linear":
            raise ValueError(f"fan_in_fan_out applies to linear layers only, not {self.kind}")
        if self.A.shape[0] != self.B.shape[1]:
            raise ShapeMismatchError(
                f"LoRA rank mismatch: A has {self.A.shape[0]} rows (shape {tuple(self.A.shape)}) but B has "
                f"{self.B.shape[1]} columns (shape {tuple(self.B.shape)}); "
                "grouped convolutions (groups > 1) are not supported"
            )
        if self.bias is not None and self.bias.shape != (self.out_features,):
            raise ShapeMismatchError(
                f"lora_B bias has shape {tuple(self.bias.shape)}, expected ({self.out_features},)"
            )
        if self.magnitude is not None and self.magnitude.numel() != self.out_features:
            raise ShapeMismatchError(
                f"DoRA magnitude has {self.magnitude.numel()} elements, expected {self.out_features}"
            )

    @property
    def rank(self) -> int:
        """r, the number of rows of A."""
        return int(self.A.shape[0])

    @property
    def out_features(self) -> int:
        """Rows of the matrix view: output features (embedding: embedding_dim)."""
        return int(self.B.shape[0])

    @property
    def in_features(self) -> int:
        """Columns of the matrix view: ``in * prod(kernel)`` (embedding: num_embeddings)."""
        return int(self.A[0].numel())

    def with_scale(self, scale: float) -> "LoraFactors":
        """A copy with another scale (tensors shared)."""
        return replace(self, scale=scale)


def weight_to_matrix(weight: Tensor, kind: str, fan_in_fan_out: bool = False) -> Tensor:
    """The matrix view ``(out, in)`` of a base weight (a view or a transpose; no copy, no cast).

    linear: ``W`` (``W.T`` with fan_in_fan_out); embedding ``(num, dim) -> (dim, num)``;
    conv ``(out, in, *k) -> (out, in * prod(k))``.
    """
    if kind == "linear":
        return weight.T if fan_in_fan_out else weight
    if kind == "embedding":
        return weight.T  # (num, dim) -> (dim, num)
    if kind in _CONV_KERNEL_DIMS:
        return weight.reshape(weight.shape[0], -1)  # (out, in, *k) -> (out, in*prod(k))
    raise ValueError(f"unknown layer kind {kind!r}")


def matrix_to_weight(matrix: Tensor, kind: str, weight_shape: tuple[int, ...], fan_in_fan_out: bool = False) -> Tensor:
    """Inverse of :func:`weight_to_matrix`: a ``(out, in)`` matrix back into the base weight's layout."""
    if kind == "linear":
        out = matrix.T if fan_in_fan_out else matrix
    elif kind == "embedding":
        out = matrix.T  # (dim, num) -> (num, dim)
    elif kind in _CONV_KERNEL_DIMS:
        fits = matrix.dim() == 2 and matrix.shape[0] == weight_shape[0] and matrix.numel() == math.prod(weight_shape)
        out = matrix.reshape(weight_shape) if fits else matrix  # (out, in*prod(k)) -> (out, in, *k)
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    if tuple(out.shape) != tuple(weight_shape):
        raise ShapeMismatchError(
            f"a {kind} delta of matrix shape {tuple(matrix.shape)} does not fit a weight of shape {tuple(weight_shape)}"
        )
    return out


def factor_shapes(
    kind: str, weight_shape: tuple[int, ...], r: int, fan_in_fan_out: bool = False
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """``(A shape, B shape, out)`` that a rank-``r`` LoRA stores for a base weight of ``weight_shape`` (PEFT's
    file layout, see the module docstring): linear ``(r, in), (out, r)``; embedding ``(r, num), (dim, r)``;
    conv ``(r, in, *k), (out, r, 1, ...)``.

    Raises:
        ValueError: unknown ``kind``.
    """
    shape = tuple(int(d) for d in weight_shape)
    if kind == "linear":
        inp, out = (shape[0], shape[1]) if fan_in_fan_out else (shape[1], shape[0])
        return (r, inp), (out, r), out
    if kind == "embedding":
        return (r, shape[0]), (shape[1], r), shape[1]
    if kind in _CONV_KERNEL_DIMS:
        ones = (1,) * (len(shape) - 2)
        return (r, *shape[1:]), (shape[0], r, *ones), shape[0]  # (r, in, *k), (out, r, 1, ...)
    raise ValueError(f"unknown layer kind {kind!r}")


def factors_from_matrices(
    A_mat: Tensor,
    B_mat: Tensor,
    kind: str,
    weight_shape: tuple[int, ...],
    scale: float,
    *,
    bias: Optional[Tensor] = None,
    magnitude: Optional[Tensor] = None,
    fan_in_fan_out: bool = False,
) -> LoraFactors:
    """Put matrix factors ``A_mat: (r, in)``, ``B_mat: (out, r)`` into PEFT's stored layout for ``kind``.

    For conv, ``A`` becomes ``(r, in, *k)`` and ``B`` ``(out, r, 1, ...)``; linear and embedding keep the
    matrices as they are (the matrix view already is PEFT's orientation).
    """
    if kind in _CONV_KERNEL_DIMS:
        r = A_mat.shape[0]
        ones = (1,) * _CONV_KERNEL_DIMS[kind]
        A = A_mat.reshape(r, *weight_shape[1:])  # (r, in*prod(k)) -> (r, in, *k)
        B = B_mat.reshape(B_mat.shape[0], r, *ones)  # (out, r) -> (out, r, 1, ...)
    else:
        A, B = A_mat, B_mat
    return LoraFactors(kind, A, B, scale, bias=bias, magnitude=magnitude, fan_in_fan_out=fan_in_fan_out)


def delta_matrix(factors: LoraFactors, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``scale * B @ A`` as a ``(out, in)`` matrix, computed in float32 (float64 if an input is).

    Args:
        factors: the module's LoRA.
        dtype: cast the result to this dtype; default: the compute dtype.
    """
    work = compute_dtype(factors.A, factors.B)
    r = factors.rank
    A = factors.A.reshape(r, -1).to(work)  # (r, in)
    B = factors.B.reshape(factors.B.shape[0], r).to(work)  # (out, r)
    out = (B @ A) * factors.scale  # (out, r) @ (r, in) -> (out, in)
    return out if dtype is None else out.to(dtype)


def delta_frobenius_sq(factors: LoraFactors) -> float:
    """``||scale * B @ A||_F**2`` without forming the product: ``scale**2 * sum((B.T @ B) * (A @ A.T))``
    (the trace of ``(B.T B)(A A.T)``; both Gram matrices are ``(r, r)``), reduced in float64."""
    r = factors.rank
    A = factors.A.reshape(r, -1).double()  # (r, in)
    B = factors.B.reshape(factors.B.shape[0], r).double()  # (out, r)
    return float(((B.T @ B) * (A @ A.T)).sum()) * factors.scale**2  # (r, out) @ (out, r) * (r, in) @ (in, r)


def delta_weight(
    factors: LoraFactors, weight_shape: tuple[int, ...], dtype: Optional[torch.dtype] = None
) -> Tensor:
    """The change LoRA makes to the base weight, in the base weight's layout ``weight_shape``.

    Raises:
        ShapeMismatchError: the factors do not fit ``weight_shape``.
    """
    return matrix_to_weight(delta_matrix(factors, dtype), factors.kind, weight_shape, factors.fan_in_fan_out)


def delta_bias(factors: LoraFactors, dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
    """The change LoRA makes to the layer's bias, ``scale * lora_B.bias``; None without a lora_B bias."""
    if factors.bias is None:
        return None
    work = compute_dtype(factors.bias)
    out = factors.bias.to(work) * factors.scale
    return out if dtype is None else out.to(dtype)


def dora_weight_norm(factors: LoraFactors, weight: Tensor) -> Tensor:
    """``||W + delta||_row``: the L2 norm of each output's weights after adding LoRA, shape ``(out,)``.

    Computed in float32 (float64 if the weight is); rows are the rows of the matrix view.
    """
    work = compute_dtype(weight, factors.A)
    matrix = weight_to_matrix(weight, factors.kind, factors.fan_in_fan_out).to(work)  # (out, in)
    adapted = matrix + delta_matrix(factors, work)  # (out, in)
    return torch.linalg.vector_norm(adapted, dim=1)  # (out,)


def merged_weight(factors: LoraFactors, weight: Tensor, weight_norm: Optional[Tensor] = None) -> Tensor:
    """The base weight with this LoRA merged in, same shape and dtype as ``weight``.

    Plain LoRA: ``W + delta``. DoRA: ``m / ||W + delta||_row * (W + delta)`` (row-wise).
    The bias change (:func:`delta_bias`) is separate.

    Args:
        factors: the module's LoRA.
        weight: the weight to merge into.
        weight_norm: DoRA only: the row norms to divide by, when they must come from another weight than
            ``weight`` (e.g. ``weight`` already holds other merged adapters and DoRA's norm is that of the
            bare base weight, :func:`dora_weight_norm`). Default: the norms of ``weight + delta``.
    """
    work = compute_dtype(weight, factors.A)
    matrix = weight_to_matrix(weight, factors.kind, factors.fan_in_fan_out).to(work)  # (out, in)
    adapted = matrix + delta_matrix(factors, work)  # (out, in)
    if factors.magnitude is not None:
        if weight_norm is not None:
            norm = weight_norm.reshape(-1).to(work)  # (out,)
        else:
            norm = torch.linalg.vector_norm(adapted, dim=1)  # (out,)
        factor = factors.magnitude.reshape(-1).to(work) / norm  # (out,)
        adapted = adapted * factor[:, None]  # (out, in) * (out, 1)
    return matrix_to_weight(adapted, factors.kind, tuple(weight.shape), factors.fan_in_fan_out).to(weight.dtype)


def stored_rows_are_columns(factors: LoraFactors) -> bool:
    """Whether a row of the stored weight is a *column* of the matrix view (embedding, fan_in_fan_out), rather
    than a row (linear, conv: a stored row ``W[i]`` is the matrix row ``M[i]``, flattened for conv)."""
    return factors.kind == "embedding" or factors.fan_in_fan_out


def _adapted_rows(factors: LoraFactors, rows: Tensor, start: int) -> tuple[Tensor, torch.dtype]:
    """Rows ``[start, start + n)`` of ``W + delta`` in the stored layout, 2-D ``(n, prod(shape[1:]))``, in the
    compute dtype, from those rows of ``W`` (``rows: (n, *shape[1:])``)."""
    work = compute_dtype(rows, factors.A)
    n = rows.shape[0]
    r = factors.rank
    A = factors.A.reshape(r, -1).to(work)  # (r, in)
    B = factors.B.reshape(factors.B.shape[0], r).to(work)  # (out, r)
    block = rows.reshape(n, -1).to(work, copy=True)  # (n, cols): stored rows, a copy the caller does not see
    if stored_rows_are_columns(factors):  # in place, no temporary of the block's size
        block.addmm_(A[:, start:start + n].T, B.T, alpha=factors.scale)  # (n, r) @ (r, out) -> (n, out)
    else:
        block.addmm_(B[start:start + n], A, alpha=factors.scale)  # (n, r) @ (r, in) -> (n, in)
    return block, work


def merged_row_norms_sq(factors: LoraFactors, rows: Tensor, start: int) -> Tensor:
    """What stored rows ``[start, start + n)`` add to ``||W + delta||_row**2`` (DoRA's norms, one per matrix row,
    ``(out,)``), when stored rows are matrix columns (:func:`stored_rows_are_columns`): summed over every block of
    a weight, the squared norms :func:`merged_weight` divides by. For a layout whose stored rows are matrix rows
    the norms are the block's own and :func:`merged_rows` computes them itself."""
    block, _ = _adapted_rows(factors, rows, start)  # (n, out)
    return (block * block).sum(dim=0)  # (out,)


def merged_rows(factors: LoraFactors, rows: Tensor, start: int, weight_norm: Optional[Tensor] = None) -> Tensor:
    """Rows ``[start, start + n)`` (dim 0 of the stored layout) of :func:`merged_weight`, from those rows of ``W``:
    ``merged_weight(factors, W)[start:start + n]`` up to rounding, holding only the block (for weights too large to
    merge whole). Same dtype and shape as ``rows: (n, *shape[1:])``.

    Plain LoRA: the block of ``W + scale * B @ A`` (rows of ``B`` for linear/conv, columns of ``A`` for embedding and
    fan_in_fan_out). DoRA: each matrix row rescaled by ``m / ||W + delta||_row``; for linear/conv the norms are the
    block's own rows; where stored rows are matrix columns (:func:`stored_rows_are_columns`) they span every block,
    so pass ``weight_norm = sqrt(sum of merged_row_norms_sq over all blocks)``.

    Raises:
        ValueError: DoRA on a layout whose stored rows are matrix columns, without ``weight_norm``.
    """
    block, work = _adapted_rows(factors, rows, start)  # (n, cols)
    if factors.magnitude is not None:
        magnitude = factors.magnitude.reshape(-1).to(work)  # (out,)
        if stored_rows_are_columns(factors):
            if weight_norm is None:
                raise ValueError("merged_rows: DoRA on a transposed layout needs weight_norm (the norms span every "
                                 "block: sum merged_row_norms_sq over them)")
            block *= (magnitude / weight_norm.reshape(-1).to(work))[None, :]  # (n, out) * (1, out)
        else:
            norm = weight_norm.reshape(-1)[start:start + rows.shape[0]].to(work) if weight_norm is not None else \
                torch.linalg.vector_norm(block, dim=1)  # (n,)
            block *= (magnitude[start:start + rows.shape[0]] / norm)[:, None]  # (n, cols) * (n, 1)
    return block.reshape(rows.shape).to(rows.dtype)


def unmerged_weight(factors: LoraFactors, merged: Tensor, weight_norm: Optional[Tensor] = None) -> Tensor:
    """Inverse of :func:`merged_weight`: recover ``W`` from the merged weight.

    Plain LoRA: ``W' - delta``. DoRA: ``W' * ||W + delta||_row / m - delta``; the norm of the *original*
    adapted weight cannot be recomputed from ``W'`` alone, so pass ``weight_norm`` (from
    :func:`dora_weight_norm` before merging). Without it, DoRA unmerge raises.

    Raises:
        UnsupportedError: DoRA factors without ``weight_norm``.
    """
    work = compute_dtype(merged, factors.A)
    matrix = weight_to_matrix(merged, factors.kind, factors.fan_in_fan_out).to(work)  # (out, in)
    if factors.magnitude is not None:
        if weight_norm is None:
            raise UnsupportedError("unmerging DoRA needs the row norms computed before the merge (weight_norm=)")
        factor = factors.magnitude.reshape(-1).to(work) / weight_norm.reshape(-1).to(work)  # (out,)
        matrix = matrix / factor[:, None]  # (out, in) / (out, 1)
    restored = matrix - delta_matrix(factors, work)  # (out, in)
    return matrix_to_weight(restored, factors.kind, tuple(merged.shape), factors.fan_in_fan_out).to(merged.dtype)


def pad_factors(A: Tensor, B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero-pad stored factors to a higher rank: ``B @ A`` is unchanged, bit for bit.

    ``A: (r, in[, *k])`` gains ``rank - r`` zero rows (dim 0), ``B: (out, r[, 1, ...])`` as many zero columns (dim 1),
    in their own dtypes. ``rank <= r`` returns them unchanged.
    """
    extra = rank - A.shape[0]
    if extra <= 0:
        return A, B
    A = torch.cat([A, A.new_zeros(extra, *A.shape[1:])], dim=0)  # (rank, in, *k)
    B = torch.cat([B, B.new_zeros(B.shape[0], extra, *B.shape[2:])], dim=1)  # (out, rank, 1, ...)
    return A, B
