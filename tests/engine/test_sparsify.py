"""The TIES/DARE/magnitude-prune primitives on their own: hand-computed cases, invariants, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from lorasurg.engine.sparsify import (
    TENSOR_METHODS,
    check_density,
    disjoint_mean,
    elect_sign,
    magnitude_trim,
    random_drop,
    weighted_sum,
)


def test_magnitude_trim_keeps_the_largest_entries():
    t = torch.tensor([[0.1, -3.0, 2.0], [-0.5, 0.0, 1.0]])
    out = magnitude_trim(t, 0.5)  # floor(0.5 * 6) = 3 entries: -3, 2, 1
    assert torch.equal(out, torch.tensor([[0.0, -3.0, 2.0], [0.0, 0.0, 1.0]]))
    assert torch.equal(magnitude_trim(t, 0.34), torch.tensor([[0.0, -3.0, 2.0], [0.0, 0.0, 0.0]]))  # floor(2.04)
    assert magnitude_trim(t, 1.0) is t


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.9])
def test_magnitude_trim_count_and_threshold(density, gen):
    t = torch.randn(37, 23, generator=gen)
    out = magnitude_trim(t, density)
    kept = out != 0
    assert int(kept.sum()) == int(density * t.numel())
    assert torch.equal(out[kept], t[kept])  # survivors are not rescaled
    assert float(t[kept].abs().min()) >= float(t[~kept].abs().max())


def test_random_drop_is_seeded():
    t = torch.randn(50, 40, generator=torch.Generator().manual_seed(3))
    a = random_drop(t, 0.3, torch.Generator().manual_seed(7))
    b = random_drop(t, 0.3, torch.Generator().manual_seed(7))
    c = random_drop(t, 0.3, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert random_drop(t, 1.0) is t


@pytest.mark.parametrize("density", [0.1, 0.5, 0.8])
def test_random_drop_statistics(density):
    """Kept fraction within 5 binomial standard deviations of the density; survivors are exactly t / density
    (division by the density is exact in IEEE arithmetic, so compare with the same division)."""
    t = torch.rand(200, 300, generator=torch.Generator().manual_seed(0)) + 0.1  # no zeros
    out = random_drop(t, density, torch.Generator().manual_seed(1))
    kept = out != 0
    n = t.numel()
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(float(kept.float().mean()) - density) < 5 * sigma
    assert torch.equal(out[kept], t[kept] / density)
    # without rescaling the survivors are the entries themselves
    plain = random_drop(t, density, torch.Generator().manual_seed(1), rescale=False)
    assert torch.equal(plain != 0, kept) and torch.equal(plain[kept], t[kept])


def test_random_drop_expectation():
    """E[drop(t)] = t: the mean of many seeded draws approaches t."""
    t = torch.tensor([1.0, -2.0, 0.5, 4.0])
    draws = torch.stack([random_drop(t, 0.25, torch.Generator().manual_seed(s)) for s in range(4000)])
    torch.testing.assert_close(draws.mean(0), t, rtol=0.1, atol=0.1)


def test_elect_sign_total_and_frequency():
    # entry 0: +1, +1, -5 -> total -3 (elect -), frequency +1 (elect +)
    # entry 1: 0, 0, 0 -> tie at 0 elects +, and zeros never agree
    # entry 2: -1, +1, 0 -> total 0 elects +; frequency 0 elects +
    stacked = torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, 1.0], [-5.0, 0.0, 0.0]])
    total = elect_sign(stacked, "total")
    freq = elect_sign(stacked, "frequency")
    assert total.tolist() == [[False, False, False], [False, False, True], [True, False, False]]
    assert freq.tolist() == [[True, False, False], [True, False, True], [False, False, False]]
    with pytest.raises(ValueError, match="majority sign"):
        elect_sign(stacked, "median")


def test_disjoint_mean():
    weighted = torch.tensor([[2.0, 1.0, 5.0], [4.0, -3.0, 7.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # entry 0: (2 + 4) / 2; entry 1: 1 / 1; entry 2: nothing agrees -> 0 / max(0, 1)
    assert torch.equal(disjoint_mean(weighted, mask), torch.tensor([3.0, 1.0, 0.0]))


def test_ties_by_hand():
    """TIES of two tensors at density 2/3 with weights 2 and 1."""
    t1 = torch.tensor([3.0, -1.0, 0.2])  # trim keeps 3, -1
    t2 = torch.tensor([-4.0, -2.0, 0.1])  # trim keeps -4, -2
    # elected (total, unweighted): entry 0: 3 - 4 < 0 -> -, entry 1: -, entry 2: 0 -> + (nobody agrees)
    out = TENSOR_METHODS["ties"]([t1, t2], [2.0, 1.0], 2 / 3, "total", None)
    assert torch.equal(out, torch.tensor([-4.0, (-2.0 - 2.0) / 2, 0.0]))


def test_linear_and_magnitude_prune_by_hand():
    t1, t2 = torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([0.0, 1.0, -1.0, 2.0])
    assert torch.equal(weighted_sum([t1, t2], [0.5, 2.0]), torch.tensor([0.5, 1.0, -0.5, 4.25]))
    assert torch.equal(TENSOR_METHODS["linear"]([t1, t2], [0.5, 2.0], 1.0, "total", None), weighted_sum([t1, t2], [0.5, 2.0]))
    pruned = TENSOR_METHODS["magnitude_prune"]([t1, t2], [1.0, 1.0], 0.5, "total", None)
    assert torch.equal(pruned, torch.tensor([0.0, -2.0, 3.0, 0.0]) + torch.tensor([0.0, 0.0, -1.0, 2.0]))


def test_dare_methods_are_the_primitives_composed():
    ts = [torch.randn(20, 30, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    weights = [0.5, -1.0, 2.0]
    g = torch.Generator().manual_seed(4)
    dropped = [random_drop(t, 0.4, g) for t in ts]
    linear = TENSOR_METHODS["dare_linear"](ts, weights, 0.4, "total", torch.Generator().manual_seed(4))
    assert torch.equal(linear, weighted_sum(dropped, weights))
    stacked = torch.stack(dropped)
    expected = disjoint_mean(stacked * torch.tensor(weights)[:, None, None], elect_sign(stacked, "frequency"))
    ties = TENSOR_METHODS["dare_ties"](ts, weights, 0.4, "frequency", torch.Generator().manual_seed(4))
    assert torch.equal(ties, expected)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan")])
def test_check_density(bad):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        check_density(bad)
    assert check_density(1) == 1.0
