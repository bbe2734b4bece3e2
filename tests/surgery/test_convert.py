"""``lorasurg.surgery.convert``: the stacked factors, the config, and every way --initial can be wrong."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lorasurg.config import LoraConfig
from lorasurg.errors import ConfigError, InputError, OutputExistsError
from lorasurg.io.adapter import Adapter, AdapterModule
from lorasurg.surgery.convert import convert, convert_to_dir

MODULES = {"m.q": (6, 10), "m.v": (4, 10)}  # (out, in)


def _pair(tmp_path: Path, gen, *, r: int = 2, init_changes: dict | None = None, rank_of: dict | None = None,
          drop: str | None = None, **config) -> tuple[Path, Path]:
    """A trained adapter and its initial state, saved; ``init_changes`` alters the initial config."""
    cfg = dict(r=r, lora_alpha=4, target_modules=sorted(MODULES), **config)
    modules_i, modules_t = {}, {}
    for name, (out, inp) in MODULES.items():
        k = (rank_of or {}).get(name, r)
        A0, B0 = torch.randn(k, inp, generator=gen), torch.randn(out, k, generator=gen)
        modules_i[name] = AdapterModule(name, A0, B0)
        modules_t[name] = AdapterModule(name, A0 + 0.1 * torch.randn(A0.shape, generator=gen),
                                        B0 + 0.1 * torch.randn(B0.shape, generator=gen))
    trained = Adapter(LoraConfig(**cfg), modules_t)
    init_cfg = {**cfg, **(init_changes or {})}
    if drop:
        modules_i.pop(drop)
        init_cfg["target_modules"] = sorted(set(MODULES) - {drop})
    init = Adapter(LoraConfig(**init_cfg), modules_i)
    trained.save(tmp_path / "trained")
    init.save(tmp_path / "init")
    return tmp_path / "trained", tmp_path / "init"


def test_stacked_factors_and_config(tmp_path, gen):
    trained, init = _pair(tmp_path, gen, use_rslora=True)
    adapter, report = convert(trained, init)
    t, i = Adapter.load(trained), Adapter.load(init)
    for name in MODULES:
        mod = adapter.modules[name]
        assert torch.equal(mod.A, torch.cat([t.modules[name].A, i.modules[name].A]))
        assert torch.equal(mod.B, torch.cat([t.modules[name].B, -i.modules[name].B], dim=1))
    assert adapter.config.r == 4 and adapter.config.lora_alpha == pytest.approx(4 * math.sqrt(2))
    assert adapter.config.init_lora_weights is True
    assert [m.rank for m in report.modules] == [4, 4]
    assert any("does not say which base" in n for n in report.notes)
    assert "convert:" in report.render() and report.to_dict()["totals"]["modules"] == 2


def test_rerank_clamps_to_the_rank_of_dw(tmp_path, gen):
    trained, init = _pair(tmp_path, gen)
    adapter, report = convert(trained, init, r=10)
    assert {m.module: m.rank for m in report.modules} == {"m.q": 4, "m.v": 4}  # min(2r, out, in)
    assert all(m.clamped and m.energy_kept == pytest.approx(1.0) for m in report.modules)
    assert any("--r 10" in n for n in report.notes)
    assert adapter.config.r == 4


def test_identical_adapters_are_noted(tmp_path, gen):
    trained, _ = _pair(tmp_path, gen)
    _, report = convert(trained, trained)
    assert any("TRAINED equals --initial" in n for n in report.notes)


@pytest.mark.parametrize("changes, message", [
    (dict(drop="m.v"), r"modules only in TRAINED \(1\): m.v"),
    (dict(init_changes=dict(use_rslora=True)), "config use_rslora: TRAINED False, --initial True"),
    (dict(init_changes=dict(lora_alpha=8)), r"m.q: \(r, alpha, kind\) TRAINED \(2, 4.0, 'linear'\), --initial \(2, 8.0"),
])
def test_initial_that_is_not_the_initial_state(tmp_path, gen, changes, message):
    trained, init = _pair(tmp_path, gen, **changes)
    with pytest.raises(InputError, match=message) as err:
        convert_to_dir(trained, init, tmp_path / "out")
    assert "is not the initial state of" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_initial_with_other_ranks_lists_every_module(tmp_path, gen):
    trained, _ = _pair(tmp_path, gen)
    (tmp_path / "other").mkdir()
    _, init = _pair(tmp_path / "other", gen, r=3)
    with pytest.raises(InputError) as err:
        convert(trained, init)
    assert "m.q: (r, alpha, kind) TRAINED (2, 4.0, 'linear'), --initial (3, 4.0, 'linear')" in str(err.value)
    assert "m.v:" in str(err.value)


def test_bad_r_and_existing_output(tmp_path, gen):
    trained, init = _pair(tmp_path, gen)
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        convert(trained, init, r=0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(OutputExistsError):
        convert_to_dir(trained, init, tmp_path / "out")
    convert_to_dir(trained, init, tmp_path / "out", force=True)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_not_a_pissa_initial_state_is_noted(tmp_path, gen):
    trained, init = _pair(tmp_path, gen, init_changes=dict(init_lora_weights="gaussian"))
    _, report = convert(trained, init)
    assert any("init_lora_weights='gaussian'" in n for n in report.notes)
