"""``lorasurg.rerank``: optimal truncation, lossless equal/higher rank, scales kept, DoRA, layouts, refusals."""

from __future__ import annotations

import pytest
import torch

from lorasurg.engine.factors import LoraFactors, merged_weight
from lorasurg.errors import ConfigError, InputError, OutputExistsError
from lorasurg.io.adapter import Adapter
from lorasurg.surgery.rerank import rerank, rerank_to_dir
from lorasurg.targeting import anchored_pattern_key
from tests.conftest import tol
from tests.surgery.adapters import LAYERS, dense_bias, dense_delta, make_adapter, module_scale


def test_equal_rank_is_lossless_bit_for_bit():
    adapter = make_adapter(r=4, lora_bias=True, extra={"head.weight": torch.ones(3, 3)}, modules_to_save=["head"])
    result, report = rerank(adapter, r=4)
    assert result.to_state_dict().keys() == adapter.to_state_dict().keys()
    for key, tensor in adapter.to_state_dict().items():
        assert torch.equal(result.to_state_dict()[key], tensor), key
    assert all(m.energy_kept == 1.0 and m.rel_error == 0.0 and not m.padded for m in report.modules)


def test_higher_rank_zero_pads_losslessly():
    adapter = make_adapter(r=4)
    result, report = rerank(adapter, r=6)
    for name in adapter.modules:
        limit = min(dense_delta(adapter, name).shape)
        assert result.modules[name].rank == min(6, limit)
        torch.testing.assert_close(dense_delta(result, name), dense_delta(adapter, name), **tol(torch.float64))
    small = {"c3", "point"}  # min(out, in) = 4: nothing to pad
    assert [m.module for m in report.modules if m.padded] == [n for n in adapter.modules if n not in small]
    assert any("zero-padded" in n for n in report.notes)


def test_truncation_within_1_0001_of_eckart_young():
    """Every module, every layout: the error of the new delta vs the optimum from a dense float64 SVD."""
    adapter = make_adapter(r=8, lora_alpha=16)
    result, report = rerank(adapter, r=3)
    for name in adapter.modules:
        dense = dense_delta(adapter, name)
        S = torch.linalg.svdvals(dense)
        optimal = float(S[3:].pow(2).sum().sqrt())
        error = float(torch.linalg.norm(dense - dense_delta(result, name)))
        assert error <= 1.0001 * optimal, name
        assert result.modules[name].rank == 3
        row = next(m for m in report.modules if m.module == name)
        assert row.energy_kept == pytest.approx(float(S[:3].pow(2).sum() / S.pow(2).sum()), rel=1e-4)


def test_layouts_are_kept():
    adapter = make_adapter(r=4)
    result, _ = rerank(adapter, r=2)
    for name, mod in adapter.modules.items():
        new = result.modules[name]
        assert new.embedding == mod.embedding and new.kind == mod.kind
        assert new.A.shape == (2, *mod.A.shape[1:]) and new.B.shape == (mod.B.shape[0], 2, *mod.B.shape[2:])
        assert new.A.dtype == mod.A.dtype


@pytest.mark.parametrize("rslora", [False, True])
def test_every_module_keeps_its_scale(rslora):
    adapter = make_adapter(r=6, lora_alpha=12, use_rslora=rslora, rank_pattern={"lin": 4}, alpha_pattern={"c2": 3})
    result, report = rerank(adapter, r=3)
    for name in adapter.modules:
        assert module_scale(result, name) == pytest.approx(module_scale(adapter, name), rel=1e-12), name
        row = next(m for m in report.modules if m.module == name)
        assert row.scale == pytest.approx(module_scale(adapter, name))
    cfg = result.config
    assert cfg.r == 3 and cfg.use_rslora == rslora
    # the input's patterns are replaced by anchored keys for the modules whose scale differs from the global one
    assert set(cfg.alpha_pattern) <= {anchored_pattern_key(n) for n in adapter.modules}
    assert result.problems() == []


def test_rank_policy_chooses_per_module_from_the_exact_spectrum():
    adapter = make_adapter(r=8)
    result, report = rerank(adapter, rank_policy="energy:0.6")
    for name in adapter.modules:
        S = torch.linalg.svdvals(dense_delta(adapter, name))
        energy = torch.cumsum(S.pow(2), 0) / S.pow(2).sum()
        expected = int((energy < 0.6).sum()) + 1
        assert result.modules[name].rank == expected, name
        assert module_scale(result, name) == pytest.approx(module_scale(adapter, name))
    assert report.rank_policy == "energy:0.6"
    capped, _ = rerank(adapter, r=2, rank_policy="energy:0.99")
    assert max(m.rank for m in capped.modules.values()) == 2


