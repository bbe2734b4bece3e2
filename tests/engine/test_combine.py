"""Every merge method on one module against its dense definition (float64), the method table, and refusals."""

from __future__ import annotations

import math

import pytest
import torch

from lorasurg.engine.combine import METHODS, MergeSettings, Term, combine
from lorasurg.engine.sparsify import TENSOR_METHODS, magnitude_trim
from tests.conftest import tol

PEFT_COMBINATION_TYPES = {"svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                          "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd"}


def _terms(ranks=(4, 4), weights=(0.7, -0.4), scales=(2.0, 0.5), out=24, n_in=18, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [Term(w, s, torch.randn(out, r, generator=gen, dtype=dtype), torch.randn(r, n_in, generator=gen, dtype=dtype))
            for r, w, s in zip(ranks, weights, scales)]


def _exact(terms) -> torch.Tensor:
    return sum(t.weight * t.scale * t.B @ t.A for t in terms)  # (out, in)


def _delta(result, scale=1.0) -> torch.Tensor:
    return scale * result.B @ result.A  # (out, k) @ (k, in) -> (out, in)


def _best(matrix: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def test_the_table_has_every_peft_combination_type():
    assert set(METHODS) == PEFT_COMBINATION_TYPES
    for name, spec in METHODS.items():
        assert spec.name == name and spec.formula
        assert spec.takes_rank == name.endswith("svd")
        assert spec.equal_ranks == (spec.family == "factor-wise")
        assert spec.uses_density == (name not in ("svd", "cat", "linear"))
        assert spec.random == name.startswith("dare")
        assert spec.min_adapters == (2 if "ties" in name else 1)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_svd_is_the_best_approximation_of_the_weighted_sum(scale):
    terms = _terms(ranks=(5, 3))
    result = combine("svd", terms, MergeSettings(rank=4, scale=scale))
    torch.testing.assert_close(_delta(result, scale), _best(_exact(terms), 4), **tol(torch.float64))
    assert result.rank == 4
    S = torch.linalg.svdvals(_exact(terms))
    assert result.energy_kept == pytest.approx(float(S[:4].pow(2).sum() / S.pow(2).sum()), rel=1e-10)


def test_svd_pads_when_the_sum_has_a_lower_rank():
    terms = _terms(ranks=(2, 1))
    result = combine("svd", terms, MergeSettings(rank=6))
    assert result.A.shape == (6, 18) and result.rank == 3
    torch.testing.assert_close(_delta(result), _exact(terms), **tol(torch.float64))


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_cat_is_the_exact_weighted_sum(scale):
    terms = _terms(ranks=(3, 5), weights=(0.5, -2.0))
    result = combine("cat", terms, MergeSettings(scale=scale))
    assert result.A.shape == (8, 18) and result.B.shape == (24, 8)
    torch.testing.assert_close(_delta(result, scale), _exact(terms), **tol(torch.float64))


def test_linear_keeps_peft_cross_terms():
    """B @ A = (sum_i sqrt|c_i| B_i) (sum_j sgn(c_j) sqrt|c_j| A_j): cross terms included, by definition."""
    terms = _terms(weights=(0.7, -0.4))
    c = [t.weight * t.scale for t in terms]
    B = sum(math.sqrt(abs(ci)) * t.B for ci, t in zip(c, terms))
    A = sum(math.copysign(math.sqrt(abs(ci)), ci) * t.A for ci, t in zip(c, terms))
    result = combine("linear", terms)
    torch.testing.assert_close(_delta(result), B @ A, **tol(torch.float64))
    assert float((B @ A - _exact(terms)).norm()) > 0.1 * float(_exact(terms).norm())  # the cross terms are real
    half = combine("linear", terms, MergeSettings(scale=0.5))
    torch.testing.assert_close(_delta(half, 0.5), B @ A, **tol(torch.float64))


def test_linear_of_one_adapter_is_exact():
    terms = _terms(ranks=(4,), weights=(-1.5,), scales=(0.5,))
    torch.testing.assert_close(_delta(combine("linear", terms)), _exact(terms), **tol(torch.float64))


@pytest.mark.parametrize("name", ["ties", "magnitude_prune"])
def test_factor_wise_trimming_applies_the_tensor_method_to_A_and_to_B(name):
    terms = _terms(ranks=(4, 4, 4), weights=(1.0, 0.5, -0.3), scales=(2.0, 2.0, 1.0))
    c = [t.weight * t.scale for t in terms]
    wa = [math.copysign(math.sqrt(abs(x)), x) for x in c]
    wb = [math.sqrt(abs(x)) for x in c]
    merge = TENSOR_METHODS[name]
    A = merge([t.A for t in terms], wa, 0.5, "frequency", None)
    B = merge([t.B for t in terms], wb, 0.5, "frequency", None)
    result = combine(name, terms, MergeSettings(density=0.5, majority_sign="frequency"))
    torch.testing.assert_close(result.A, A, **tol(torch.float64))
    torch.testing.assert_close(result.B, B, **tol(torch.float64))
    # density 1 trims nothing: magnitude_prune is then linear
    if name == "magnitude_prune":
        full = combine(name, terms, MergeSettings(density=1.0))
        torch.testing.assert_close(_delta(full), _delta(combine("linear", terms)), **tol(torch.float64))


def test_dense_methods_trim_the_dense_deltas_then_truncate():
    terms = _terms(ranks=(3, 5), scales=(2.0, 0.5))
    deltas = [t.scale * t.B @ t.A for t in terms]
    trimmed = sum(t.weight * magnitude_trim(d, 0.3) for t, d in zip(terms, deltas))
    result = combine("magnitude_prune_svd", terms, MergeSettings(rank=4, density=0.3))
    torch.testing.assert_close(_delta(result), _best(trimmed, 4), **tol(torch.float64))
    S = torch.linalg.svdvals(trimmed)
    assert result.energy_kept == pytest.approx(float(S[:4].pow(2).sum() / S.pow(2).sum()), rel=1e-10)
    ties = TENSOR_METHODS["ties"](deltas, [t.weight for t in terms], 0.3, "total", None)
    result = combine("ties_svd", terms, MergeSettings(rank=6, density=0.3))
    torch.testing.assert_close(_delta(result), _best(ties, 6), **tol(torch.float64))


def test_dense_svd_at_density_one_is_svd():
    terms = _terms(ranks=(3, 5))
    a = combine("magnitude_prune_svd", terms, MergeSettings(rank=4, density=1.0))
    b = combine("svd", terms, MergeSettings(rank=4))
    torch.testing.assert_close(_delta(a), _delta(b), **tol(torch.float64))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_is_seeded(name):
    terms = _terms(ranks=(4, 4))

    def run(seed):
        return combine(name, terms, MergeSettings(rank=4, density=0.5, generator=torch.Generator().manual_seed(seed)))

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    assert not torch.equal(_delta(a), _delta(c))


def test_dare_linear_statistics_on_factors():
    """Kept fraction of each factor ~ density; survivors rescaled by 1/density (one adapter, weight 1, scale 1)."""
    gen = torch.Generator().manual_seed(0)
    A, B = torch.rand(16, 400, generator=gen) + 0.1, torch.rand(300, 16, generator=gen) + 0.1
    density = 0.3
    result = combine("dare_linear", [Term(1.0, 1.0, B, A)],
                     MergeSettings(density=density, generator=torch.Generator().manual_seed(5)))
    for merged, original in ((result.A, A), (result.B, B)):
        kept = merged != 0
        sigma = math.sqrt(density * (1 - density) / original.numel())
        assert abs(float(kept.float().mean()) - density) < 5 * sigma
        torch.testing.assert_close(merged[kept], original[kept] / density, **tol(torch.float32))


def test_dare_linear_svd_is_unbiased():
    """The mean over seeds of the dense DARE sum approaches the exact weighted sum (full rank kept)."""
    terms = _terms(ranks=(2, 2), out=6, n_in=5)
    runs = [_delta(combine("dare_linear_svd", terms, MergeSettings(
        rank=5, density=0.5, generator=torch.Generator().manual_seed(s)))) for s in range(3000)]
    mean = torch.stack(runs).mean(0)
    exact = _exact(terms)
    assert float((mean - exact).norm() / exact.norm()) < 0.05


def test_float32_in_float32_out():
    terms = _terms(dtype=torch.float32)
    for name in ("svd", "cat", "linear"):
        result = combine(name, terms, MergeSettings(rank=4))
        assert result.A.dtype == torch.float32


@pytest.mark.parametrize("name, settings, message", [
    ("nope", MergeSettings(), "unknown merge method 'nope'"),
    ("svd", MergeSettings(), "svd needs a rank"),
    ("ties", MergeSettings(), r"ties needs a density in \(0, 1\]"),
    ("ties", MergeSettings(density=0.0), r"density must be in \(0, 1\]"),
    ("ties", MergeSettings(density=0.5, majority_sign="median"), "unknown majority sign"),
    ("cat", MergeSettings(scale=0.0), "scale must be positive"),
])
def test_refusals(name, settings, message):
    with pytest.raises(ValueError, match=message):
        combine(name, _terms(), settings)


def test_factor_wise_needs_equal_ranks():
    with pytest.raises(ValueError, match=r"linear merges A and B factor by factor and needs equal ranks, got \[3, 4\]"):
        combine("linear", _terms(ranks=(3, 4)))
    with pytest.raises(ValueError, match="at least one term"):
        combine("cat", [])
