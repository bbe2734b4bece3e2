"""SVD of sums of low-rank products through QR of the stacked factors, against the dense SVD."""

from __future__ import annotations

import pytest
import torch

from lorasurg.engine.lowrank import lowrank_svd, stack_terms
from lorasurg.errors import ShapeMismatchError
from tests.conftest import tol


def _term(out: int, r: int, n_in: int, scale: float, gen: torch.Generator, dtype=torch.float64):
    return scale, torch.randn(out, r, generator=gen, dtype=dtype), torch.randn(r, n_in, generator=gen, dtype=dtype)


def _dense(terms) -> torch.Tensor:
    return sum(s * B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1) for s, B, A in terms)  # (out, in)


@pytest.mark.parametrize("out, n_in, ranks", [(30, 20, [4]), (16, 40, [3, 5, 2]), (12, 9, [8, 8]), (50, 50, [1])])
def test_matches_the_dense_svd(out, n_in, ranks, gen):
    terms = [_term(out, r, n_in, 0.5 + i, gen) for i, r in enumerate(ranks)]
    dense = _dense(terms)
    U, S, Vh = lowrank_svd(terms)
    k = min(sum(ranks), out, n_in)
    assert U.shape == (out, k) and S.shape == (k,) and Vh.shape == (k, n_in)
    torch.testing.assert_close(S, torch.linalg.svdvals(dense)[:k], **tol(torch.float64))
    torch.testing.assert_close((U * S) @ Vh, dense, **tol(torch.float64))
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=torch.float64), **tol(torch.float64))
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(k, dtype=torch.float64), **tol(torch.float64))


def test_truncation_is_the_best_approximation(gen):
    terms = [_term(40, 6, 30, 1.0, gen), _term(40, 6, 30, -0.7, gen)]
    dense = _dense(terms)
    U, S, Vh = lowrank_svd(terms, rank=5)
    assert S.shape == (5,)
    optimal = torch.linalg.svdvals(dense)[5:].pow(2).sum().sqrt()
    torch.testing.assert_close(torch.linalg.norm(dense - (U * S) @ Vh), optimal, **tol(torch.float64))


def test_difference_of_equal_terms_is_zero(gen):
    """PiSSA conversion's B A - B0 A0 with B = B0, A = A0: all singular values vanish."""
    scale, B, A = _term(20, 4, 15, 1.0, gen)
    S = lowrank_svd([(scale, B, A), (-scale, B, A)]).S
    assert float(S.max()) < 1e-12


def test_conv_layouts_and_float32(gen):
    B = torch.randn(6, 3, 1, 1, generator=gen)  # (out, r, 1, 1)
    A = torch.randn(3, 2, 3, 3, generator=gen)  # (r, in, kh, kw)
    U, S, Vh = lowrank_svd([(2.0, B, A)])
    assert S.dtype == torch.float32 and Vh.shape == (3, 18)
    torch.testing.assert_close((U * S) @ Vh, 2.0 * B.reshape(6, 3) @ A.reshape(3, 18), rtol=1e-4, atol=1e-5)
    Bs, As = stack_terms([(2.0, B, A), (1.0, B, A)])
    assert Bs.shape == (6, 6) and As.shape == (6, 18)


def test_bad_terms_are_all_listed(gen):
    good = _term(8, 2, 5, 1.0, gen)
    wrong_rank = (1.0, torch.zeros(8, 3), torch.zeros(2, 5))
    wrong_shape = (1.0, torch.zeros(9, 2), torch.zeros(2, 5))
    with pytest.raises(ShapeMismatchError) as info:
        lowrank_svd([good, wrong_rank, wrong_shape])
    message = str(info.value)
    assert "term 1: B (8, 3) has rank 3 but A (2, 5) has rank 2" in message
    assert "term 2: delta shape (9, 5) differs from term 0's (8, 5)" in message
    with pytest.raises(ValueError, match=r"at least one \(scale, B, A\) term"):
        lowrank_svd([])
    with pytest.raises(ValueError, match="rank >= 1, got 0"):
        lowrank_svd([good], rank=0)
