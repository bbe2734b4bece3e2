"""Shared test helpers: seeded RNG, per-dtype tolerances, and ulp-bounded comparison of kernel results."""

from __future__ import annotations

from typing import Optional, Union

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


def assert_close_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 4, *,
                      magnitude: Union[None, float, torch.Tensor] = None, msg: Optional[str] = None) -> None:
    """Assert ``|actual - expected| <= ulps * eps * magnitude`` elementwise (``eps = torch.finfo(dtype).eps``).

    For comparing results of a matmul, QR or SVD that should agree up to the rounding of the kernels, which differs
    between CPUs (``torch.equal`` is for copies, RNG draws and lossless I/O only). ``eps * |x|`` bounds the spacing
    of floats at ``x``, so with the default ``magnitude = |expected|`` this reads "within ``ulps`` ulps". When the
    rounding error scales with the operands rather than with the result (a difference of nearly equal terms, a
    product's cancellation), pass the operands' scale, e.g. ``|W| + |s B| @ |A|`` for ``W - s B @ A`` (the
    error of a k-term dot product is at most ``k * eps/2`` times ``|B| @ |A|``, Higham, *Accuracy and Stability of
    Numerical Algorithms*, 2nd ed., section 3.5). ``magnitude`` broadcasts (a float gives one scale for the tensor).

    Shape and dtype must match exactly, and NaNs must coincide; a zero magnitude demands equality.
    """
    label = f"{msg}: " if msg else ""
    assert actual.shape == expected.shape, f"{label}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{label}dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(a.isnan(), e.isnan()), f"{label}NaNs differ"
    scale = e.abs() if magnitude is None else torch.as_tensor(magnitude, dtype=torch.float64).detach().cpu().abs()
    bound = ulps * torch.finfo(expected.dtype).eps * scale.expand_as(e)
    diff = torch.where(e.isnan(), torch.zeros_like(e), (a - e).abs())
    over = diff > bound
    if over.any():
        worst = int(torch.argmax(torch.where(over, diff / bound.clamp_min(1e-300), torch.zeros_like(diff))))
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e.shape))
        raise AssertionError(
            f"{label}{int(over.sum())} of {e.numel()} elements differ by more than {ulps} ulps of their magnitude; "
            f"worst at {index}: {float(a[index])!r} vs {float(e[index])!r} (allowed {float(bound[index]):.3g})"
        )


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator, so every test's random data is reproducible."""
    return torch.Generator().manual_seed(0)
