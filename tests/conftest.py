"""Shared test helpers: seeded RNG and per-dtype tolerances."""

from __future__ import annotations

import pytest
import torch


TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def tol(dtype: torch.dtype) -> dict:
    """rtol/atol for comparing results computed in ``dtype``; one table for the whole suite."""
    return TOLERANCES[dtype]


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator, so every test's random data is reproducible."""
    return torch.Generator().manual_seed(0)
