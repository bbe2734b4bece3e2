"""Rank policies: exact ranks on hand-made spectra, kohya/mergekit semantics, parsing and its errors."""

from __future__ import annotations

import math

import pytest
import torch

from lorasurg.engine.ranks import RANK_POLICIES, RankPolicy, parse_rank_policy
from lorasurg.errors import ConfigError

# S = 4, 2, 1, 1: squares 16, 4, 1, 1 (total 22); sums 4, 6, 7, 8
S = torch.tensor([4.0, 2.0, 1.0, 1.0])


@pytest.mark.parametrize(
    "text, max_rank, expected",
    [
        ("fixed", 3, 3),
        ("fixed", 10, 4),  # never more than the singular values given
        ("fixed:2", 3, 2),
        ("2", 3, 2),
        ("16", 3, 3),
        ("energy:0.7", 4, 1),  # 16/22 = 0.727
        ("energy:0.8", 4, 2),  # 20/22 = 0.909
        ("energy:0.95", 4, 3),  # 21/22 = 0.955
        ("energy:1", 4, 4),
        ("energy:1", 2, 2),  # capped
        ("sv_fro:0.85", 4, 1),  # sqrt(16/22) = 0.853
        ("sv_fro:0.9", 4, 2),  # sqrt(20/22) = 0.953
        ("sv_cumulative:0.5", 4, 1),  # 4/8
        ("sv_cumulative:0.75", 4, 2),  # 6/8
        ("sv_cumulative:0.8", 4, 3),  # 7/8
        ("sv_ratio:1", 4, 1),  # nothing > 4/1, at least 1 (kohya)
        ("sv_ratio:2", 4, 1),  # > 2: only 4
        ("sv_ratio:3", 4, 2),  # > 1.33: 4, 2
        ("sv_ratio:4.5", 4, 4),  # > 0.89: all
        ("sv_ratio:4.5", 3, 3),
        ("sv_epsilon:0.5", 4, 4),
        ("sv_epsilon:1", 4, 2),  # strictly greater, as mergekit
        ("sv_epsilon:5", 4, 0),  # may be 0: the module is left out
        ("sv_epsilon:0", 3, 3),  # mergekit: epsilon 0 disables the threshold
    ],
)
def test_policies_on_a_hand_made_spectrum(text, max_rank, expected):
    assert parse_rank_policy(text).choose(S, max_rank) == expected


@pytest.mark.parametrize("text", ["fixed", "energy:0.5", "sv_fro:0.5", "sv_cumulative:0.5", "sv_ratio:2", "sv_epsilon:0.1"])
def test_a_zero_matrix_gets_rank_zero(text):
    assert parse_rank_policy(text).choose(torch.zeros(5), 4) == 0
    assert parse_rank_policy(text).choose(torch.zeros(0), 4) == 0


def test_energy_uses_the_matrix_total_with_a_truncated_spectrum():
    """With only the leading values known, the total comes from ||M||_F^2; F not reached means the cap."""
    leading = S[:2]  # the caller computed 2 triplets; the full total is 22
    assert parse_rank_policy("energy:0.8").choose(leading, 2, total_sq=22.0) == 2
    assert parse_rank_policy("energy:0.95").choose(leading, 2, total_sq=22.0) == 2  # capped, not reached
    assert parse_rank_policy("energy:0.8").choose(leading, 2, total_sq=1000.0) == 2
    assert parse_rank_policy("energy:0.7").choose(leading, 2) == 1  # default total: sum(S^2) = 20


def _kohya_rank(S: torch.Tensor, method: str, target: float, cap: int) -> int:
    """sd-scripts resize_lora.py's rank for a nonzero matrix: index functions, +1, capped by new_rank."""
    if method == "sv_ratio":
        index = int((S > S[0] / target).sum()) - 1
    elif method == "sv_fro":
        index = int(torch.searchsorted(torch.cumsum(S.pow(2), 0) / S.pow(2).sum(), target**2))
    else:
        index = int(torch.searchsorted(torch.cumsum(S, 0) / S.sum(), target))
    return min(max(0, min(index, len(S) - 1)) + 1, cap)


