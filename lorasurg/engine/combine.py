"""Merging the LoRAs of several adapters on one module: every ``combination_type`` of PEFT's ``add_weighted_adapter``.

Adapter ``i`` contributes a *term* on a module: a weight ``w_i`` (the user's), its scale ``s_i`` (``alpha_i / r_i`` or
``alpha_i / sqrt(r_i)``, per module) and its factors ``B_i: (out, r_i)``, ``A_i: (r_i, in)`` (matrix views), so its
delta is ``D_i = s_i B_i @ A_i``; ``c_i = w_i s_i``. A method returns factors ``A: (k, in)``, ``B: (out, k)`` for a
target scale ``s`` (``s * B @ A`` is the merged delta). Three families:

**exact** (the weighted sum of the deltas, never formed densely; :mod:`lorasurg.engine.lowrank`)

``svd``
    ``M = sum_i c_i B_i A_i``, truncated to rank k by its exact SVD (QR of the stacked factors): the best rank-k
    approximation of the weighted sum (Eckart-Young). PEFT forms M densely and runs a full SVD; same result.
``cat``
    ``B = [sqrt|c_1/s| B_1 | ...]``, ``A = [sgn(c_1) sqrt|c_1/s| A_1 ; ...]``: the weighted sum exactly, rank
    ``sum_i r_i``.

**factor-wise** (need equal ranks; ``A`` and ``B`` are merged separately, so ``B @ A`` has cross terms
``B_i A_j``: that is PEFT's definition of these methods, kept as is; ``svd`` and ``cat`` are the exact sums)

``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``
    ``A = f([A_i], [sgn(c_i) sqrt|c_i / s|])``, ``B = f([B_i], [sqrt|c_i / s|])`` with ``f`` the element-wise merge
    of the same name (:data:`lorasurg.engine.sparsify.TENSOR_METHODS`: weighted sum; trim + elect sign + disjoint
    mean; random drop + rescale; ...). For ``linear``, ``B @ A = sum_ij sqrt|c_i c_j| sgn(c_j) B_i A_j / s``.

**dense** (the element-wise merges need every entry of every delta)

``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``
    ``M = f([D_i], [w_i])`` with ``f`` the element-wise merge named by the prefix, on the dense ``(out, in)``
    deltas, then truncated to rank k by an exact SVD of M.

The element-wise merges follow PEFT: the sign is elected on the trimmed/dropped tensors before weighting; trimming
keeps ``floor(density * numel)`` entries; DARE draws from the ``generator`` given, A's tensors before B's. A module
that an adapter does not have is a zero term for it, which every method treats as absent. Everything is computed in
float32 (float64 inputs stay float64); the caller casts the results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .factors import compute_dtype
from .lowrank import fit_from_svd, truncate_terms
from .sparsify import SIGN_METHODS, TENSOR_METHODS, check_density
from .svd import TruncatedSvd

__all__ = ["Term", "MergeSettings", "Combined", "Method", "METHODS", "combine"]


@dataclass(frozen=True)
class Term:
    """One adapter's LoRA on one module.

    Attributes:
        weight: the user's weight ``w_i`` (any sign).
        scale: the adapter's LoRA scale on this module, ``s_i``.
        B: ``(out, r_i)``; A: ``(r_i, in)`` (matrix views: conv kernels flattened).
    """

    weight: float
    scale: float
    B: Tensor
    A: Tensor

    @property
    def coefficient(self) -> float:
        """``c_i = w_i * s_i``: what ``B_i @ A_i`` is multiplied by in the weighted sum."""
        return self.weight * self.scale


@dataclass(frozen=True)
class MergeSettings:
    """The parameters a method may use.

    Attributes:
        rank: the new rank of the svd methods (required by them); zero-padded when the merged matrix has a lower
            rank, and capped at ``min(out, in)``.
        density: the fraction kept by trimming/dropping, in (0, 1] (required by ties, dare and magnitude_prune).
        majority_sign: ``total`` or ``frequency`` (ties and dare_ties).
        generator: the source of DARE's random draws.
        scale: the LoRA scale of the returned factors.
    """

    rank: Optional[int] = None
    density: Optional[float] = None
    majority_sign: str = "total"
    generator: Optional[torch.Generator] = None
    scale: float = 1.0


class Combined(NamedTuple):
    """A merged module: ``scale * B @ A`` is its delta.

    Attributes:
        A: ``(k, in)``; B: ``(out, k)``; matrix views in the compute dtype.
        rank: the singular triplets kept (svd methods; ``k - rank`` columns are zero padding), else ``k``.
        energy_kept: svd methods: the share of the merged matrix's energy ``||M||_F^2`` the rank-k factors keep;
            1.0 for the other methods (nothing is truncated).
    """

    A: Tensor
    B: Tensor
    rank: int
    energy_kept: float


def _exact_svd(terms: Sequence[Term], settings: MergeSettings) -> Combined:
    fit = truncate_terms([(t.coefficient, t.B, t.A) for t in terms], settings.rank, scale=settings.scale)
    return Combined(fit.A, fit.B, fit.rank, fit.energy_kept)


def _roots(terms: Sequence[Term], scale: float) -> tuple[list[float], list[float]]:
    """The weights ``sgn(c_i) sqrt|c_i / s|`` (for A) and ``sqrt|c_i / s|`` (for B)."""
    roots = [math.sqrt(abs(t.coefficient / scale)) for t in terms]
    return [math.copysign(r, t.coefficient) for r, t in zip(roots, terms)], roots


def _cat(terms: Sequence[Term], settings: MergeSettings) -> Combined:
    work = compute_dtype(*(x for t in terms for x in (t.A, t.B)))
    for_a, for_b = _roots(terms, settings.scale)
    A = torch.cat([t.A.to(work) * w for t, w in zip(terms, for_a)], dim=0)  # (sum r_i, in)
    B = torch.cat([t.B.to(work) * w for t, w in zip(terms, for_b)], dim=1)  # (out, sum r_i)
    return Combined(A, B, A.shape[0], 1.0)


def _factor_wise(name: str) -> Callable[[Sequence[Term], MergeSettings], Combined]:
    merge = TENSOR_METHODS[name]

    def combine_factors(terms: Sequence[Term], settings: MergeSettings) -> Combined:
        ranks = {t.A.shape[0] for t in terms}
        if len(ranks) != 1:
            raise ValueError(f"{name} merges A and B factor by factor and needs equal ranks, got {sorted(ranks)}")
        work = compute_dtype(*(x for t in terms for x in (t.A, t.B)))
        for_a, for_b = _roots(terms, settings.scale)
        density = 1.0 if settings.density is None else settings.density
        A = merge([t.A.to(work) for t in terms], for_a, density, settings.majority_sign, settings.generator)
        B = merge([t.B.to(work) for t in terms], for_b, density, settings.majority_sign, settings.generator)
        return Combined(A, B, A.shape[0], 1.0)  # (r, in), (out, r)

    return combine_factors


def _dense(name: str) -> Callable[[Sequence[Term], MergeSettings], Combined]:
    merge = TENSOR_METHODS[name]

    def combine_dense(terms: Sequence[Term], settings: MergeSettings) -> Combined:
        work = compute_dtype(*(x for t in terms for x in (t.A, t.B)))
        deltas = [(t.B.to(work) @ t.A.to(work)) * t.scale for t in terms]  # (out, r) @ (r, in) -> (out, in)
        density = 1.0 if settings.density is None else settings.density
        M = merge(deltas, [t.weight for t in terms], density, settings.majority_sign, settings.generator)
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)  # (out, p), (p,), (p, in), p = min(out, in)
        total = float(torch.linalg.vector_norm(M, dtype=torch.float64)) ** 2
        fit = fit_from_svd(TruncatedSvd(U, S, Vh), total, settings.rank, scale=settings.scale)
        return Combined(fit.A, fit.B, fit.rank, fit.energy_kept)

    return combine_dense


@dataclass(frozen=True)
class Method:
    """A merge method and what it needs.

    Attributes:
        name: PEFT's ``combination_type``.
        family: ``exact``, ``factor-wise`` or ``dense`` (see the module docstring).
        formula: one line for reports and ``--help``.
        combine: ``combine(terms, settings) -> Combined``.
        takes_rank: the new rank is a parameter (the svd methods).
        equal_ranks: every input must have the same rank on a module.
        uses_density: trims or drops (needs ``density``).
        uses_sign: elects a sign (``majority_sign`` applies; needs two adapters to mean anything).
        random: draws random numbers (seeded).
    """

    name: str
    family: str
    formula: str
    combine: Callable[[Sequence[Term], MergeSettings], Combined]
    takes_rank: bool = False
    equal_ranks: bool = False
    uses_density: bool = False
    uses_sign: bool = False
    random: bool = False

    @property
    def min_adapters(self) -> int:
        """2 for the methods that elect a sign across adapters, else 1."""
        return 2 if self.uses_sign else 1


def _factor_method(name: str, formula: str, **flags) -> Method:
    return Method(name, "factor-wise", formula, _factor_wise(name), equal_ranks=True, **flags)


def _dense_method(name: str, formula: str, **flags) -> Method:
    return Method(name + "_svd", "dense", formula, _dense(name), takes_rank=True, **flags)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("svd", "exact", "best rank-k approximation of sum_i w_i D_i (exact SVD from the factors)", _exact_svd,
               takes_rank=True),
        Method("cat", "exact", "sum_i w_i D_i exactly, factors concatenated (rank sum_i r_i)", _cat),
        _factor_method("linear", "A = sum_i sgn(c_i) sqrt|c_i| A_i, B = sum_i sqrt|c_i| B_i (cross terms)"),
        _factor_method("ties", "TIES on A and on B: trim to density, elect sign, disjoint mean", uses_density=True,
                       uses_sign=True),
        _factor_method("dare_linear", "DARE on A and on B: random drop to density, rescale, weighted sum",
                       uses_density=True, random=True),
        _factor_method("dare_ties", "DARE on A and on B: random drop, rescale, elect sign, disjoint mean",
                       uses_density=True, uses_sign=True, random=True),
        _factor_method("magnitude_prune", "on A and on B: trim to density by magnitude, weighted sum",
                       uses_density=True),
        _dense_method("ties", "TIES on the dense deltas, then the best rank-k approximation", uses_density=True,
                      uses_sign=True),
        _dense_method("dare_linear", "DARE (drop, rescale, sum) on the dense deltas, then rank k", uses_density=True,
                      random=True),
        _dense_method("dare_ties", "DARE + TIES sign election on the dense deltas, then rank k", uses_density=True,
                      uses_sign=True, random=True),
        _dense_method("magnitude_prune", "trim the dense deltas by magnitude, weighted sum, then rank k",
                      uses_density=True),
    )
}
"""Every merge method by name (PEFT's ``combination_type`` values)."""


def combine(method: str, terms: Sequence[Term], settings: MergeSettings = MergeSettings()) -> Combined:
    """Merge one module's terms with ``method`` (see the module docstring for each formula).

    Args:
        method: a key of :data:`METHODS`.
        terms: the adapters that have this module (at least one), each with its weight and scale.
        settings: rank (svd methods), density (ties/dare/magnitude_prune), majority sign, generator, target scale.

    Returns:
        :class:`Combined`: factors with ``settings.scale * B @ A`` the merged delta.

    Raises:
        ValueError: an unknown method, no terms, a missing rank or density, a density outside (0, 1], an unknown
            sign method, a scale <= 0, or unequal ranks for a factor-wise method.
    """
    spec = METHODS.get(method)
    if spec is None:
        raise ValueError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}")
    if not terms:
        raise ValueError("combine needs at least one term")
    if not settings.scale > 0:
        raise ValueError(f"the target LoRA scale must be positive, got {settings.scale}")
    if spec.takes_rank and (settings.rank is None or settings.rank < 1):
        raise ValueError(f"{method} needs a rank >= 1, got {settings.rank}")
    if spec.uses_density:
        if settings.density is None:
            raise ValueError(f"{method} needs a density in (0, 1]")
        check_density(settings.density)
    if settings.majority_sign not in SIGN_METHODS:
        raise ValueError(f"unknown majority sign method {settings.majority_sign!r}; use one of {SIGN_METHODS}")
    return spec.combine(terms, settings)
