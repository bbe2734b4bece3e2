"""``lorasurg.surgery.extract.stream``: the delta read in row blocks, held or streamed, and what a failed read does."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from lorasurg.errors import InputError
from lorasurg.io.checkpoint import Checkpoint
from lorasurg.surgery.extract import extract
from lorasurg.surgery.extract.stream import DeltaOperator, Workspace, open_delta
from tests.conftest import assert_close_ulps

CPU = torch.device("cpu")


def _pair(tmp_path, base: torch.Tensor, tuned: torch.Tensor, name: str = "layer.proj.weight"):
    for side, tensor in (("b", base), ("t", tuned)):
        (tmp_path / side).mkdir(exist_ok=True)
        save_file({name: tensor.contiguous()}, str(tmp_path / side / "model.safetensors"))
    return Checkpoint.open(tmp_path / "b"), Checkpoint.open(tmp_path / "t")


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                    (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("hold", [True, False])
@pytest.mark.parametrize("rows_per_block", [1, 7, None])
def test_blocks_are_the_exact_float32_delta(tmp_path, gen, dtypes, hold, rows_per_block):
    """Every block is ``float32(tuned rows) - float32(base rows)``, in order, covering every row once.

    One IEEE subtraction per element of values exact in float32: the same bits on every CPU, so torch.equal.
    """
    base_dtype, tuned_dtype = dtypes
    W = torch.randn(50, 12, generator=gen)
    base, tuned = W.to(base_dtype), (W + 0.01 * torch.randn(50, 12, generator=gen)).to(tuned_dtype)
    b, t = _pair(tmp_path, base, tuned)
    expected = tuned.float() - base.float()
    op = open_delta(b, t, "layer.proj.weight", False, CPU, Workspace(CPU), rows_per_block=rows_per_block, hold=hold)
    try:
        for _ in range(2):  # the first read, then again (from the held matrix or from disk)
            blocks = [(a, stop, d.clone()) for a, stop, d in op.blocks()]  # a streamed block is reused: copy it
            assert [a for a, _, _ in blocks] == list(range(0, 50, op.block))
            assert blocks[-1][1] == 50 and all(d.dtype == torch.float32 for _, _, d in blocks)
            assert torch.equal(torch.cat([d for _, _, d in blocks]), expected)
            if hold:
                op.stats()  # holds the matrix; blocks() then come from it
                assert torch.equal(op.matrix, expected)
    finally:
        op.close()


@pytest.mark.parametrize("transposed", [False, True])
def test_streamed_products_match_the_dense_delta(tmp_path, gen, transposed):
    base = torch.randn(40, 24, generator=gen)
    tuned = base + torch.randn(40, 24, generator=gen)
    b, t = _pair(tmp_path, base, tuned)
    M = (tuned - base).double()
    M = M.T if transposed else M  # (out, in)
    X, Y = torch.randn(M.shape[1], 5, generator=gen), torch.randn(M.shape[0], 5, generator=gen)
    op = open_delta(b, t, "layer.proj.weight", transposed, CPU, Workspace(CPU), rows_per_block=3)
    try:
        changed, finite, energy, product = op.stats(X)
        assert changed and finite and energy == pytest.approx(float(M.pow(2).sum()), rel=1e-6)
        magnitude = lambda A, B: (A.abs() @ B.abs()).float()  # noqa: E731 - the scale of a dot product's rounding
        assert_close_ulps(product, (M @ X.double()).float(), 64, magnitude=magnitude(M, X.double()))
        assert_close_ulps(op.matmul(X), (M @ X.double()).float(), 64, magnitude=magnitude(M, X.double()))
        assert_close_ulps(op.rmatmul(Y), (M.T @ Y.double()).float(), 64, magnitude=magnitude(M.T, Y.double()))
    finally:
        op.close()


def test_a_short_read_in_a_later_block_names_the_tensor_rows_and_file(tmp_path, gen):
    """A file cut short after its header was read: the block past the end fails with a clear InputError (not a
    tensor of garbage), and closing the operator closes both files."""
    base = torch.randn(50, 16, generator=gen)
    b, t = _pair(tmp_path, base, base + 1.0)
    path = tmp_path / "t" / "model.safetensors"
    os.truncate(path, path.stat().st_size - 3 * 16 * 4)  # the last 3 rows are gone
    readers = [ckpt.row_reader("layer.proj.weight") for ckpt in (b, t)]
    op = DeltaOperator(readers[0], readers[1], False, CPU, Workspace(CPU), rows_per_block=10)
    seen = []
    with pytest.raises(InputError) as info:
        for a, stop, _ in op.blocks():
            seen.append((a, stop))
    assert seen == [(0, 10), (10, 20), (20, 30), (30, 40)]  # every block before the cut came through
    assert str(info.value) == (f"short read of 'layer.proj.weight' rows 40:50 from {path}: the file is truncated")
    op.close()
    for reader in readers:
        with pytest.raises(OSError):
            os.fstat(reader._fd)


def test_a_non_finite_block_stops_a_streamed_pass_and_names_the_tensor(tmp_path, gen, monkeypatch):
    """NaN in the middle block of a streamed delta: the pass stops there, extract refuses naming the tensor."""
    from tests.surgery.test_extract import force_streaming

    base = torch.randn(60, 20, generator=gen)
    tuned = base + 0.1 * torch.randn(60, 20, generator=gen)
    tuned[31, 4] = float("nan")
    _pair(tmp_path, base, tuned)
    force_streaming(monkeypatch, block_elements=200)  # 10-row blocks
    monkeypatch.setattr(DeltaOperator, "matmul", lambda *a: pytest.fail("a second pass over a non-finite delta"))
    with pytest.raises(InputError, match=r"layer\.proj\.weight \(shape \(60, 20\)\)"):
        extract(tmp_path / "b", tmp_path / "t", r=4)