@pytest.mark.parametrize("method", ["sv_ratio", "sv_fro", "sv_cumulative"])
def test_kohya_semantics_on_random_spectra(method, gen):
    for trial in range(20):
        S_rand = torch.rand(30, generator=gen, dtype=torch.float64).pow(3).sort(descending=True).values
        target = {"sv_ratio": 1 + 20 * float(torch.rand(1, generator=gen))}.get(method, float(torch.rand(1, generator=gen)))
        for cap in (4, 16, 30):
            policy = RankPolicy(method, target)
            assert policy.choose(S_rand, cap) == _kohya_rank(S_rand, method, target, cap), (trial, target, cap)


def test_mergekit_epsilon_semantics(gen):
    S_rand = torch.rand(40, generator=gen, dtype=torch.float64).sort(descending=True).values
    for epsilon in (0.05, 0.3, 0.77):
        for cap in (5, 40):
            assert RankPolicy("sv_epsilon", epsilon).choose(S_rand, cap) == min(int((S_rand > epsilon).sum()), cap)


def test_only_sv_cumulative_needs_the_full_spectrum():
    needs = {name for name, spec in RANK_POLICIES.items() if spec.needs_full_spectrum}
    assert needs == {"sv_cumulative"}
    assert parse_rank_policy("sv_cumulative:0.9").needs_full_spectrum
    assert not parse_rank_policy("energy:0.9").needs_full_spectrum


@pytest.mark.parametrize(
    "text, canonical",
    [("fixed", "fixed"), ("8", "fixed:8"), (" Energy:0.90 ", "energy:0.9"), ("SV_RATIO:10", "sv_ratio:10"),
     ("sv_epsilon:1e-3", "sv_epsilon:0.001"), ("sv_fro:0.5", "sv_fro:0.5")],
)
def test_parse_round_trips(text, canonical):
    policy = parse_rank_policy(text)
    assert str(policy) == canonical
    assert parse_rank_policy(str(policy)) == policy


@pytest.mark.parametrize(
    "text, message",
    [
        ("svd", "unknown rank policy 'svd'; use one of 'fixed'"),
        ("energy", "rank policy 'energy' needs a value: energy:V with V a fraction F with 0 < F <= 1"),
        ("energy:lots", "rank policy 'energy:lots': 'lots' is not a fraction F with 0 < F <= 1"),
        ("energy:1.5", "rank policy 'energy:1.5': the value must be a fraction F with 0 < F <= 1, got 1.5"),
        ("sv_fro:0", "the value must be a fraction F with 0 < F <= 1, got 0.0"),
        ("sv_cumulative:nan", "the value must be a fraction F with 0 < F <= 1, got nan"),
        ("sv_ratio:0.5", "rank policy 'sv_ratio:0.5': the value must be a ratio X >= 1, got 0.5"),
        ("sv_epsilon:-1", "the value must be a threshold E >= 0, got -1.0"),
        ("fixed:0", "rank policy 'fixed:0': the value must be an integer N >= 1, got 0"),
        ("fixed:2.5", "rank policy 'fixed:2.5': '2.5' is not an integer N >= 1"),
        ("0", "the value must be an integer N >= 1, got 0"),
    ],
)
def test_parse_errors_say_what_is_valid(text, message):
    with pytest.raises(ConfigError) as info:
        parse_rank_policy(text)
    assert message in str(info.value)


def test_choose_rejects_bad_arguments():
    policy = parse_rank_policy("energy:0.9")
    with pytest.raises(ValueError, match=r"rank policy energy:0.9: max_rank must be >= 1, got 0"):
        policy.choose(S, 0)
    with pytest.raises(ValueError, match=r"singular values must be 1-D, got shape \(2, 2\)"):
        policy.choose(torch.ones(2, 2), 3)
    with pytest.raises(ConfigError, match="unknown rank policy 'magic'"):
        RankPolicy("magic", 1.0)


def test_effective_rank():
    from lorasurg.engine.ranks import effective_rank

    assert effective_rank(torch.full((5,), 2.0)) == pytest.approx(5.0, rel=1e-12)  # flat: every value counts
    assert effective_rank(torch.tensor([4.0, 0.0, 0.0])) == pytest.approx(1.0, rel=1e-12)
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-12)
    assert effective_rank(torch.zeros(3)) == 0.0 and effective_rank(torch.zeros(0)) == 0.0
