"""PEFT's target_parameters layout for fused experts, against its definition written out expert by expert."""

from __future__ import annotations

import pytest
import torch

from lorasurg.engine.experts import expert_deltas, join_experts, split_experts, stack_parts, unstack_parts


def test_join_lays_out_rows_by_expert_and_columns_interleaved(gen):
    E, r, out_f, in_f = 3, 2, 5, 4
    A = torch.randn(E, r, in_f, generator=gen)
    B = torch.randn(E, out_f, r, generator=gen)
    lora_A, lora_B = join_experts(A, B)
    assert lora_A.shape == (r * E, in_f) and lora_B.shape == (out_f, r * E)
    for e in range(E):
        for k in range(r):
            assert torch.equal(lora_A[e * r + k], A[e, k])  # row e*r + k
            assert torch.equal(lora_B[:, k * E + e], B[e, :, k])  # column k*E + e
    back_A, back_B = split_experts(lora_A, lora_B, E)
    assert torch.equal(back_A, A) and torch.equal(back_B, B)


def test_split_refuses_shapes_that_are_not_the_layout():
    with pytest.raises(ValueError, match=r"r\*3"):
        split_experts(torch.zeros(4, 8), torch.zeros(8, 4), 3)


def test_stacked_parts_give_each_part_its_own_delta(gen):
    E, in_f = 2, 6
    gate = (torch.randn(E, 2, in_f, generator=gen), torch.randn(E, 4, 2, generator=gen))
    up = (torch.randn(E, 3, in_f, generator=gen), torch.randn(E, 4, 3, generator=gen))
    A, B = stack_parts([gate, up])
    assert A.shape == (E, 5, in_f) and B.shape == (E, 8, 5)
    delta = expert_deltas(A, B, 0.5)  # (E, 8, in)
    torch.testing.assert_close(delta[:, :4], 0.5 * torch.bmm(gate[1], gate[0]))
    torch.testing.assert_close(delta[:, 4:], 0.5 * torch.bmm(up[1], up[0]))
    parts = unstack_parts(A, B, [4, 4])
    for (a, b), (a0, b0) in zip(parts, [gate, up]):
        assert torch.equal(a, a0) and torch.equal(b, b0)


def test_unstacking_factors_that_are_not_block_diagonal_stays_exact(gen):
    A = torch.randn(2, 3, 5, generator=gen)
    B = torch.randn(2, 6, 3, generator=gen)
    parts = unstack_parts(A, B, [2, 4])
    for (a, b), rows in zip(parts, [slice(0, 2), slice(2, 6)]):
        assert a.shape[1] == 3  # every column is used by every part
        torch.testing.assert_close(torch.bmm(b, a), torch.bmm(B, A)[:, rows])


def test_transposed_deltas_are_in_out_per_expert(gen):
    A = torch.randn(2, 1, 3, generator=gen)
    B = torch.randn(2, 4, 1, generator=gen)
    assert torch.equal(expert_deltas(A, B, 2.0, transposed=True), expert_deltas(A, B, 2.0).transpose(1, 2))


@pytest.mark.parametrize("transposed", [False, True])
def test_merged_experts_in_blocks_equal_the_whole_merge(gen, transposed):
    from tests.conftest import assert_close_ulps

    from lorasurg.engine.experts import merged_experts

    E, r, out_f, in_f = 5, 2, 6, 4
    A = torch.randn(E, r, in_f, generator=gen)
    B = torch.randn(E, out_f, r, generator=gen)
    W = torch.randn(E, *((in_f, out_f) if transposed else (out_f, in_f)), generator=gen)
    whole = merged_experts(A, B, 0.5, W, transposed=transposed)
    reference = W.double() + expert_deltas(A.double(), B.double(), 0.5, transposed)
    assert_close_ulps(whole, reference.float(), 8, magnitude=W.abs() + 1)  # float32 sums of O(1) terms
    blocks = torch.cat([merged_experts(A, B, 0.5, W[i:i + 2], i, transposed) for i in range(0, E, 2)])
    assert torch.equal(blocks, whole)  # each expert's arithmetic is the same whatever the block
    half = merged_experts(A, B, 0.5, W.to(torch.bfloat16), transposed=transposed)
    assert half.dtype == torch.bfloat16
