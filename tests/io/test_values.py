"""``all_finite``: one aminmax pass finds a NaN or an infinity anywhere, in every float dtype."""

from __future__ import annotations

import pytest
import torch

from lorasurg.io.values import all_finite, describe_nonfinite


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 57, -1])
def test_a_nonfinite_value_anywhere_is_found(dtype, bad, where, gen):
    t = torch.randn(8, 16, generator=gen).to(dtype)
    assert all_finite(t)
    t.view(-1)[where] = bad
    assert not all_finite(t)
    assert describe_nonfinite(t) == ("1 NaN and 0 inf" if bad != bad else "0 NaN and 1 inf")


def test_tensors_without_values_to_check_are_finite():
    assert all_finite(torch.empty(0)) and all_finite(torch.arange(5)) and all_finite(torch.ones(3, dtype=torch.bool))
    assert all_finite(torch.empty(4, 4, device="meta"))
