"""Checkpoint reader: exact round trips for every format, module descriptions, and every bad input's message."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorasurg.errors import InputError
from lorasurg.io.checkpoint import Checkpoint

transformers = pytest.importorskip("transformers")

TINY_LLAMA = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=64, max_position_embeddings=32,
)


def _tiny_llama(dtype=torch.float32, tie=False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY_LLAMA, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).to(dtype)


def _tiny_gpt2(base=False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    return (transformers.GPT2Model if base else transformers.GPT2LMHeadModel)(config)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(ckpt: Checkpoint, expected: dict[str, torch.Tensor]) -> None:
    assert set(ckpt.names()) == set(expected)
    for name, want in expected.items():
        got = ckpt.get(name)
        assert got.dtype == want.dtype and ckpt.dtype(name) == want.dtype, name
        assert ckpt.shape(name) == tuple(want.shape)
        assert torch.equal(got, want), name


@pytest.fixture(scope="module")
def llama_sharded(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    model = _tiny_llama(torch.bfloat16)
    out = tmp_path_factory.mktemp("llama_sharded")
    model.save_pretrained(out, max_shard_size="2KB")
    return out, _state(model)


# --- formats ---------------------------------------------------------------------------------------------


def test_sharded_safetensors_round_trip_in_shard_order(llama_sharded):
    path, state = llama_sharded
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    with Checkpoint.open(path) as ckpt:
        assert len(ckpt.files) > 2 and [f.name for f in ckpt.files] == sorted(set(index.values()))
        _assert_same(ckpt, state)
        assert {n: ckpt.shard_of(n).name for n in ckpt.names()} == index
        shard_numbers = [ckpt.files.index(ckpt.shard_of(n)) for n in ckpt.names()]
        assert shard_numbers == sorted(shard_numbers)  # all of shard 1, then shard 2, ...
        for file in ckpt.files:  # within a shard: file (data offset) order
            with safe_open(str(file), "pt") as f:
                assert [n for n in ckpt.names() if ckpt.shard_of(n) == file] == f.offset_keys()
        assert ckpt.config["model_type"] == "llama" and ckpt.path == path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_single_safetensors_round_trip(tmp_path, dtype):
    model = _tiny_llama(dtype)
    model.save_pretrained(tmp_path)
    with Checkpoint.open(tmp_path) as ckpt:
        assert [f.name for f in ckpt.files] == ["model.safetensors"]
        _assert_same(ckpt, _state(model))
        name = "model.layers.0.self_attn.q_proj.weight"
        assert ckpt.get(name, dtype=torch.float64).dtype == torch.float64
        assert torch.equal(ckpt.get(name, dtype=torch.float32, device="cpu"), model.state_dict()[name].float())


def test_single_file_and_index_file_paths(llama_sharded, tmp_path):
    path, state = llama_sharded
    with Checkpoint.open(path / "model.safetensors.index.json") as ckpt:
        _assert_same(ckpt, state)
        assert ckpt.config["model_type"] == "llama"  # config.json beside the weights
    tensors = {"w": torch.randn(3, 4), "i": torch.arange(5), "b": torch.tensor([True, False]),
               "h": torch.ones(2).half()}
    save_file(tensors, tmp_path / "loose.safetensors")
    with Checkpoint.open(tmp_path / "loose.safetensors") as ckpt:
        _assert_same(ckpt, tensors)
        assert ckpt.config is None and "w" in ckpt and "nope" not in ckpt and len(ckpt) == 4


def test_get_returns_a_copy_that_in_place_file_writes_cannot_change(tmp_path):
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, tmp_path / "m.safetensors")
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, tmp_path / "pytorch_model.bin")
    for name in ["m.safetensors", "pytorch_model.bin"]:
        with Checkpoint.open(tmp_path / name) as ckpt:
            got = ckpt.get("w")
            size = (tmp_path / name).stat().st_size
            with open(tmp_path / name, "r+b") as f:  # zero the file's bytes in place, as a truncating writer would
                f.write(b"\0" * size)
            assert torch.equal(got, torch.arange(1000, dtype=torch.float32)), name


@pytest.mark.parametrize("legacy", [False, True])
def test_bin_round_trip(tmp_path, legacy):
    model = _tiny_llama(torch.float16)
    state = _state(model)
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    with Checkpoint.open(tmp_path) as ckpt:
        assert [f.name for f in ckpt.files] == ["pytorch_model.bin"]
        assert ckpt.names() == list(state)  # the saved dict's order
        _assert_same(ckpt, state)


def test_sharded_bin_round_trip(tmp_path):
    state = _state(_tiny_llama())
    names = list(state)
    parts = {"pytorch_model-00001-of-00002.bin": names[:5], "pytorch_model-00002-of-00002.bin": names[5:]}
    for file, keys in parts.items():
        torch.save({k: state[k] for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in parts.items() for k in keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with Checkpoint.open(tmp_path) as ckpt:
        assert ckpt.names() == names
        _assert_same(ckpt, state)
        assert ckpt.shard_of(names[-1]).name == "pytorch_model-00002-of-00002.bin"


def test_safetensors_preferred_over_bin(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    torch.save({"b": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with Checkpoint.open(tmp_path) as ckpt:
        assert ckpt.names() == ["a"]


def _fake_hub_cache(tmp_path: Path, monkeypatch, source: Path, commit: str = "a" * 40, refs=("main",)) -> Path:
    """A huggingface_hub cache holding ``source``'s files as snapshot ``commit`` of repo org/tiny."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return repo / "snapshots" / commit


