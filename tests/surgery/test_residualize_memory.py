"""``residualize`` under a memory budget: a target that does not fit is refused up front, copies go in row blocks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lorasurg.errors import ConfigError
from lorasurg.io.checkpoint import Checkpoint
from lorasurg.surgery.budget import parse_size
from lorasurg.surgery.residualize import residualize
from tests.conftest import tol

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LLAMA = FIXTURES / "tiny-llama" / "base"
K = "model.layers.0.self_attn.k_proj"


@pytest.mark.parametrize("init, why", [("pissa", "PiSSA's SVD needs the whole matrix"),
                                       ("pissa_niter_2", "PiSSA's randomized SVD needs the whole matrix"),
                                       ("olora", "OLoRA's QR needs the whole matrix")])
def test_a_target_that_does_not_fit_is_refused_before_anything_is_written(tmp_path, init, why):
    with pytest.raises(ConfigError) as info:
        residualize(LLAMA, tmp_path / "out", init=init, r=8, max_memory="100KB")
    message = str(info.value)
    assert "the memory budget (--max-memory 100KB) is below the smallest workable budget for this input" in message
    # the widest target (the MLP's 128x64 weights), its working set, and the adapter being built
    assert re.search(r"model\.layers\.\d\.mlp\.\w+_proj\.weight needs [\d.]+ KB to hold it whole \(" + re.escape(why),
                     message), message
    assert "reserved for the adapter being built" in message
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary directory
    smallest = re.search(r"Use --max-memory (\S+) or more", message).group(1)
    with pytest.raises(ConfigError, match="below the smallest workable budget"):
        residualize(LLAMA, tmp_path / "out", init=init, r=8, max_memory=int(0.9 * parse_size(smallest)))
    report = residualize(LLAMA, tmp_path / "out", init=init, r=8, max_memory=smallest)  # the minimum works
    assert len(report.modules) == 14 and report.memory.budget == f"--max-memory {smallest}"


def test_copies_above_the_budget_go_in_row_blocks_bit_identical(tmp_path):
    args = dict(init="pissa", r=8, target_modules=[K], dtype="bfloat16")
    held = residualize(LLAMA, tmp_path / "held", **args)
    assert held.memory.blocked == [] and "every tensor processed whole" in held.render()
    # k_proj (32x64) factored whole fits 90 KB; the 256x64 embedding and head, read and cast, do not
    blocked = residualize(LLAMA, tmp_path / "blocked", max_memory="90KB", **args)
    rows = {t.name: t for t in blocked.memory.blocked}
    assert set(rows) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(t.what == "copied" and t.block_rows < 256 and "above the" in t.reason for t in rows.values())
    text = blocked.render()
    assert "2 tensor(s) processed in row blocks" in text and "model.embed_tokens.weight" in text
    assert blocked.to_dict()["memory"]["row_blocks"][0]["name"] in rows
    with Checkpoint.open(tmp_path / "held" / "model") as h, Checkpoint.open(tmp_path / "blocked" / "model") as b:
        assert h.names() == b.names()
        for name in h.names():
            if name == f"{K}.weight":  # the residual: an SVD's result, compared within bfloat16 rounding
                torch.testing.assert_close(b.get(name), h.get(name), **tol(torch.bfloat16))
            else:
                assert b.dtype(name) == torch.bfloat16 and torch.equal(b.get(name), h.get(name)), name
