"""``lorasurg.engine.sketch``: the randomized SVD of an operator, counted in passes."""

from __future__ import annotations

import math

import pytest
import torch

from lorasurg.engine.sketch import operator_svd, sketch_matrix


def _with_spectrum(m: int, n: int, s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    p = s.numel()
    U = torch.linalg.qr(torch.randn(m, p, generator=gen, dtype=torch.float64)).Q  # (m, p)
    V = torch.linalg.qr(torch.randn(n, p, generator=gen, dtype=torch.float64)).Q  # (n, p)
    return (U * s) @ V.T  # (m, p) @ (p, n)


def _svd(M: torch.Tensor, rank: int, **kwargs):
    return operator_svd(lambda X: M @ X, lambda Y: M.T @ Y, tuple(M.shape), rank, **kwargs)  # (m, n) @ (n, c)...


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
@pytest.mark.parametrize("decay", [0.0, 0.5, 1.0])
def test_four_passes_within_one_percent_of_eckart_young(shape, decay, gen):
    """The scheme extract uses: 4 passes, ``rank + max(16, rank // 2)`` extra columns."""
    p = min(shape)
    s = torch.arange(1, p + 1, dtype=torch.float64) ** -decay
    M64 = _with_spectrum(*shape, s, gen)
    M = M64.float()
    for rank in (4, 16, 40):
        U, S, Vh = _svd(M, rank, oversample=rank + max(16, rank // 2), passes=4, generator=gen)
        assert U.shape == (shape[0], rank) and S.shape == (rank,) and Vh.shape == (rank, shape[1])
        optimal = float(s[rank:].pow(2).sum().sqrt())
        error = float(torch.linalg.vector_norm(M64 - (U.double() * S.double()) @ Vh.double()))  # (m, k) @ (k, n)
        assert error <= 1.01 * optimal, (decay, rank, error / optimal)
        # the fit is an orthogonal projection of M: its error follows from ||M|| and S, with no further pass
        from_norms = math.sqrt(float(M64.pow(2).sum()) - float(S.double().pow(2).sum()))
        assert from_norms == pytest.approx(error, rel=1e-4)
        torch.testing.assert_close(U.T @ U, torch.eye(rank), atol=1e-5, rtol=0)
        torch.testing.assert_close(Vh @ Vh.T, torch.eye(rank), atol=1e-5, rtol=0)


@pytest.mark.parametrize("passes", [2, 3, 4, 5])
def test_every_pass_count_is_exact_when_the_sketch_spans_the_matrix(passes, gen):
    M = torch.randn(60, 40, generator=gen, dtype=torch.float64).float()
    calls = []

    def counted(f):
        return lambda X: (calls.append(1), f(X))[1]

    U, S, Vh = operator_svd(counted(lambda X: M @ X), counted(lambda Y: M.T @ Y), (60, 40), 5, oversample=40,
                            passes=passes, generator=gen)
    assert len(calls) == passes
    ref = torch.linalg.svd(M.double(), full_matrices=False)
    torch.testing.assert_close(S.double(), ref.S[:5], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((U * S) @ Vh, ((ref.U[:, :5] * ref.S[:5]) @ ref.Vh[:5]).float(), rtol=1e-3, atol=1e-4)


def test_a_precomputed_sketch_saves_the_first_pass(gen):
    M = torch.randn(80, 50, generator=gen)
    omega = sketch_matrix((80, 50), 6, 10, torch.Generator().manual_seed(3))
    assert omega.shape == (50, 16)
    calls = []
    given = operator_svd(lambda X: (calls.append(1), M @ X)[1], lambda Y: M.T @ Y, (80, 50), 6, oversample=10,
                         sketch=M @ omega)  # (80, 50) @ (50, 16)
    assert len(calls) == 1  # only the third pass; the first was the given sketch
    drawn = _svd(M, 6, oversample=10, generator=torch.Generator().manual_seed(3))
    for a, b in zip(given, drawn):
        torch.testing.assert_close(a, b)


def test_needs_two_passes():
    with pytest.raises(ValueError, match="at least 2 passes, got 1"):
        _svd(torch.zeros(4, 4), 1, oversample=1, passes=1)


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_a_batch_is_each_matrix_factored_alone(shape, gen):
    """The batched call (``batch=E``) gives, for each matrix, what the unbatched call gives with that matrix's
    slice of the test matrix: the same projection, so the same product ``U diag(S) Vh`` to float32 rounding."""
    experts, rank = 5, 6
    s = torch.arange(1, min(shape) + 1, dtype=torch.float64) ** -0.5
    M = torch.stack([_with_spectrum(*shape, s * (e + 1), gen) for e in range(experts)]).float()  # (E, m, n)
    omega = sketch_matrix(shape, rank, 16, torch.Generator().manual_seed(7), batch=experts)
    assert omega.shape == (experts, shape[1], rank + 16)
    U, S, Vh = operator_svd(lambda X: M @ X, lambda Y: M.mT @ Y, shape, rank, oversample=16, batch=experts,
                            sketch=M @ omega)  # (E, m, n) @ (E, n, l)
    assert U.shape == (experts, shape[0], rank) and S.shape == (experts, rank) and Vh.shape == (experts, rank, shape[1])
    for e in range(experts):
        u, s_e, vh = operator_svd(lambda X: M[e] @ X, lambda Y: M[e].T @ Y, shape, rank, oversample=16,
                                  sketch=M[e] @ omega[e])  # (m, n) @ (n, l)
        torch.testing.assert_close(S[e], s_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((U[e] * S[e]) @ Vh[e], (u * s_e) @ vh, rtol=1e-4, atol=1e-5 * float(s_e[0]))
        optimal = float((s * (e + 1))[rank:].pow(2).sum().sqrt())
        error = float(torch.linalg.vector_norm(M[e].double() - (U[e].double() * S[e].double()) @ Vh[e].double()))
        assert error <= 1.01 * optimal


def test_a_batch_draws_its_own_test_matrix(gen):
    M = torch.randn(3, 40, 30, generator=gen)
    U, S, Vh = operator_svd(lambda X: M @ X, lambda Y: M.mT @ Y, (40, 30), 4, oversample=16, batch=3,
                            generator=torch.Generator().manual_seed(1))  # (3, 40, 30) @ (3, 30, l)
    omega = sketch_matrix((40, 30), 4, 16, torch.Generator().manual_seed(1), batch=3)
    again = operator_svd(lambda X: M @ X, lambda Y: M.mT @ Y, (40, 30), 4, oversample=16, batch=3, sketch=M @ omega)
    for a, b in zip((U, S, Vh), again):
        assert torch.equal(a, b)  # the same draw and the same calls: the same bits
