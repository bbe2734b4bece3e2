"""The suite's own comparison helper: ``assert_close_ulps`` passes what kernel rounding explains and nothing more."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_close_ulps


def test_ulps_are_counted_from_the_magnitude():
    x = torch.tensor([1.0, -2.0, 1024.0, 0.0])
    eps = torch.finfo(torch.float32).eps
    assert_close_ulps(x * (1 + 3 * eps), x, ulps=4)  # the exact zero stays exact
    with pytest.raises(AssertionError, match=r"1 of 4 elements differ by more than 4 ulps.*worst at \(2,\)"):
        assert_close_ulps(x + torch.tensor([0.0, 0.0, 1024 * 8 * eps, 0.0]), x, ulps=4)
    with pytest.raises(AssertionError, match="worst at"):
        assert_close_ulps(torch.tensor([0.0, 1e-30]), torch.zeros(2))  # zero magnitude demands equality


def test_an_operand_magnitude_allows_cancellation_error():
    """``W - P`` with ``W ~= P``: an ulp of P is many ulps of the small result, and the magnitude says so."""
    W, P = torch.tensor([1.0, 1.0]), torch.tensor([1.0 - 2 ** -20, 1.0 - 2 ** -21])
    residual = W - P
    shifted = W - (P + torch.finfo(torch.float32).eps)  # one ulp of P
    with pytest.raises(AssertionError):
        assert_close_ulps(shifted, residual, ulps=2)
    assert_close_ulps(shifted, residual, ulps=2, magnitude=W.abs() + P.abs(), msg="residual")


def test_shape_dtype_and_nans_must_match():
    with pytest.raises(AssertionError, match="dtype"):
        assert_close_ulps(torch.zeros(2, dtype=torch.float64), torch.zeros(2))
    with pytest.raises(AssertionError, match="shape"):
        assert_close_ulps(torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(AssertionError, match="x: NaNs differ"):
        assert_close_ulps(torch.tensor([float("nan")]), torch.tensor([1.0]), msg="x")
    assert_close_ulps(torch.tensor([float("nan"), 2.0]), torch.tensor([float("nan"), 2.0]))
