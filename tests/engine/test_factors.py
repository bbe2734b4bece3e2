"""Invariants of lorasurg.engine.factors: the delta a LoRA stands for, merge/unmerge, DoRA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lorasurg.engine.factors import (
    LoraFactors,
    delta_bias,
    delta_matrix,
    delta_weight,
    dora_weight_norm,
    factors_from_matrices,
    lora_scale,
    matrix_to_weight,
    merged_weight,
    unmerged_weight,
    weight_to_matrix,
)
from lorasurg.errors import ShapeMismatchError, UnsupportedError
from tests.conftest import tol


def test_scale_plain_and_rslora():
    assert lora_scale(8, 16) == 2.0
    assert lora_scale(16, 8, use_rslora=True) == pytest.approx(8 / 4)
    with pytest.raises(ValueError, match="r=0"):
        lora_scale(0, 8)


def test_linear_delta_is_scaled_product(gen):
    A = torch.randn(3, 5, generator=gen)
    B = torch.randn(4, 3, generator=gen)
    f = LoraFactors("linear", A, B, scale=0.5)
    torch.testing.assert_close(delta_weight(f, (4, 5)), 0.5 * B @ A)


def test_fan_in_fan_out_delta_is_transposed(gen):
    A, B = torch.randn(2, 6, generator=gen), torch.randn(7, 2, generator=gen)
    f = LoraFactors("linear", A, B, scale=2.0, fan_in_fan_out=True)
    dw = delta_weight(f, (6, 7))  # GPT-2 Conv1D weight is (in, out)
    torch.testing.assert_close(dw, (2.0 * B @ A).T)
    # x @ (W + dW) for a Conv1D equals x @ W + scale * x @ A.T @ B.T
    x = torch.randn(3, 6, generator=gen)
    torch.testing.assert_close(x @ dw, 2.0 * (x @ A.T) @ B.T, **tol(torch.float32))


def test_embedding_delta_matches_lookup(gen):
    A, B = torch.randn(2, 10, generator=gen), torch.randn(4, 2, generator=gen)  # (r, num), (dim, r)
    f = LoraFactors("embedding", A, B, scale=3.0)
    dw = delta_weight(f, (10, 4))
    ids = torch.tensor([1, 7, 7, 0])
    # PEFT's embedding forward: embedding(ids, A.T) @ B.T * scale
    expected = F.embedding(ids, A.T) @ B.T * 3.0
    torch.testing.assert_close(F.embedding(ids, dw), expected, **tol(torch.float32))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_delta_matches_composed_convs(gen, dims):
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    k = (3,) * dims
    A = torch.randn(2, 3, *k, generator=gen, dtype=torch.float64)  # conv in=3 -> r=2, base kernel
    B = torch.randn(5, 2, *((1,) * dims), generator=gen, dtype=torch.float64)  # 1x1 conv r -> out=5
    f = LoraFactors(f"conv{dims}d", A, B, scale=0.25)
    dw = delta_weight(f, (5, 3, *k))
    x = torch.randn(1, 3, *((6,) * dims), generator=gen, dtype=torch.float64)
    torch.testing.assert_close(conv(x, dw), 0.25 * conv(conv(x, A), B), **tol(torch.float64))


def test_matrix_round_trip_and_packing(gen):
    W = torch.randn(4, 3, 2, 2, generator=gen)
    M = weight_to_matrix(W, "conv2d")
    assert M.shape == (4, 12)
    assert torch.equal(matrix_to_weight(M, "conv2d", tuple(W.shape)), W)
    A_mat, B_mat = torch.randn(2, 12, generator=gen), torch.randn(4, 2, generator=gen)
    f = factors_from_matrices(A_mat, B_mat, "conv2d", tuple(W.shape), scale=1.5)
    assert f.A.shape == (2, 3, 2, 2) and f.B.shape == (4, 2, 1, 1)
    torch.testing.assert_close(delta_matrix(f), 1.5 * B_mat @ A_mat)
    with pytest.raises(ShapeMismatchError, match="does not fit"):
        matrix_to_weight(M, "conv2d", (4, 3, 3, 3))


def test_rank_mismatch_is_refused(gen):
    with pytest.raises(ShapeMismatchError, match="A has 3 rows .* B has 2 columns"):
        LoraFactors("linear", torch.randn(3, 5), torch.randn(4, 2), scale=1.0)


def test_bias_delta_is_scaled():
    f = LoraFactors("linear", torch.zeros(1, 2), torch.zeros(3, 1), scale=4.0, bias=torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(delta_bias(f), torch.tensor([4.0, 8.0, 12.0]))
    assert delta_bias(f.with_scale(1.0)).tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("kind,shape,fifo", [
    ("linear", (6, 5), False),
    ("linear", (5, 6), True),
    ("embedding", (9, 6), False),
    ("conv2d", (6, 2, 3, 3), False),
])
def test_merge_unmerge_round_trip(gen, kind, shape, fifo):
    W = torch.randn(*shape, generator=gen, dtype=torch.float64)
    M = weight_to_matrix(W, kind, fifo)
    out, inn = M.shape
    f = factors_from_matrices(torch.randn(2, inn, generator=gen, dtype=torch.float64),
                              torch.randn(out, 2, generator=gen, dtype=torch.float64), kind, shape, 0.7,
                              fan_in_fan_out=fifo)
    merged = merged_weight(f, W)
    torch.testing.assert_close(merged, W + delta_weight(f, shape), **tol(torch.float64))
    torch.testing.assert_close(unmerged_weight(f, merged), W, **tol(torch.float64))


def test_dora_merge_has_magnitude_row_norms_and_unmerges(gen):
    W = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    A, B = torch.randn(2, 5, generator=gen, dtype=torch.float64), torch.randn(6, 2, generator=gen, dtype=torch.float64)
    m = torch.rand(6, generator=gen, dtype=torch.float64) + 0.5
    f = LoraFactors("linear", A, B, scale=0.5, magnitude=m)
    norm = dora_weight_norm(f, W)
    torch.testing.assert_close(norm, (W + 0.5 * B @ A).norm(dim=1))
    merged = merged_weight(f, W)
    torch.testing.assert_close(merged.norm(dim=1), m, **tol(torch.float64))
    torch.testing.assert_close(unmerged_weight(f, merged, weight_norm=norm), W, **tol(torch.float64))
    with pytest.raises(UnsupportedError, match="weight_norm"):
        unmerged_weight(f, merged)


def test_dora_magnitude_equal_to_norm_is_plain_lora(gen):
    """With m = ||W + dW||_row, DoRA's merge is exactly plain LoRA's (PEFT's DoRA initialisation)."""
    W = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    plain = LoraFactors("linear", torch.randn(1, 3, generator=gen, dtype=torch.float64),
                        torch.randn(4, 1, generator=gen, dtype=torch.float64), scale=1.0)
    dora = LoraFactors("linear", plain.A, plain.B, 1.0, magnitude=dora_weight_norm(plain, W))
    torch.testing.assert_close(merged_weight(dora, W), merged_weight(plain, W), **tol(torch.float64))


def test_low_precision_merge_keeps_dtype(gen):
    W = torch.randn(8, 8, generator=gen).to(torch.bfloat16)
    f = LoraFactors("linear", torch.randn(2, 8, generator=gen).to(torch.bfloat16),
                    torch.randn(8, 2, generator=gen).to(torch.bfloat16), scale=1 / math.sqrt(2))
    merged = merged_weight(f, W)
    assert merged.dtype == torch.bfloat16
    expected = (W.float() + delta_matrix(f)).to(torch.bfloat16)  # computed in float32, cast once
    assert torch.equal(merged, expected)  # the same calls in one process: deterministic, so exact on any machine


# --- factor_shapes, delta_frobenius_sq ---------------------------------------------------------------------------


def test_factor_shapes_per_kind():
    from lorasurg.engine.factors import factor_shapes

    assert factor_shapes("linear", (6, 10), 4) == ((4, 10), (6, 4), 6)
    assert factor_shapes("linear", (10, 6), 4, fan_in_fan_out=True) == ((4, 10), (6, 4), 6)
    assert factor_shapes("embedding", (30, 8), 4) == ((4, 30), (8, 4), 8)
    assert factor_shapes("conv2d", (6, 3, 3, 3), 4) == ((4, 3, 3, 3), (6, 4, 1, 1), 6)
    with pytest.raises(ValueError, match="unknown layer kind"):
        factor_shapes("lstm", (3, 3), 1)


@pytest.mark.parametrize("kind, A_shape, B_shape", [("linear", (3, 10), (6, 3)), ("conv2d", (3, 2, 3, 3), (5, 3, 1, 1))])
def test_delta_frobenius_sq_equals_dense_norm(gen, kind, A_shape, B_shape):
    from lorasurg.engine.factors import delta_frobenius_sq

    f = LoraFactors(kind, torch.randn(A_shape, generator=gen), torch.randn(B_shape, generator=gen), 0.7)
    dense = float(torch.linalg.vector_norm(delta_matrix(f).double())) ** 2
    assert delta_frobenius_sq(f) == pytest.approx(dense, rel=1e-6)
