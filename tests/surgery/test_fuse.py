"""``lorasurg.surgery.fuse``: layout, options and every bad input (PEFT comparisons are in tests/parity)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorasurg.config import LoraConfig
from lorasurg.engine.factors import LoraFactors, merged_weight
from lorasurg.errors import InputError, OutputExistsError, ShapeMismatchError
from lorasurg.io.adapter import Adapter, AdapterModule
from lorasurg.io.checkpoint import Checkpoint
from lorasurg.io.rewrite import TensorSource
from lorasurg.surgery.extract import extract_to_dir
from lorasurg.surgery.fuse import fuse
from tests.conftest import tol

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LLAMA = FIXTURES / "tiny-llama" / "base"
Q = "model.layers.0.self_attn.q_proj"


def _adapter(gen, modules=(Q,), shape=(64, 64), r=2, **config) -> Adapter:
    out, inp = shape
    mods = {m: AdapterModule(m, torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen)) for m in modules}
    return Adapter(LoraConfig(r=r, lora_alpha=4, target_modules=list(modules), **config), mods)


def test_merges_by_the_definition_and_copies_the_rest(tmp_path, gen):
    adapter = _adapter(gen)
    report = fuse(LLAMA, adapter, tmp_path / "fused")
    with Checkpoint.open(LLAMA) as b, Checkpoint.open(tmp_path / "fused") as f:
        names = b.names()
        assert names == f.names()
        for name in names:
            if name == f"{Q}.weight":
                mod = adapter.modules[Q]
                want = merged_weight(LoraFactors("linear", mod.A, mod.B, 2.0), b.get(name))
                torch.testing.assert_close(f.get(name), want, **tol(torch.float32))
            else:
                assert torch.equal(f.get(name), b.get(name)), name
    assert report.model.copied == len(names) - 1
    assert sorted(report.model.side_files) == ["config.json", "generation_config.json"]
    assert "1 LoRA modules merged" in report.render() and report.to_dict()["modules"][0]["module"] == Q


def test_zero_lora_bias_on_a_biasless_layer_needs_nothing(tmp_path):
    # extract writes a zero lora_B bias on every target when one bias changed (Qwen2: o_proj and the MLP have none)
    extract_to_dir(FIXTURES / "tiny-qwen2" / "base", FIXTURES / "tiny-qwen2" / "tuned", tmp_path / "ad", r=4)
    report = fuse(FIXTURES / "tiny-qwen2" / "base", tmp_path / "ad", tmp_path / "fused")
    assert not report.config_updates and not report.dropped_biases
    rows = {m.module: m.bias for m in report.modules}
    assert rows["model.layers.0.self_attn.o_proj"] == "zero (not needed)"
    assert rows["model.layers.0.self_attn.q_proj"] == "added to BASE's bias"


def test_dtype_device_and_sharded_bin_base(tmp_path, gen):
    binary = tmp_path / "bin"
    binary.mkdir()
    with Checkpoint.open(LLAMA) as ckpt:
        names = ckpt.names()
        torch.save({n: ckpt.get(n) for n in names[:10]}, binary / "pytorch_model-00001-of-00002.bin")
        torch.save({n: ckpt.get(n) for n in names[10:]}, binary / "pytorch_model-00002-of-00002.bin")
    index = {"metadata": {}, "weight_map": {n: f"pytorch_model-0000{1 if i < 10 else 2}-of-00002.bin"
                                            for i, n in enumerate(names)}}
    (binary / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    shutil.copy(LLAMA / "config.json", binary / "config.json")
    report = fuse(binary, _adapter(gen), tmp_path / "fused", dtype="float16", device="cpu")
    assert report.model.weight_files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                   "model.safetensors.index.json"]
    assert report.config_updates == {"dtype": "float16"}
    with Checkpoint.open(tmp_path / "fused") as f:
        assert {f.dtype(n) for n in f.names()} == {torch.float16}
        assert [f.shard_of(n).name[:11] for n in (names[0], names[-1])] == ["model-00001", "model-00002"]
    assert not any(n.endswith(".bin") for n in report.model.side_files)


def test_in_place_with_force(tmp_path, gen):
    base = tmp_path / "base"
    shutil.copytree(LLAMA, base)
    before = load_file(str(base / "model.safetensors"))[f"{Q}.weight"]
    fuse(base, _adapter(gen), base, force=True)
    after = load_file(str(base / "model.safetensors"))[f"{Q}.weight"]
    assert not torch.equal(before, after) and (base / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no temporary directory left


# ------------------------------------------------------------------------------------------------ bad input


def test_adapter_for_another_base_names_the_module_and_both_shapes(tmp_path, gen):
    adapter = _adapter(gen, shape=(64, 128))
    with pytest.raises(ShapeMismatchError) as err:
        fuse(LLAMA, adapter, tmp_path / "fused")
    message = str(err.value)
    assert f"{Q}: adapter A (2, 128), B (64, 2) (linear); BASE's linear weight (64, 64) needs A (2, 64), B (64, 2)" in message
    assert "trained for another base model" in message and not (tmp_path / "fused").exists()


def test_modules_missing_from_base(tmp_path, gen):
    with pytest.raises(ShapeMismatchError, match=r"modules not in BASE \(1\): model.layers.7.self_attn.q_proj"):
        fuse(LLAMA, _adapter(gen, modules=("model.layers.7.self_attn.q_proj",)), tmp_path / "fused")


def test_saved_tensors_base_has_no_place_for(tmp_path, gen):
    adapter = _adapter(gen)
    adapter.extra["score.weight"] = torch.zeros(2, 64)
    with pytest.raises(InputError, match="tensors BASE has no place for: score.weight"):
        fuse(LLAMA, adapter, tmp_path / "fused")
    adapter.extra = {"model.norm.weight": torch.zeros(3)}
    with pytest.raises(InputError, match=r"model.norm.weight: adapter \(3,\), BASE \(64,\)"):
        fuse(LLAMA, adapter, tmp_path / "fused")
    adapter.extra = {"model.embed_tokens.token_adapter.trainable_tokens_delta": torch.zeros(2, 64)}
    with pytest.raises(InputError, match="model.embed_tokens: 2 trainable-token rows but trainable_token_indices"):
        fuse(LLAMA, adapter, tmp_path / "fused")
    adapter.config.trainable_token_indices = {"embed_tokens": [3, 300]}
    with pytest.raises(InputError, match=r"model.embed_tokens: rows 256\.\.299 \(44\) are past BASE's 256 rows"):
        fuse(LLAMA, adapter, tmp_path / "fused")


def test_existing_output_refused_before_any_work(tmp_path, gen, monkeypatch):
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "x").write_text("x")
    monkeypatch.setattr(Checkpoint, "open", lambda *a, **k: pytest.fail("read BASE before checking the output"))
    with pytest.raises(OutputExistsError, match="--force"):
        fuse(LLAMA, _adapter(gen), tmp_path / "fused")


def test_interrupted_run_leaves_nothing(tmp_path, gen, monkeypatch):
    calls = []
    real = TensorSource.read

    def interrupt(self, name, device=None):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, name, device)

    monkeypatch.setattr(TensorSource, "read", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fuse(LLAMA, _adapter(gen), tmp_path / "fused")
    assert list(tmp_path.iterdir()) == []
