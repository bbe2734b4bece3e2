"""Re-ranking factors exactly: truncate_terms / truncate_factors against dense float64 SVDs, padding, policies."""

from __future__ import annotations

import math

import pytest
import torch

from lorasurg.engine.factors import pad_factors
from lorasurg.engine.lowrank import lowrank_norm_sq, truncate_factors, truncate_terms
from lorasurg.engine.ranks import parse_rank_policy
from tests.conftest import tol


def _factors(out: int, r: int, n_in: int, gen, decay: float = 0.0, dtype=torch.float32):
    """B (out, r), A (r, in) whose product has singular values ~ i^-decay."""
    B = torch.linalg.qr(torch.randn(out, r, generator=gen, dtype=torch.float64)).Q
    A = torch.linalg.qr(torch.randn(n_in, r, generator=gen, dtype=torch.float64)).Q.T
    s = torch.arange(1, r + 1, dtype=torch.float64) ** -decay
    return (B * s).to(dtype), A.to(dtype)


@pytest.mark.parametrize("decay", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("out, n_in, r, k", [(256, 192, 64, 16), (64, 300, 32, 5), (40, 40, 8, 7)])
def test_truncation_within_1_0001_of_eckart_young(out, n_in, r, k, decay, gen):
    """Frobenius error of the rank-k factors vs the optimum from a dense float64 SVD of the delta."""
    B, A = _factors(out, r, n_in, gen, decay)
    scale = 0.5
    dense = scale * B.double() @ A.double()  # (out, in)
    S = torch.linalg.svdvals(dense)
    optimal = float(S[k:].pow(2).sum().sqrt())
    fit = truncate_factors(A, B, scale, k)
    assert fit.A.shape == (k, n_in) and fit.B.shape == (out, k) and fit.rank == k
    error = float(torch.linalg.norm(dense - scale * fit.B.double() @ fit.A.double()))
    assert error <= 1.0001 * optimal
    assert fit.relative_error == pytest.approx(optimal / float(S.pow(2).sum().sqrt()), rel=1e-4)
    torch.testing.assert_close(fit.S.double(), S[: fit.S.shape[0]], rtol=1e-5, atol=1e-6 * float(S[0]))


def test_equal_rank_is_lossless(gen):
    B, A = _factors(48, 8, 30, gen, 0.5)
    fit = truncate_factors(A, B, 2.0, 8)
    torch.testing.assert_close(2.0 * fit.B @ fit.A, 2.0 * B @ A, **tol(torch.float32))
    assert fit.energy_kept == pytest.approx(1.0) and fit.relative_error < 1e-3


def test_out_scale_and_balanced_split(gen):
    B, A = _factors(20, 6, 15, gen, 1.0, torch.float64)
    fit = truncate_factors(A, B, 3.0, 4, out_scale=0.25)
    dense = 3.0 * B @ A
    U, S, Vh = torch.linalg.svd(dense)
    torch.testing.assert_close(0.25 * fit.B @ fit.A, (U[:, :4] * S[:4]) @ Vh[:4], **tol(torch.float64))
    # A and B carry the same singular values sqrt(S / scale)
    torch.testing.assert_close(fit.A.norm(dim=1), fit.B.norm(dim=0), **tol(torch.float64))


def test_padding_to_a_higher_rank(gen):
    B, A = _factors(30, 3, 20, gen)
    fit = truncate_factors(A, B, 1.0, 8)
    assert fit.A.shape == (8, 20) and fit.B.shape == (30, 8) and fit.rank == 3
    assert torch.count_nonzero(fit.A[3:]) == 0 and torch.count_nonzero(fit.B[:, 3:]) == 0
    torch.testing.assert_close(fit.B @ fit.A, B @ A, **tol(torch.float32))
    capped = truncate_factors(A, B, 1.0, 100)  # clamped at min(out, in) = 20
    assert capped.A.shape == (20, 20)
    unpadded = truncate_factors(A, B, 1.0, 8, pad=False)
    assert unpadded.A.shape == (3, 20)
    full = truncate_factors(A, B, 1.0)  # no rank: every singular value, no padding
    assert full.A.shape == (3, 20)


def test_policy_on_the_exact_spectrum(gen):
    B, A = _factors(64, 16, 50, gen, 1.0)
    S = torch.linalg.svdvals(B.double() @ A.double())
    policy = parse_rank_policy("energy:0.9")
    fit = truncate_factors(A, B, 1.0, policy=policy)
    expected = policy.choose(S, 16)
    assert fit.rank == expected and fit.A.shape == (expected, 50)
    assert fit.energy_kept >= 0.9
    assert truncate_factors(A, B, 1.0, 4, policy=policy).rank == min(4, expected)  # r caps the policy
    zero = truncate_factors(torch.zeros(4, 10), torch.zeros(12, 4), 1.0, policy=policy)
    assert zero.rank == 0 and zero.A.shape == (0, 10) and zero.total_sq == 0.0


def test_sum_of_terms_matches_dense(gen):
    B1, A1 = _factors(40, 6, 25, gen, 0.3)
    B2, A2 = _factors(40, 4, 25, gen)
    terms = [(0.7, B1, A1), (-1.3, B2, A2)]
    dense = sum(s * B.double() @ A.double() for s, B, A in terms)
    fit = truncate_terms(terms, 5)
    U, S, Vh = torch.linalg.svd(dense)
    torch.testing.assert_close((fit.B @ fit.A).double(), (U[:, :5] * S[:5]) @ Vh[:5], rtol=1e-5, atol=1e-6)
    assert fit.total_sq == pytest.approx(float(dense.pow(2).sum()), rel=1e-6)


def test_lowrank_norm_sq(gen):
    B1, A1 = _factors(30, 5, 20, gen, 0.2)
    B2, A2 = _factors(30, 3, 20, gen)
    terms = [(0.5, B1, A1), (-2.0, B2, A2)]
    dense = 0.5 * B1.double() @ A1.double() - 2.0 * B2.double() @ A2.double()
    assert lowrank_norm_sq(terms) == pytest.approx(float(dense.pow(2).sum()), rel=1e-10)
    # a difference of equal terms is exactly representable as ~0, not sqrt(eps)-sized noise
    assert math.sqrt(lowrank_norm_sq([(1.0, B1, A1), (-1.0, B1, A1)])) < 1e-6


@pytest.mark.parametrize("a_shape, b_shape", [((3, 8), (5, 3)), ((3, 4, 2, 2), (6, 3, 1, 1)), ((2, 4, 3), (5, 2, 1))])
def test_pad_factors_is_exact(a_shape, b_shape, gen):
    A, B = torch.randn(a_shape, generator=gen), torch.randn(b_shape, generator=gen)
    A2, B2 = pad_factors(A, B, 7)
    assert A2.shape == (7, *a_shape[1:]) and B2.shape == (b_shape[0], 7, *b_shape[2:])
    assert torch.equal(A2[: a_shape[0]], A) and torch.equal(B2[:, : b_shape[1]], B)
    assert torch.count_nonzero(A2[a_shape[0]:]) == 0 and torch.count_nonzero(B2[:, b_shape[1]:]) == 0
    assert pad_factors(A, B, 2) == (A, B)
