"""Sharded safetensors writer and atomic output directories: exact round trips, layout, atomicity, bad input."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorasurg.errors import InputError, OutputExistsError, UnsupportedError
from lorasurg.io import writer as writer_module
from lorasurg.io.checkpoint import Checkpoint
from lorasurg.io.writer import (
    ShardedWriter,
    atomic_output_dir,
    check_output_dir,
    copy_side_files,
    parse_size,
    write_checkpoint,
)


def _tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Mixed dtypes and odd sizes, so data alignment inside a shard is exercised."""
    return {
        "emb.weight": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "layer.0.w": torch.randn(9, 3, generator=gen).half(),
        "layer.0.b": torch.randn(9, generator=gen),
        "layer.1.w": torch.randn(4, 4, generator=gen).double(),
        "ids": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(3, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "noncontig": torch.randn(4, 6, generator=gen).t(),
    }


def _assert_files_hold(files: list[Path], expected: dict[str, torch.Tensor]) -> None:
    loaded: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            part = load_file(file)
            assert not set(part) & set(loaded)
            loaded.update(part)
            with safe_open(str(file), "pt") as f:
                assert f.metadata() == {"format": "pt"}
    assert set(loaded) == set(expected)
    for name, want in expected.items():
        assert loaded[name].dtype == want.dtype and torch.equal(loaded[name], want), name


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("10kb") == 10 * 10**3 // 8  # lower-case b: bits, as transformers reads it
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size("4096") == 4096
    for bad in ["five", "5XB", "-3MB", "0", 0, True]:
        with pytest.raises(InputError, match="shard size"):
            parse_size(bad)


def test_single_shard_round_trip(tmp_path, gen):
    tensors = _tensors(gen)
    files = write_checkpoint(tmp_path / "out", tensors)
    assert [f.name for f in files] == ["model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    expected = {k: v.contiguous() for k, v in tensors.items()}
    _assert_files_hold(files, expected)
    with Checkpoint.open(tmp_path / "out") as ckpt:
        for name, want in expected.items():
            assert ckpt.get(name).dtype == want.dtype and torch.equal(ckpt.get(name), want)


def test_sharded_layout_sizes_and_index(tmp_path, gen):
    tensors = {f"t{i}": torch.randn(10, generator=gen) for i in range(7)}  # 40 bytes each
    tensors["big"] = torch.randn(50, generator=gen)  # 200 bytes: larger than a shard, gets its own
    files = write_checkpoint(tmp_path / "out", tensors, max_shard_size=100)
    names = [f.name for f in files]
    count = len(names) - 1
    assert names == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)] + [
        "model.safetensors.index.json"
    ]
    index = json.loads(files[-1].read_text())
    assert index["metadata"] == {"total_size": 7 * 40 + 200, "total_parameters": 7 * 10 + 50}
    assert list(index["weight_map"]) == sorted(tensors)
    for file in files[:-1]:
        part = load_file(file)
        assert set(part) == {k for k, v in index["weight_map"].items() if v == file.name}
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 100 or len(part) == 1
    assert count == 5  # t0 t1 | t2 t3 | t4 t5 | t6 | big
    _assert_files_hold(files, tensors)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names)  # no spool or part files left


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_transformers_loads_a_written_checkpoint(tmp_path, dtype):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    state = model.state_dict()
    config.save_pretrained(tmp_path / "src")
    write_checkpoint(tmp_path / "out", state, max_shard_size="3KB", side_files_from=tmp_path / "src")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype)
    for name, want in state.items():
        got = loaded.state_dict()[name]
        assert got.dtype == want.dtype and torch.equal(got, want), name


def test_writing_over_its_own_input_with_force(tmp_path, gen):
    """Read from X, write to X with force: the result is right (the source is never rewritten in place)."""
    src = tmp_path / "X"
    original = {f"layer.{i}.weight": torch.randn(16, 16, generator=gen).to(torch.bfloat16) for i in range(6)}
    write_checkpoint(src, original, max_shard_size=1024)
    (src / "config.json").write_text('{"model_type": "x"}')
    (src / "tokenizer.json").write_text("{}")
    with Checkpoint.open(src) as ckpt:
        assert len(ckpt.files) == 3  # 512 bytes per tensor, two per 1024-byte shard
        doubled = ((name, ckpt.get(name) * 2) for name in ckpt.names())
        write_checkpoint(src, doubled, force=True, max_shard_size=2048, side_files_from=src)
    with Checkpoint.open(src) as ckpt:
        assert len(ckpt.files) == 2  # re-sharded: 6 x 512 bytes, four per 2048-byte shard
        for name, want in original.items():
            assert torch.equal(ckpt.get(name), want * 2), name
    assert (src / "config.json").read_text() == '{"model_type": "x"}' and (src / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X"]  # no temp or trash directories left


def test_interrupted_write_leaves_nothing(tmp_path, gen):
    def failing():
        yield "a", torch.randn(100, generator=gen)
        yield "b", torch.randn(100, generator=gen)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "new", failing(), max_shard_size=500)
    assert list(tmp_path.iterdir()) == []
    write_checkpoint(tmp_path / "old", {"keep": torch.ones(3)})
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "old", failing(), force=True, max_shard_size=500)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert torch.equal(load_file(tmp_path / "old" / "model.safetensors")["keep"], torch.ones(3))


