"""``lorasurg.io.rewrite``: a checkpoint rewritten tensor by tensor keeps BASE's layout, bytes and side files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorasurg.errors import OutputExistsError
from lorasurg.io.checkpoint import Checkpoint
from lorasurg.io.rewrite import rewrite_checkpoint
from lorasurg.io.writer import ShardedWriter


def _tensors(gen) -> dict[str, torch.Tensor]:
    return {
        "model.embed.weight": torch.randn(16, 8, generator=gen).to(torch.bfloat16),
        "model.layers.0.proj.weight": torch.randn(8, 8, generator=gen),
        "model.layers.0.rotary.inv_freq": torch.arange(4, dtype=torch.float32),  # a buffer
        "model.layers.0.position_ids": torch.arange(12, dtype=torch.int64),  # an integer buffer
        "model.layers.1.proj.weight": torch.randn(8, 8, generator=gen).to(torch.float16),
        "model.norm.weight": torch.ones(8),
    }


def _sharded(tmp_path: Path, gen, shard_bytes: int = 300) -> tuple[Path, dict[str, torch.Tensor]]:
    base = tmp_path / "base"
    base.mkdir()
    tensors = _tensors(gen)
    with ShardedWriter(base, max_shard_size=shard_bytes) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
    (base / "config.json").write_text(json.dumps({"model_type": "toy", "dtype": "float32", "hidden": 8}))
    (base / "tokenizer.json").write_text("{}")
    (base / "README.md").write_text("model card")
    (base / "tf_model.h5").write_bytes(b"stale")
    (base / ".gitattributes").write_text("*")
    (base / "onnx").mkdir()
    return base, tensors


def _layout(directory: Path) -> dict[str, str]:
    index = directory / "model.safetensors.index.json"
    return json.loads(index.read_text())["weight_map"]


def test_copy_through_keeps_shards_names_dtypes_and_bytes(tmp_path, gen):
    base, tensors = _sharded(tmp_path, gen)
    with Checkpoint.open(base) as ckpt:
        result = rewrite_checkpoint(ckpt, tmp_path / "out", lambda name, source: None)
    out = tmp_path / "out"
    assert _layout(out) == _layout(base) and len(set(_layout(out).values())) > 1
    assert result.copied == len(tensors) and result.edited == 0
    with Checkpoint.open(out) as ckpt:
        for name, t in tensors.items():
            got = ckpt.get(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name  # lossless copies, buffers included
    assert result.weight_files[-1] == "model.safetensors.index.json"
    assert sorted(result.side_files) == ["README.md", "config.json", "tokenizer.json"]
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert not (out / "tf_model.h5").exists() and not (out / ".gitattributes").exists()
    assert any("tf_model.h5" in n and "stale" in n for n in result.left_out)
    assert any(n.startswith("onnx/") for n in result.left_out)


def test_edits_replace_add_and_stay_in_their_shard(tmp_path, gen):
    base, tensors = _sharded(tmp_path, gen)

    def edit(name, source):
        if name == "model.layers.1.proj.weight":
            w = source.read(name)
            return [(name, w * 2), ("model.layers.1.proj.bias", torch.zeros(8, dtype=w.dtype))]
        if name == "model.norm.weight":
            return []
        return None

    with Checkpoint.open(base) as ckpt:
        result = rewrite_checkpoint(ckpt, tmp_path / "out", edit, config_updates={"attention_bias": True})
    layout = _layout(tmp_path / "out")
    assert layout["model.layers.1.proj.bias"] == layout["model.layers.1.proj.weight"]
    assert "model.norm.weight" not in layout
    assert result.edited == 2 and result.written == len(tensors)
    with Checkpoint.open(tmp_path / "out") as ckpt:
        torch.testing.assert_close(ckpt.get("model.layers.1.proj.weight"), tensors["model.layers.1.proj.weight"] * 2)
        assert ckpt.get("model.layers.1.proj.bias").dtype == torch.float16
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["attention_bias"] is True and config["hidden"] == 8
    assert result.config_updates == {"attention_bias": True}


def test_dtype_casts_floats_only_and_says_so_in_config(tmp_path, gen):
    base, tensors = _sharded(tmp_path, gen)
    with Checkpoint.open(base) as ckpt:
        result = rewrite_checkpoint(ckpt, tmp_path / "out", lambda n, s: None, dtype=torch.bfloat16)
    with Checkpoint.open(tmp_path / "out") as ckpt:
        assert ckpt.dtype("model.layers.0.position_ids") == torch.int64
        assert {ckpt.dtype(n) for n in tensors if n != "model.layers.0.position_ids"} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert result.config_updates == {"dtype": "bfloat16"}


def test_single_file_and_bin_bases_become_model_safetensors(tmp_path, gen):
    tensors = _tensors(gen)
    single = tmp_path / "single"
    single.mkdir()
    save_file(tensors, str(single / "model.safetensors"))
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(tensors, binary / "pytorch_model.bin")
    for src in (single, binary):
        with Checkpoint.open(src) as ckpt:
            result = rewrite_checkpoint(ckpt, tmp_path / f"out-{src.name}", lambda n, s: None)
        assert result.weight_files == ["model.safetensors"]
        with safe_open(str(tmp_path / f"out-{src.name}" / "model.safetensors"), "pt") as f:
            assert set(f.keys()) == set(tensors)
            assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())


def test_refuses_a_directory_that_already_holds_weights(tmp_path, gen):
    base, _ = _sharded(tmp_path, gen)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x")
    with Checkpoint.open(base) as ckpt, pytest.raises(OutputExistsError, match="model.safetensors"):
        rewrite_checkpoint(ckpt, out, lambda n, s: None)


def test_progress_reports_every_tensor(tmp_path, gen):
    base, tensors = _sharded(tmp_path, gen)
    seen = []
    with Checkpoint.open(base) as ckpt:
        rewrite_checkpoint(ckpt, tmp_path / "out", lambda n, s: None, progress=lambda d, t, n: seen.append((d, t)))
    assert len(seen) == len(tensors) and seen[-1][0] == seen[-1][1] == sum(t.numel() for t in tensors.values())


def test_copy_blocks_and_row_block_edits_write_the_same_bytes(tmp_path, gen):
    from lorasurg.io.rewrite import RowBlocks

    base, tensors = _sharded(tmp_path, gen)
    proj = "model.layers.0.proj.weight"

    def edit(name, source):
        if name != proj:
            return None
        return [(name, RowBlocks(tuple(source.checkpoint.shape(name)), source.output_dtype(name),
                                 (2 * block for _, block in source.row_blocks(name, 3))))]

    with Checkpoint.open(base) as ckpt:
        blocks = {"model.embed.weight": 5, "model.layers.0.position_ids": 1, "model.norm.weight": 100}
        result = rewrite_checkpoint(ckpt, tmp_path / "out", edit, copy_blocks=blocks)
    assert result.copied == len(tensors) - 1 and result.edited == 1
    assert result.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    with Checkpoint.open(tmp_path / "out") as out:
        for name, t in tensors.items():
            want = 2 * t if name == proj else t
            assert out.get(name).dtype == t.dtype and torch.equal(out.get(name), want), name
    assert _layout(tmp_path / "out") == _layout(base)


def test_row_blocks_cast_and_fall_back_to_a_whole_read_for_bin(tmp_path, gen):
    from lorasurg.io.rewrite import TensorSource

    base, tensors = _sharded(tmp_path, gen)
    with Checkpoint.open(base) as ckpt:
        source = TensorSource(ckpt, torch.float32)
        got = list(source.row_blocks("model.embed.weight", 6))
    assert [start for start, _ in got] == [0, 6, 12] and [b.shape[0] for _, b in got] == [6, 6, 4]
    assert torch.equal(torch.cat([b for _, b in got]), tensors["model.embed.weight"].float())
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(tensors, binary / "pytorch_model.bin")
    with Checkpoint.open(binary) as ckpt:
        got = list(TensorSource(ckpt, None).row_blocks("model.layers.1.proj.weight", 3))
    assert [b.shape for _, b in got] == [(3, 8), (3, 8), (2, 8)]
    assert torch.equal(torch.cat([b for _, b in got]), tensors["model.layers.1.proj.weight"])
