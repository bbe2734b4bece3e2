"""Adapter I/O: lossless round trips and every bad input's message."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorasurg import LoraConfig
from lorasurg.config import WRITTEN_PEFT_VERSION
from lorasurg.errors import InputError, OutputExistsError
from lorasurg.io.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Adapter,
    AdapterModule,
    parse_peft_key,
    peft_key,
)


def _adapter(gen, dtype=torch.float32, **config) -> Adapter:
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q", "conv", "emb"], **config)
    mods = {
        "layers.0.q": AdapterModule("layers.0.q", torch.randn(2, 6, generator=gen).to(dtype),
                                    torch.randn(5, 2, generator=gen).to(dtype)),
        "conv": AdapterModule("conv", torch.randn(2, 3, 3, 3, generator=gen).to(dtype),
                              torch.randn(4, 2, 1, 1, generator=gen).to(dtype)),
        "emb": AdapterModule("emb", torch.randn(2, 11, generator=gen).to(dtype),
                             torch.randn(6, 2, generator=gen).to(dtype), embedding=True),
    }
    extra = {"head.weight": torch.randn(3, 6, generator=gen).to(dtype)}
    return Adapter(cfg, mods, extra)


def test_key_naming():
    assert peft_key("model.layers.0.q_proj", "lora_A.weight") == "base_model.model.model.layers.0.q_proj.lora_A.weight"
    assert parse_peft_key("base_model.model.a.b.lora_B.bias") == ("a.b", "lora_B.bias")
    assert parse_peft_key("base_model.model.emb.lora_embedding_A") == ("emb", "lora_embedding_A")
    assert parse_peft_key("base_model.model.a.lora_magnitude_vector.weight") == ("a", "lora_magnitude_vector")
    assert parse_peft_key("base_model.model.head.weight") == ("head.weight", None)
    with pytest.raises(InputError, match="does not start with 'base_model.model.'"):
        parse_peft_key("model.q.lora_A.weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_load_is_lossless(tmp_path, gen, dtype):
    adapter = _adapter(gen, dtype)
    adapter.save(tmp_path / "a")
    again = Adapter.load(tmp_path / "a")
    saved, reread = adapter.to_state_dict(), again.to_state_dict()
    assert saved.keys() == reread.keys()
    for key in saved:
        assert reread[key].dtype == dtype and torch.equal(saved[key], reread[key]), key
    written = dict(adapter.config.to_dict(), peft_version=WRITTEN_PEFT_VERSION)  # None is written as the format's
    assert again.config.to_dict() == written
    assert again.modules["emb"].embedding and again.modules["conv"].kind == "conv2d"
    # second save of what was read: byte-identical tensors file content
    again.save(tmp_path / "b")
    assert load_file(tmp_path / "b" / WEIGHTS_NAME).keys() == load_file(tmp_path / "a" / WEIGHTS_NAME).keys()


def test_save_refuses_existing_output_without_force(tmp_path, gen):
    adapter = _adapter(gen)
    adapter.save(tmp_path / "a")
    before = (tmp_path / "a" / WEIGHTS_NAME).read_bytes()
    with pytest.raises(OutputExistsError, match="--force"):
        adapter.save(tmp_path / "a")
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == before
    adapter.save(tmp_path / "a", force=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_bin_adapter_is_read_with_weights_only(tmp_path, gen):
    adapter = _adapter(gen)
    adapter.save(tmp_path / "a")
    state = load_file(tmp_path / "a" / WEIGHTS_NAME)
    (tmp_path / "a" / WEIGHTS_NAME).unlink()
    torch.save(state, tmp_path / "a" / "adapter_model.bin")
    again = Adapter.load(tmp_path / "a")
    assert all(torch.equal(again.to_state_dict()[k], v) for k, v in state.items())


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bin_needing_code_is_refused(tmp_path, gen):
    _adapter(gen).config.save_pretrained(tmp_path)
    with open(tmp_path / "adapter_model.bin", "wb") as fh:
        pickle.dump({"base_model.model.x.lora_A.weight": _Evil()}, fh)
    with pytest.raises(InputError, match="refusing to read .*adapter_model.bin: loading it needs code to be unpickled"):
        Adapter.load(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        Adapter.load(tmp_path / "nope" / "here")


def test_directory_without_weights(tmp_path, gen):
    _adapter(gen).config.save_pretrained(tmp_path)
    with pytest.raises(InputError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        Adapter.load(tmp_path)


def test_directory_without_config(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputError, match="has no adapter_config.json"):
        Adapter.load(tmp_path)


def test_corrupt_safetensors(tmp_path, gen):
    _adapter(gen).save(tmp_path / "a")
    path = tmp_path / "a" / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InputError, match="not a readable safetensors file"):
        Adapter.load(tmp_path / "a")


def test_invalid_json_config(tmp_path, gen):
    _adapter(gen).save(tmp_path / "a")
    (tmp_path / "a" / CONFIG_NAME).write_text('{"r": 8,,}')
    with pytest.raises(InputError, match=r"adapter_config.json.*line 1"):
        Adapter.load(tmp_path / "a")


def test_tensors_contradicting_config_are_reported(tmp_path, gen):
    adapter = _adapter(gen)
    adapter.config.rank_pattern = {"conv": 3}
    adapter.config.lora_bias = True
    adapter.save(tmp_path / "a")
    with pytest.raises(InputError) as info:
        Adapter.load(tmp_path / "a")
    message = str(info.value)
    assert "conv: stored rank 2, config gives r=3" in message
    assert "layers.0.q: lora_bias is true but lora_B.bias is missing" in message
    assert "conv: lora_bias is true but lora_B.bias is missing" in message
    assert "emb: lora_bias is true but PEFT cannot give an embedding a lora_B bias" in message
    loose = Adapter.load(tmp_path / "a", strict=False)
    assert len(loose.problems()) == 4


def test_tensors_for_untargeted_modules_are_reported(tmp_path, gen):
    adapter = _adapter(gen)
    adapter.config.target_modules = {"q", "emb"}
    adapter.save(tmp_path / "a")
    with pytest.raises(InputError, match=r"conv: has LoRA tensors but target_modules=\['emb', 'q'\] does not select it"):
        Adapter.load(tmp_path / "a")
    adapter.config.target_modules = "all-linear"  # needs the model to judge: not checked here
    assert adapter.problems() == []


def test_incomplete_module_and_foreign_keys(tmp_path, gen):
    cfg = LoraConfig(r=2, target_modules=["q"])
    cfg.save_pretrained(tmp_path)
    save_file({"base_model.model.q.lora_A.weight": torch.zeros(2, 3)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(InputError, match=r"lack lora_A or lora_B: q \(has \['A'\]\)"):
        Adapter.load(tmp_path)
    save_file({"q.lora_A.weight": torch.zeros(2, 3)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(InputError, match="not a PEFT adapter file"):
        Adapter.load(tmp_path)


def test_interrupted_save_leaves_nothing(tmp_path, gen, monkeypatch):
    adapter = _adapter(gen)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lorasurg.io.adapter.write_file", boom)
    with pytest.raises(KeyboardInterrupt):
        adapter.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
