"""``merged_rows``: a merged weight computed block by block equals ``merged_weight`` up to float32 rounding."""

from __future__ import annotations

import pytest
import torch

from lorasurg.engine.factors import (
    LoraFactors, merged_row_norms_sq, merged_rows, merged_weight, stored_rows_are_columns, weight_to_matrix,
)
from tests.conftest import assert_close_ulps, tol

R = 4
#: kind, stored weight shape, A shape, B shape, fan_in_fan_out
LAYOUTS = {
    "linear": ("linear", (10, 7), (R, 7), (10, R), False),
    "fan_in_fan_out": ("linear", (7, 10), (R, 7), (10, R), True),
    "embedding": ("embedding", (11, 6), (R, 11), (6, R), False),
    "conv2d": ("conv2d", (5, 3, 3, 3), (R, 3, 3, 3), (5, R, 1, 1), False),
}


def _blocked(f: LoraFactors, W: torch.Tensor, block: int) -> torch.Tensor:
    norm = None
    if f.magnitude is not None and stored_rows_are_columns(f):  # DoRA's norms span the blocks: a first pass
        norm = sum(merged_row_norms_sq(f, W[s:s + block], s) for s in range(0, W.shape[0], block)).sqrt()
    return torch.cat([merged_rows(f, W[s:s + block], s, norm) for s in range(0, W.shape[0], block)])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block", [1, 3, 1000])
def test_blocks_equal_the_whole_merge(gen, layout, block):
    kind, shape, a, b, fifo = LAYOUTS[layout]
    W = torch.randn(shape, generator=gen)
    f = LoraFactors(kind, torch.randn(a, generator=gen), torch.randn(b, generator=gen), 0.7, fan_in_fan_out=fifo)
    got, want = _blocked(f, W, block), merged_weight(f, W)
    # float32 rounding of W + s * B @ A: an r-term dot product and one addition, each within eps/2 of the operands
    scale = W.abs() + merged_weight(LoraFactors(kind, f.A.abs(), f.B.abs(), 0.7, fan_in_fan_out=fifo),
                                    torch.zeros(shape))
    assert_close_ulps(got, want, ulps=R + 2, magnitude=scale)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block", [1, 4])
def test_dora_blocks_equal_the_whole_merge(gen, layout, block):
    kind, shape, a, b, fifo = LAYOUTS[layout]
    out = b[0]
    W = torch.randn(shape, generator=gen)
    f = LoraFactors(kind, torch.randn(a, generator=gen), torch.randn(b, generator=gen), 0.5,
                    magnitude=torch.rand(out, generator=gen) + 0.5, fan_in_fan_out=fifo)
    # the row norms are sums of squares over up to 27 entries, accumulated across blocks: relative error ~1e-6
    torch.testing.assert_close(_blocked(f, W, block), merged_weight(f, W), **tol(torch.float32))


def test_keeps_the_dtype_and_shape_of_the_rows(gen):
    W = torch.randn(9, 5, generator=gen).to(torch.bfloat16)
    f = LoraFactors("linear", torch.randn(2, 5, generator=gen), torch.randn(9, 2, generator=gen), 1.0)
    block = merged_rows(f, W[3:6], 3)
    assert block.dtype == torch.bfloat16 and block.shape == (3, 5)
    torch.testing.assert_close(block, merged_weight(f, W)[3:6], **tol(torch.bfloat16))
    assert torch.equal(W, W.clone())  # the rows given are not modified in place


def test_transposed_dora_without_norms_is_refused(gen):
    f = LoraFactors("embedding", torch.randn(2, 11, generator=gen), torch.randn(6, 2, generator=gen), 1.0,
                    magnitude=torch.ones(6))
    with pytest.raises(ValueError, match="needs weight_norm"):
        merged_rows(f, torch.randn(3, 6, generator=gen), 0)


def test_norm_pieces_sum_to_dora_norms(gen):
    W = torch.randn(11, 6, generator=gen)
    f = LoraFactors("embedding", torch.randn(2, 11, generator=gen), torch.randn(6, 2, generator=gen), 1.5)
    pieces = merged_row_norms_sq(f, W[:4], 0) + merged_row_norms_sq(f, W[4:], 4)
    adapted = weight_to_matrix(merged_weight(f, W), "embedding")  # (dim, num)
    torch.testing.assert_close(pieces.sqrt(), torch.linalg.vector_norm(adapted, dim=1), **tol(torch.float32))
