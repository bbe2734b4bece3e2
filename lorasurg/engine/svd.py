"""Truncated SVD of one matrix, and the LoRA factors and error figures that come from it.

For a matrix ``M: (m, n)`` and a rank ``k`` the best rank-k approximation in the Frobenius norm is the truncated
SVD ``U_k diag(S_k) Vh_k`` (Eckart-Young), with error ``sqrt(sum_{i>k} S_i^2) = sqrt(||M||_F^2 - sum_{i<=k} S_i^2)``.

Two methods:

``exact``
    ``torch.linalg.svd`` of the whole matrix, then truncated: optimal, ``O(m n min(m, n))``.

``randomized``
    Halko, Martinsson & Tropp 2011 (https://arxiv.org/abs/0909.4061), Algorithms 4.4 and 5.1: sketch the range
    with a Gaussian test matrix of ``l = k + oversample`` columns, run ``q`` subspace (power) iterations with a QR
    re-orthonormalisation after every multiplication, then take the exact SVD of the small ``l x n`` projection.
    Costs ``O(m n l (2q + 2))``. Its Ritz values converge to the true singular values at a rate set by
    ``(S_{l+1} / S_i)^(2q+1)``, so slowly decaying (flat, power-law) spectra are the hard case.

Defaults of the randomized method, chosen on flat (Gaussian), power-law ``i^-a`` for ``a`` in {0.25, 0.5, 1, 2},
``1/log(1+i)``, step and low-rank-plus-noise spectra at 300-2304 rows/columns, tall and wide, k from 1 to
min(m, n)/5: every case within 0.5% of the Eckart-Young optimum (the requirement is 1%), with 2-3 power iterations
on average and at most 8:

* ``oversample = max(10, k // 2)``.
* ``power_iters=None`` (adaptive): at least 2 iterations, at most 10. After each one the Ritz values of the current
  subspace come for free from the R factor of the QR that re-orthonormalises it; the gain ``d`` in captured energy
  ``sum_{i<=k} s_i^2`` and its ratio ``rho`` to the previous gain extrapolate the remaining gain as
  ``d * rho / (1 - rho)``. Iteration stops once that is below 0.4% of the current tail energy
  (``||M||_F^2 - sum_{i<=k} s_i^2``), i.e. the error is within ~0.2% of converged, or once the gain is below the
  float32 resolution of the energies (1e-6 of ``||M||_F^2``).
* When the sketch is a large part of the matrix (``3 * l >= min(m, n)``) the randomized method is no faster than
  the exact one, and the exact SVD is used.

An explicit ``power_iters`` runs exactly that many iterations and never falls back to the exact method; with
``oversample=0`` it computes what ``torch.svd_lowrank(M, q=k, niter=power_iters)`` computes from the same random
state (PEFT's ``pissa_niter_N``).

Every function computes in float32 (float64 when the input is float64) on the input's device.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional

import torch
from torch import Tensor

from .factors import compute_dtype
from .ranks import RankPolicy, parse_rank_policy

__all__ = [
    "SvdMethod",
    "SVD_METHODS",
    "TruncatedSvd",
    "default_oversample",
    "truncated_svd",
    "draw_test_matrix",
    "gram_svd",
    "frobenius_sq",
    "split_factors",
    "energy_kept",
    "relative_error",
    "approximation_error",
    "Decomposition",
    "decompose",
]

SvdMethod = Literal["randomized", "exact"]
SVD_METHODS: tuple[str, ...] = ("randomized", "exact")

_MIN_POWER_ITERS = 2
_MAX_POWER_ITERS = 10
_REMAINING_GAIN_TOL = 0.004  # stop when the extrapolated remaining gain is below this share of the tail energy
_ENERGY_RESOLUTION = 1e-6  # energy gains below this share of ||M||_F^2 are float32 noise
_EXACT_FRACTION = 3  # exact SVD when _EXACT_FRACTION * sketch_size >= min(m, n)


class TruncatedSvd(NamedTuple):
    """``U: (m, k)``, ``S: (k,)`` descending, ``Vh: (k, n)`` with ``M ~= U @ diag(S) @ Vh`` (contiguous)."""

    U: Tensor
    S: Tensor
    Vh: Tensor


def default_oversample(rank: int) -> int:
    """The randomized method's default oversampling for a target rank: ``max(10, rank // 2)``."""
    return max(10, rank // 2)


def truncated_svd(
    matrix: Tensor,
    rank: int,
    *,
    method: str = "randomized",
    oversample: Optional[int] = None,
    power_iters: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = 0,
) -> TruncatedSvd:
    """The leading ``k = min(rank, m, n)`` singular triplets of ``matrix: (m, n)``.

    Args:
        matrix: a 2-D floating tensor; any dtype (cast to float32, float64 stays float64), any device.
        rank: the number of triplets wanted, >= 1.
        method: ``"randomized"`` (default) or ``"exact"``; see the module docstring.
        oversample: randomized only; extra sketch columns, default ``max(10, rank // 2)``.
        power_iters: randomized only; None (default) adapts the count (2 to 10), an int runs exactly that many.
        generator: randomized only; draws the Gaussian test matrix on ``generator.device`` (then moved to the
            matrix's device). Takes precedence over ``seed``.
        seed: randomized only, without ``generator``: an int draws from a fresh CPU generator with that seed
            (default 0, so results are reproducible and independent of the device); None draws from torch's
            global RNG on the matrix's device, as ``torch.svd_lowrank`` does.

    Returns:
        :class:`TruncatedSvd` ``(U, S, Vh)`` in the compute dtype on the matrix's device.

    Raises:
        ValueError: ``matrix`` is not 2-D, ``rank < 1``, an unknown ``method``, or negative ``oversample`` /
            ``power_iters``.
    """
    if matrix.dim() != 2:
        raise ValueError(f"truncated_svd needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    if rank < 1:
        raise ValueError(f"truncated_svd needs rank >= 1, got {rank}")
    if method not in SVD_METHODS:
        raise ValueError(f"unknown SVD method {method!r}; expected one of {SVD_METHODS}")
    if (oversample is not None and oversample < 0) or (power_iters is not None and power_iters < 0):
        raise ValueError(f"oversample and power_iters must be >= 0, got {oversample} and {power_iters}")
    work = compute_dtype(matrix)
    M = matrix.to(work)
    m, n = M.shape
    k = min(rank, m, n)
    sketch = min(m, n, k + (default_oversample(k) if oversample is None else oversample))
    adaptive = power_iters is None
    if method == "exact" or (adaptive and _EXACT_FRACTION * sketch >= min(m, n)):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)  # (m, p), (p,), (p, n) with p = min(m, n)
        U, S, Vh = U[:, :k], S[:k], Vh[:k]
    else:
        omega = draw_test_matrix(min(m, n), sketch, work, M.device, generator, seed)
        if m < n:  # work on the tall orientation, as torch.svd_lowrank does
            Ut, S, Vht = _randomized_tall(M.mT, k, omega, power_iters)
            U, Vh = Vht.mT, Ut.mT  # M.T = Ut S Vht  =>  M = Vht.T S Ut.T
        else:
            U, S, Vh = _randomized_tall(M, k, omega, power_iters)
    return TruncatedSvd(U.contiguous(), S.contiguous(), Vh.contiguous())


def gram_svd(matrix: Tensor, rank: int, *, dtype: Optional[torch.dtype] = None) -> TruncatedSvd:
    """The leading ``k = min(rank, m, n)`` singular triplets of ``matrix: (m, n)``, exact, from the eigendecomposition
    of its smaller Gram matrix.

    With ``G = M.T @ M`` (``n <= m``; else ``M @ M.T``) ``= V diag(S**2) V.T``: ``Vh_k`` are the eigenvectors of the
    ``k`` largest eigenvalues, ``U_k = M @ V_k / S_k`` and ``S_k = ||M @ v_i||``. One ``(min, min)`` symmetric
    eigenproblem instead of the SVD of ``(m, n)``: 2-7x faster on the CPU for weight matrices, where LAPACK's SVD
    spends its time bidiagonalising the whole matrix. Squaring costs accuracy for small singular values (the error
    of ``v_i`` is about ``eps * S_1**2 / (S_i**2 - S_{i+1}**2)``), so compute in float64 where the result must hold
    float32 precision; float32 is enough for a result stored in bfloat16/float16.

    Args:
        matrix: 2-D, any floating dtype and device.
        rank: triplets wanted, >= 1.
        dtype: the dtype of the Gram matrix and its eigendecomposition; default the compute dtype (float32,
            float64 for float64 input).

    Returns:
        :class:`TruncatedSvd` in the compute dtype of ``matrix``; a zero singular value gets a zero ``U`` column.

    Raises:
        ValueError: ``matrix`` is not 2-D, or ``rank < 1``.
    """
    if matrix.dim() != 2:
        raise ValueError(f"gram_svd needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    if rank < 1:
        raise ValueError(f"gram_svd needs rank >= 1, got {rank}")
    out_dtype = compute_dtype(matrix)
    work = dtype or out_dtype
    m, n = matrix.shape
    M = matrix.to(work) if m >= n else matrix.mT.to(work)  # tall: (p, q), q = min(m, n)
    k = min(rank, m, n)
    _, V = torch.linalg.eigh(M.mT @ M)  # (q, p) @ (p, q) -> (q, q); eigenvalues ascending
    V = V[:, -k:].flip(-1)  # (q, k), largest first
    Y = M @ V  # (p, q) @ (q, k) -> (p, k) = U_k diag(S_k)
    S = torch.linalg.vector_norm(Y, dim=0)  # (k,)
    U = Y / torch.where(S > 0, S, torch.ones_like(S))  # (p, k) / (k,)
    U, S, V = U.to(out_dtype), S.to(out_dtype), V.to(out_dtype)
    if m >= n:
        return TruncatedSvd(U.contiguous(), S.contiguous(), V.mT.contiguous())
    return TruncatedSvd(V.contiguous(), S.contiguous(), U.mT.contiguous())  # M = (M.T).T = V S U.T


def draw_test_matrix(
    n: int, sketch: int, dtype: torch.dtype, device: torch.device, generator: Optional[torch.Generator], seed: Optional[int]
) -> Tensor:
    """The Gaussian test matrix ``(n, sketch)``, drawn as :func:`truncated_svd` documents."""
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    if generator is None:
        return torch.randn(n, sketch, dtype=dtype, device=device)
    return torch.randn(n, sketch, dtype=dtype, device=generator.device, generator=generator).to(device)


def _orth(X: Tensor) -> Tensor:
    """An orthonormal basis of the columns of ``X``: the Q of its reduced QR."""
    return torch.linalg.qr(X).Q


def _randomized_tall(A: Tensor, k: int, omega: Tensor, power_iters: Optional[int]) -> TruncatedSvd:
    """Randomized SVD of a tall ``A: (m, n)``, ``m >= n``, with test matrix ``omega: (n, l)``."""
    Q = _orth(A @ omega)  # (m, n) @ (n, l) -> (m, l)
    if power_iters is None:
        Q, small = _adaptive_iterations(A, Q, k)
    else:
        for _ in range(power_iters):
            Q = _orth(A @ _orth(A.mT @ Q))  # (m, n) @ [(n, m) @ (m, l) -> (n, l)] -> (m, l)
        small = Q.mT @ A  # (l, m) @ (m, n) -> (l, n)
    Us, S, Vh = torch.linalg.svd(small, full_matrices=False)  # (l, l), (l,), (l, n)
    U = Q @ Us[:, :k]  # (m, l) @ (l, k) -> (m, k)
    return TruncatedSvd(U, S[:k], Vh[:k])


def _adaptive_iterations(A: Tensor, Q: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Subspace iterations on ``Q: (m, l)`` until the captured energy of the top k stops improving.

    Returns the final basis ``Q: (m, l)`` and the projection ``Q.T @ A: (l, n)``.
    """
    total = frobenius_sq(A)
    previous_energy: Optional[float] = None
    previous_gain: Optional[float] = None
    iteration = 0
    while True:
        Z = A.mT @ Q  # (n, m) @ (m, l) -> (n, l); Z.T = Q.T @ A
        Qz, R = torch.linalg.qr(Z)  # (n, l), (l, l); R has the singular values of Z
        ritz_sq = torch.linalg.svdvals(R).double().pow(2)  # (l,)
        energy = float(ritz_sq[:k].sum())
        done = iteration >= _MAX_POWER_ITERS
        if previous_energy is not None and iteration >= _MIN_POWER_ITERS:
            gain = energy - previous_energy
            if gain <= _ENERGY_RESOLUTION * total:
                done = True
            else:
                rho = gain / previous_gain if previous_gain is not None and previous_gain > 0 else 0.5
                rho = min(max(rho, 0.0), 0.95)
                tail = max(total - energy, float(ritz_sq[k:].sum()))
                done = done or gain * rho / (1.0 - rho) <= _REMAINING_GAIN_TOL * tail
            previous_gain = gain
        if done:
            return Q, Z.mT
        previous_energy = energy
        Q = _orth(A @ Qz)  # (m, n) @ (n, l) -> (m, l)
        iteration += 1


def frobenius_sq(matrix: Tensor) -> float:
    """``||M||_F^2`` (the total energy that rank policies and errors are relative to), as a Python float.

    The norm is reduced in the compute dtype (torch's reductions sum pairwise, so float32 keeps ~1e-6 relative
    accuracy without a float64 copy of the matrix) and squared in double precision.
    """
    return float(torch.linalg.vector_norm(matrix.to(compute_dtype(matrix)))) ** 2


def split_factors(U: Tensor, S: Tensor, Vh: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Split a truncated SVD into LoRA factors with ``scale * B @ A == U @ diag(S) @ Vh``.

    Balanced split (the one PEFT's PiSSA uses): with ``s = sqrt(S / |scale|)``,

        A = diag(s) @ Vh                  (r, in)
        B = sign(scale) * U @ diag(s)     (out, r)

    so A and B carry the same singular values, ``sqrt(S / |scale|)``. A negative scale (a negative ``lora_alpha``,
    which PEFT accepts: the adapter's delta is subtracted) flips the sign of ``B``.

    Args:
        U: ``(out, r)``; S: ``(r,)``, non-negative; Vh: ``(r, in)`` — or a batch of them, ``(E, out, r)``,
            ``(E, r)``, ``(E, r, in)``, giving ``(E, r, in)`` and ``(E, out, r)``.
        scale: the LoRA scale ``alpha / r`` (or ``alpha / sqrt(r)``), finite and not 0.

    Returns:
        ``(A, B)`` in the compute dtype of the inputs.

    Raises:
        ValueError: ``scale`` is 0 or not finite, or the shapes do not chain.
    """
    if scale == 0 or not math.isfinite(scale):
        raise ValueError(f"split_factors needs a finite, non-zero LoRA scale, got {scale}")
    r, lead = S.shape[-1], tuple(S.shape[:-1])
    if U.dim() != S.dim() + 1 or Vh.dim() != S.dim() + 1 or tuple(U.shape[:-2]) != lead \
            or tuple(Vh.shape[:-2]) != lead or U.shape[-1] != r or Vh.shape[-2] != r:
        raise ValueError(
            f"split_factors needs U (out, r), S (r,), Vh (r, in); got {tuple(U.shape)}, {tuple(S.shape)}, {tuple(Vh.shape)}"
        )
    work = compute_dtype(U, S, Vh)
    root = torch.sqrt(S.to(work) / abs(scale))  # ([E,] r)
    A = root[..., :, None] * Vh.to(work)  # (r, 1) * (r, in) -> (r, in), per matrix
    B = U.to(work) * (root if scale > 0 else -root)[..., None, :]  # (out, r) * (1, r) -> (out, r), per matrix
    return A.contiguous(), B.contiguous()


def energy_kept(total_sq: float, kept: Tensor) -> float:
    """The share of ``||M||_F^2`` that the kept singular values hold: ``sum(kept^2) / total_sq``, in [0, 1].

    1.0 for a zero matrix (nothing was lost).
    """
    if total_sq <= 0:
        return 1.0
    return min(float(kept.double().pow(2).sum()) / total_sq, 1.0)


def relative_error(total_sq: float, kept: Tensor) -> float:
    """``||M - M_r||_F / ||M||_F`` of a truncated SVD, from the norm and the kept singular values.

    ``sqrt(max(total_sq - sum(kept^2), 0) / total_sq)``: no dense product is formed. The difference cancels when
    almost all energy is kept, so values below ~1e-3 (float32 singular values) are only an estimate; it is
    clamped at 0. 0.0 for a zero matrix.
    """
    if total_sq <= 0:
        return 0.0
    lost = max(total_sq - float(kept.double().pow(2).sum()), 0.0)
    return math.sqrt(lost / total_sq)


def approximation_error(matrix: Tensor, U: Tensor, S: Tensor, Vh: Tensor) -> float:
    """``||M - U diag(S) Vh||_F`` computed densely in the compute dtype (exact, but forms an ``(m, n)`` matrix)."""
    work = compute_dtype(matrix, U)
    approx = (U.to(work) * S.to(work)[None, :]) @ Vh.to(work)  # (m, k) * (1, k) @ (k, n) -> (m, n)
    return float(torch.linalg.vector_norm(matrix.to(work) - approx, dtype=torch.float64))


class Decomposition(NamedTuple):
    """A matrix's truncated SVD at the rank a policy chose, with the figures a report needs.

    Attributes:
        U: ``(m, rank)``; S: ``(rank,)``; Vh: ``(rank, n)`` (rank may be 0).
        total_sq: ``||M||_F^2``.
    """

    U: Tensor
    S: Tensor
    Vh: Tensor
    total_sq: float

    @property
    def rank(self) -> int:
        """The rank kept."""
        return int(self.S.shape[0])

    @property
    def relative_error(self) -> float:
        """``||M - U diag(S) Vh||_F / ||M||_F`` from the norms (see :func:`relative_error`)."""
        return relative_error(self.total_sq, self.S)

    @property
    def energy_kept(self) -> float:
        """The share of ``||M||_F^2`` kept (see :func:`energy_kept`)."""
        return energy_kept(self.total_sq, self.S)


def decompose(
    matrix: Tensor,
    max_rank: int,
    policy: "RankPolicy | str" = "fixed",
    *,
    method: str = "randomized",
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = 0,
    total_sq: Optional[float] = None,
) -> Decomposition:
    """Truncated SVD of ``matrix`` at the rank ``policy`` chooses, capped by ``max_rank``.

    Computes only the leading ``max_rank`` triplets (by ``method``), except for policies that need the whole
    spectrum (``sv_cumulative``), which take the exact full SVD.

    Args:
        matrix: 2-D, any floating dtype and device.
        max_rank: the cap (``--r``), >= 1.
        policy: a :class:`~lorasurg.engine.ranks.RankPolicy` or its text (``"fixed"``, ``"energy:0.9"``, ...).
        method, generator, seed: as for :func:`truncated_svd`.
        total_sq: ``||M||_F^2`` when the caller already has it (saves a pass over the matrix).

    Raises:
        ConfigError: policy text that does not parse.
        ValueError: as :func:`truncated_svd`.
    """
    chosen = parse_rank_policy(policy) if isinstance(policy, str) else policy
    total = frobenius_sq(matrix) if total_sq is None else float(total_sq)
    if chosen.needs_full_spectrum:
        U, S, Vh = truncated_svd(matrix, min(matrix.shape), method="exact")
    else:
        U, S, Vh = truncated_svd(matrix, max_rank, method=method, generator=generator, seed=seed)
    rank = chosen.choose(S, max_rank, total_sq=total)
    return Decomposition(U[:, :rank], S[:rank], Vh[:rank], total)