def test_index_is_written_last(tmp_path, monkeypatch):
    moves: list[str] = []
    real_replace = os.replace

    def recording_replace(src, dst):
        moves.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(writer_module.os, "replace", recording_replace)
    with ShardedWriter(tmp_path, max_shard_size=8) as w:
        for i in range(3):
            w.add(f"t{i}", torch.ones(2))
    assert moves == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + ["model.safetensors.index.json"]


def test_output_that_exists(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(OutputExistsError, match=r"full exists and is not empty; .*--force"):
        write_checkpoint(tmp_path / "full", {"a": torch.ones(1)})
    assert (tmp_path / "full" / "x").read_text() == "x"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file; give a directory path"):
        write_checkpoint(tmp_path / "file", {"a": torch.ones(1)})
    assert check_output_dir(tmp_path / "full", force=True) == tmp_path / "full"


def test_writer_refuses_bad_use(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(OutputExistsError, match="already holds model.safetensors"):
        ShardedWriter(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        ShardedWriter(tmp_path / "missing")
    with pytest.raises(InputError, match="plain file-name stem"):
        ShardedWriter(tmp_path, prefix="a/b")
    w = ShardedWriter(tmp_path, prefix="adapter_model")
    w.add("x", torch.ones(1))
    with pytest.raises(ValueError, match="'x' is reserved or was already written"):
        w.add("x", torch.ones(1))
    with pytest.raises(UnsupportedError, match="complex128"):
        w.add("c", torch.ones(1, dtype=torch.complex128))
    assert [f.name for f in w.finish()] == ["adapter_model.safetensors"]
    with pytest.raises(ValueError, match="is finished"):
        w.add("y", torch.ones(1))


def test_writer_abort_removes_its_files(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardedWriter(tmp_path, max_shard_size=4) as w:
            w.add("a", torch.ones(2))
            w.add("b", torch.ones(2))
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_empty_checkpoint_is_one_valid_file(tmp_path):
    files = write_checkpoint(tmp_path / "out", {})
    assert [f.name for f in files] == ["model.safetensors"] and load_file(files[0]) == {}


def test_atomic_output_dir_permissions_and_restore(tmp_path, monkeypatch):
    old_mask = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("1")
        assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    finally:
        os.umask(old_mask)
    real_replace = os.replace

    def failing_second_replace(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError("disk trouble")
        real_replace(src, dst)

    monkeypatch.setattr(writer_module.os, "replace", failing_second_replace)
    with pytest.raises(OSError, match="disk trouble"):
        with atomic_output_dir(tmp_path / "out", force=True) as tmp:
            (tmp / "f").write_text("2")
    assert (tmp_path / "out" / "f").read_text() == "1"  # the old content was put back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_copy_side_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").write_text("[]")
    (src / "model.safetensors").write_text("weights")
    assert copy_side_files(src, dst) == ["config.json", "tokenizer.json"]
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "tokenizer.json"]
    assert copy_side_files(src, dst, ["model.safetensors", "missing"]) == ["model.safetensors"]
    assert copy_side_files(src, src) == []


def test_add_rows_writes_the_same_bytes_as_add(tmp_path, gen):
    conv = torch.randn(5, 3, 2, 2, generator=gen).to(torch.bfloat16)
    vector = torch.arange(7, dtype=torch.int64)
    (tmp_path / "whole").mkdir()
    (tmp_path / "rows").mkdir()
    with ShardedWriter(tmp_path / "whole") as writer:
        writer.add("conv", conv)
        writer.add("vector", vector)
    with ShardedWriter(tmp_path / "rows") as writer:
        writer.add_rows("conv", conv.shape, conv.dtype, [conv[:2], conv[2:3].reshape(1, -1), conv[3:]])  # flat or not
        writer.add_rows("vector", vector.shape, vector.dtype, (vector[i:i + 3] for i in range(0, 7, 3)))
    written = (tmp_path / "rows" / "model.safetensors").read_bytes()
    assert written == (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_add_rows_refuses_blocks_that_do_not_make_the_tensor(tmp_path, gen):
    closed = []

    def blocks():
        try:
            yield torch.zeros(2, 4)
            yield torch.zeros(1, 4)
        finally:
            closed.append(True)

    with ShardedWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match=r"row blocks of 'short' hold 12 elements; its shape \(4, 4\) needs 16"):
            writer.add_rows("short", (4, 4), torch.float32, blocks())
        assert closed == [True]
        with pytest.raises(ValueError, match=r"block of 'mixed' has dtype torch.float16 .* the tensor is torch.float32"):
            writer.add_rows("mixed", (2, 4), torch.float32, [torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.float16)])
        with pytest.raises(ValueError, match="row block of 'wide'"):
            writer.add_rows("wide", (2, 4), torch.float32, [torch.zeros(2, 5)])
        writer.add("ok", torch.ones(3))
    assert list(load_file(tmp_path / "model.safetensors")) == ["ok"]  # the refused tensors left nothing behind
    assert torch.equal(load_file(tmp_path / "model.safetensors")["ok"], torch.ones(3))