def test_hub_repo_id_from_offline_cache(tmp_path, monkeypatch, llama_sharded):
    path, state = llama_sharded
    snapshot = _fake_hub_cache(tmp_path, monkeypatch, path)
    with Checkpoint.open("org/tiny") as ckpt:
        assert ckpt.path == snapshot and ckpt.config["model_type"] == "llama"
        _assert_same(ckpt, state)


def test_hub_revision_selects_the_snapshot(tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    save_file({"x": torch.zeros(2)}, one / "model.safetensors")
    save_file({"x": torch.ones(2)}, two / "model.safetensors")
    _fake_hub_cache(tmp_path, monkeypatch, one, commit="a" * 40, refs=("main",))
    _fake_hub_cache(tmp_path, monkeypatch, two, commit="b" * 40, refs=("v2",))
    for revision, value in [(None, 0.0), ("main", 0.0), ("v2", 1.0), ("b" * 40, 1.0)]:
        with Checkpoint.open("org/tiny", revision=revision) as ckpt:
            assert torch.equal(ckpt.get("x"), torch.full((2,), value)), revision


def test_hub_repo_not_cached_while_offline(tmp_path, monkeypatch):
    save_file({"x": torch.zeros(2)}, tmp_path / "model.safetensors")
    _fake_hub_cache(tmp_path, monkeypatch, tmp_path)
    with pytest.raises(InputError, match=r"org/other does not exist as a local path.*HF_HUB_OFFLINE"):
        Checkpoint.open("org/other")
    with pytest.raises(InputError, match="org/tiny"):
        Checkpoint.open("org/tiny", revision="no-such-branch")


# --- module descriptions ---------------------------------------------------------------------------------


def test_module_infos_llama(tmp_path):
    model = _tiny_llama(tie=True)
    model.save_pretrained(tmp_path)
    with Checkpoint.open(tmp_path) as ckpt:
        assert "lm_head.weight" not in ckpt  # dropped by save_pretrained: tied
        assert ckpt.tied_weights() == {"lm_head.weight": "model.embed_tokens.weight"}
        assert ckpt.output_layer_names() == {"lm_head"}
        infos = ckpt.module_infos()
        assert ckpt.describe().source == "names and shapes (known architecture)"  # equal to the model's: see test_architecture_fast_path
        assert infos["model.embed_tokens"].kind == "embedding"
        q = infos["model.layers.1.self_attn.q_proj"]
        assert (q.kind, q.type_name, q.weight_shape, q.has_bias) == ("linear", "Linear", (16, 16), False)
        assert infos["lm_head"].kind == "linear"
        assert infos["model.norm"].kind is None
        for name, info in infos.items():  # every module with a stored weight has that weight's shape
            if f"{name}.weight" in ckpt:
                assert info.weight_shape == ckpt.shape(f"{name}.weight")


def test_module_infos_gpt2_conv1d_and_base_model_prefix(tmp_path):
    _tiny_gpt2().save_pretrained(tmp_path / "head")
    with Checkpoint.open(tmp_path / "head") as ckpt:
        info = ckpt.module_infos()["transformer.h.0.attn.c_attn"]
        described = (info.type_name, info.kind, info.fan_in_fan_out, info.weight_shape)
        assert described == ("Conv1D", "linear", True, (16, 48))
        assert ckpt.tied_weights() == {"lm_head.weight": "transformer.wte.weight"}
    # A checkpoint saved from the base model (keys "h.0...") but whose config names the LM-head class.
    base = _tiny_gpt2(base=True)
    base.save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    with Checkpoint.open(tmp_path / "base") as ckpt:
        assert "h.0.attn.c_attn.weight" in ckpt
        infos = ckpt.module_infos()
        assert infos["h.0.attn.c_attn"].fan_in_fan_out and infos["wte"].kind == "embedding"
        assert "transformer.h.0.attn.c_attn" not in infos
        assert ckpt.tied_weights() == {"lm_head.weight": "wte.weight"}


def test_module_infos_from_names_and_shapes_agree_with_architecture(tmp_path):
    model = _tiny_llama()
    model.save_pretrained(tmp_path / "with")
    shutil.copytree(tmp_path / "with", tmp_path / "without")
    (tmp_path / "without" / "config.json").unlink()
    with Checkpoint.open(tmp_path / "with") as a, Checkpoint.open(tmp_path / "without") as b:
        assert b.config is None and b.describe().source == "names and shapes"
        arch, guessed = a.module_infos(), b.module_infos()
        stored = [n for n in arch if f"{n}.weight" in a]
        assert stored and set(stored) == set(guessed)
        for name in stored:
            assert (guessed[name].kind, guessed[name].weight_shape) == (arch[name].kind, arch[name].weight_shape), name
        assert b.output_layer_names() == a.output_layer_names() == {"lm_head"}


def test_module_infos_heuristics_for_unknown_architecture(tmp_path):
    tensors = {
        "tok.word_embeddings.weight": torch.zeros(10, 4),
        "blocks.0.proj.weight": torch.zeros(6, 4),
        "blocks.0.proj.bias": torch.zeros(6),
        "blocks.0.conv.weight": torch.zeros(3, 2, 3, 3),
        "blocks.0.tconv.weight": torch.zeros(3, 2, 5),
        "blocks.0.vol.weight": torch.zeros(3, 2, 1, 1, 1),
        "blocks.0.norm.weight": torch.zeros(4),
        "vocabish.weight": torch.zeros(10, 4),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    config = {"architectures": ["NoSuchModelForCausalLM"], "model_type": "nosuch", "vocab_size": 10,
              "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with Checkpoint.open(tmp_path) as ckpt:
        infos = ckpt.module_infos()
        kinds = {name: info.kind for name, info in infos.items()}
        assert kinds == {
            "tok.word_embeddings": "embedding", "blocks.0.proj": "linear", "blocks.0.conv": "conv2d",
            "blocks.0.tconv": "conv1d", "blocks.0.vol": "conv3d", "blocks.0.norm": None,
            "vocabish": "embedding",  # rows == vocab_size, no bias, not an output name
            "lm_head": "linear",  # tied, absent from the file
        }
        assert infos["blocks.0.proj"].has_bias and not infos["blocks.0.conv"].has_bias
        assert ckpt.tied_weights() == {"lm_head.weight": "tok.word_embeddings.weight"}
        assert ckpt.output_layer_names() == {"lm_head"}


# --- bad input -------------------------------------------------------------------------------------------


def test_missing_path():
    with pytest.raises(InputError, match=r"/no/such/dir does not exist"):
        Checkpoint.open("/no/such/dir")
    with pytest.raises(InputError, match="model.safetensors does not exist"):
        Checkpoint.open("model.safetensors")


def test_directory_without_weights_lists_its_contents(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match=r"holds no model weights .*it contains: config.json, notes.txt"):
        Checkpoint.open(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="it contains: nothing"):
        Checkpoint.open(empty)


def test_adapter_directory_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    save_file({"x": torch.zeros(1)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(InputError, match="is a PEFT adapter"):
        Checkpoint.open(tmp_path)


def test_several_unindexed_safetensors_are_ambiguous(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "a.safetensors")
    save_file({"y": torch.zeros(1)}, tmp_path / "b.safetensors")
    with pytest.raises(InputError, match=r"several \*.safetensors files .*a.safetensors, b.safetensors"):
        Checkpoint.open(tmp_path)


def _valid_bytes() -> bytes:
    from safetensors.torch import save

    return save({"w": torch.arange(64, dtype=torch.float32), "b": torch.ones(3)})


@pytest.mark.parametrize(
    "cut, message",
    [
        (lambda d: d[:-40], r"header describes \d+ bytes but the file has only \d+ bytes"),
        (lambda d: d[:30], r"header is \d+ bytes long but the file has only 30 bytes"),
        (lambda d: d[:5], "fewer than the 8-byte header length"),
        (lambda d: b"\xff" * 8 + d[8:], "not a safetensors file"),
        (lambda d: d[:8] + b"[" + d[9:], "header is not valid JSON"),
        (lambda d: d + b"extra", r"the file has \d+ bytes"),
    ],
    ids=["truncated-data", "truncated-header", "tiny", "garbage-length", "bad-json", "trailing-bytes"],
)
def test_corrupt_or_truncated_safetensors(tmp_path, cut, message):
    (tmp_path / "model.safetensors").write_bytes(cut(_valid_bytes()))
    with pytest.raises(InputError, match=rf"model.safetensors is not a readable safetensors file: .*{message}.*again"):
        Checkpoint.open(tmp_path)


def test_index_naming_a_missing_shard(llama_sharded, tmp_path):
    path, _ = llama_sharded
    shutil.copytree(path, tmp_path / "ckpt")
    second = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(InputError, match=rf"names shards that cannot be read: {second.name} "
                                         r"\(holds \d+ tensors\) is missing"):
        Checkpoint.open(tmp_path / "ckpt")


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "s1.safetensors")
    index = {"weight_map": {"a": "s1.safetensors", "ghost": "s1.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match=r"names 1 tensor\(s\) that their shard does not hold: 'ghost'"):
        Checkpoint.open(tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [("{not json", "cannot read checkpoint index"), ('{"metadata": {}}', "has no 'weight_map'"),
     ('{"weight_map": {"a": "../x.safetensors"}}', "lies outside the index's directory")],
)
def test_malformed_index(tmp_path, text, message):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(InputError, match=message):
        Checkpoint.open(tmp_path)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_bin_needing_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"w": torch.ones(2), "x": _Payload(str(marker))}, tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"refusing to read .*pytorch_model.bin: loading it needs code to be "
                                         r"unpickled.*convert it to safetensors"):
        Checkpoint.open(tmp_path)
    assert not marker.exists()


def test_bin_that_is_not_a_state_dict(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"not hold a flat state dict of tensors \(found dict with keys \['model'\]"):
        Checkpoint.open(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(InputError, match="cannot read .*pytorch_model.bin as a PyTorch checkpoint.*corrupt"):
        Checkpoint.open(tmp_path)


def test_unknown_tensor_name_suggests_near_names(llama_sharded):
    path, _ = llama_sharded
    with Checkpoint.open(path) as ckpt:
        with pytest.raises(InputError, match=r"'model.layers.0.self_attn.q_prj.weight' is not in checkpoint .*"
                                             r"did you mean 'model.layers.0.self_attn.q_proj.weight'"):
            ckpt.get("model.layers.0.self_attn.q_prj.weight")
        for method in (ckpt.shape, ckpt.dtype, ckpt.shard_of):
            with pytest.raises(InputError, match="'zzz' is not in checkpoint"):
                method("zzz")


def test_bad_config_json(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(InputError, match=r"cannot parse .*config.json.*fix the JSON"):
        Checkpoint.open(tmp_path)


def test_revision_with_a_local_path_and_non_weight_file(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(InputError, match="revision='v1' applies to hub repo ids only"):
        Checkpoint.open(tmp_path, revision="v1")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match="notes.txt is not a weight file"):
        Checkpoint.open(tmp_path / "notes.txt")


def test_closed_checkpoint_refuses_reads(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    ckpt = Checkpoint.open(tmp_path)
    ckpt.close()
    with pytest.raises(ValueError, match="is closed"):
        ckpt.get("x")
    assert os.fspath(tmp_path) in repr(ckpt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_reader_reads_exact_row_blocks(tmp_path, dtype):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 5, generator=gen).to(dtype),
               "conv.weight": torch.randn(6, 2, 3, 3, generator=gen).to(dtype)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with Checkpoint.open(tmp_path) as ckpt:
        reader = ckpt.row_reader("conv.weight")
        try:
            assert reader.shape == (6, 2, 3, 3) and reader.dtype == dtype
            assert torch.equal(reader.rows(1, 4), tensors["conv.weight"][1:4].reshape(3, -1))
        finally:
            reader.close()
        reader = ckpt.row_reader("a.weight")
        blocks = [reader.rows(start, min(start + 3, 7)) for start in range(0, 7, 3)]
        reader.close()
        assert torch.equal(torch.cat(blocks), tensors["a.weight"])


def test_row_reader_is_none_for_bin_and_refuses_truncated_files(tmp_path):
    torch.save({"w": torch.zeros(4, 4)}, tmp_path / "pytorch_model.bin")
    with Checkpoint.open(tmp_path) as ckpt:
        assert ckpt.row_reader("w") is None
    big = tmp_path / "big"
    big.mkdir()
    save_file({"w": torch.ones(64, 64)}, str(big / "model.safetensors"))
    with Checkpoint.open(big) as ckpt:
        reader = ckpt.row_reader("w")
    with open(big / "model.safetensors", "r+b") as fh:  # cut the data short after opening
        fh.truncate(big.joinpath("model.safetensors").stat().st_size - 1024)
    with pytest.raises(InputError, match="short read of 'w' rows 60:64 .* the file is truncated"):
        reader.rows(60, 64)
    reader.close()