def test_rank_zero_modules_are_left_out():
    adapter = make_adapter({"lin": LAYERS["lin"], "wide": LAYERS["wide"]}, r=4)
    adapter.modules["wide"].B.zero_()
    result, report = rerank(adapter, rank_policy="energy:0.9")
    assert set(result.modules) == {"lin"}
    assert report.dropped == ["wide"]
    assert set(result.config.target_modules) == {"lin"}
    assert result.problems() == []
    everything = make_adapter({"lin": LAYERS["lin"]}, r=4)
    everything.modules["lin"].B.zero_()
    with pytest.raises(InputError, match="keeps no singular value of any module"):
        rerank(everything, rank_policy="energy:0.9")


def test_clamped_rank_is_said():
    adapter = make_adapter({"lin": LAYERS["lin"], "wide": LAYERS["wide"]}, r=4)
    result, report = rerank(adapter, r=50)
    assert result.modules["lin"].rank == 10 and result.modules["wide"].rank == 9
    assert all(m.clamped for m in report.modules)
    assert any("exceeds min(out, in)" in n for n in report.notes)
    assert "* rank clamped" in report.render()


def test_lora_bias_and_modules_to_save_carry_over():
    extra = {"head.weight": torch.randn(3, 3)}
    adapter = make_adapter(r=6, lora_bias=True, modules_to_save=["head"], extra=extra)
    result, report = rerank(adapter, r=2)
    for name, mod in adapter.modules.items():
        if mod.bias is not None:
            assert torch.equal(result.modules[name].bias, mod.bias)
            torch.testing.assert_close(dense_bias(result, name), dense_bias(adapter, name), **tol(torch.float64))
    assert torch.equal(result.extra["head.weight"], extra["head.weight"])
    assert result.config.lora_bias and result.config.modules_to_save == ["head"]


def test_dora_keeps_the_magnitude_and_the_adapted_weights_norms():
    """DoRA: W' = m (W + delta) / ||W + delta||_row has row norms m for any delta; rerank keeps m, so the adapted
    weight's norms are kept exactly, and its direction moves by no more than the truncation error allows."""
    layers = {"lin": LAYERS["lin"], "c2": LAYERS["c2"], "emb": LAYERS["emb"]}
    adapter = make_adapter(layers, r=6, use_dora=True)
    result, report = rerank(adapter, r=2)
    gen = torch.Generator().manual_seed(3)
    for name, (kind, shape) in layers.items():
        old, new = adapter.modules[name], result.modules[name]
        assert torch.equal(new.magnitude, old.magnitude)
        W = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
        f_old = LoraFactors(kind, old.A.double(), old.B.double(), module_scale(adapter, name), magnitude=old.magnitude.double())
        f_new = LoraFactors(kind, new.A.double(), new.B.double(), module_scale(result, name), magnitude=new.magnitude.double())
        w_old, w_new = merged_weight(f_old, W), merged_weight(f_new, W)
        rows = (lambda w: w.T if kind == "embedding" else w.reshape(w.shape[0], -1))
        torch.testing.assert_close(rows(w_new).norm(dim=1), old.magnitude.double(), **tol(torch.float64))
        torch.testing.assert_close(rows(w_old).norm(dim=1), old.magnitude.double(), **tol(torch.float64))
        assert not torch.allclose(w_new, w_old)  # the direction did change (rank 6 -> 2)
    assert any("DoRA" in n for n in report.notes)
    same, _ = rerank(adapter, r=6)  # equal rank: the adapted weights are identical
    assert all(torch.equal(same.modules[n].A, adapter.modules[n].A) for n in layers)


def test_writes_and_refuses_to_overwrite(tmp_path):
    adapter = make_adapter({"lin": LAYERS["lin"]}, r=4)
    adapter.save(tmp_path / "in")
    report = rerank_to_dir(tmp_path / "in", tmp_path / "out", r=2)
    assert report.output == str(tmp_path / "out")
    loaded = Adapter.load(tmp_path / "out")
    assert loaded.modules["lin"].rank == 2 and loaded.config.r == 2
    before = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="--force"):
        rerank_to_dir(tmp_path / "in", tmp_path / "out", r=3)
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == before
    rerank_to_dir(tmp_path / "in", tmp_path / "out", r=3, force=True)
    assert Adapter.load(tmp_path / "out").modules["lin"].rank == 3
    d = report.to_dict()
    assert d["totals"]["modules"] == 1 and d["modules"][0]["new_rank"] == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "rerank needs a new rank: --r N"),
    (dict(r=0), "--r must be an integer >= 1, got 0"),
    (dict(r=-3), "--r must be an integer >= 1, got -3"),
    (dict(rank_policy="energy:2"), "the value must be a fraction"),
    (dict(rank_policy="bogus:1"), "unknown rank policy"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        rerank(make_adapter({"lin": LAYERS["lin"]}), **kwargs)


def test_inconsistent_adapter_is_refused():
    adapter = make_adapter({"lin": LAYERS["lin"]}, r=4)
    adapter.config.r = 5
    with pytest.raises(InputError, match="stored rank 4, config gives r=5"):
        rerank(adapter, r=2)
