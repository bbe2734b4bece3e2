"""``lorasurg.surgery.residualize``: what it writes, what it reports, and every bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorasurg.engine.factors import LoraFactors, delta_weight
from lorasurg.errors import ConfigError, InputError, OutputExistsError
from lorasurg.io.adapter import Adapter
from lorasurg.io.checkpoint import Checkpoint
from lorasurg.surgery.residualize import residualize
from lorasurg.surgery.residualize import run as residualize_run
from lorasurg.targeting import rank_alpha
from tests.conftest import tol

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LLAMA = FIXTURES / "tiny-llama" / "base"


def _reconstructed(out: Path, base: Path, module: str, fan_in_fan_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + scale * B @ A, original weight) of one module, float64, in the weight's layout."""
    adapter = Adapter.load(out / "adapter")
    mod = adapter.modules[module]
    r, alpha = rank_alpha(adapter.config, module)
    scale = alpha / math.sqrt(r) if adapter.config.use_rslora else alpha / r
    f = LoraFactors("linear", mod.A.double(), mod.B.double(), scale, fan_in_fan_out=fan_in_fan_out)
    with Checkpoint.open(out / "model") as res, Checkpoint.open(base) as orig:
        w_res = res.get(f"{module}.weight", dtype=torch.float64)
        w = orig.get(f"{module}.weight", dtype=torch.float64)
    return w_res + delta_weight(f, tuple(w.shape)), w


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_1", "olora"])
def test_residual_plus_adapter_is_the_weight_and_report_says_what_it_took(tmp_path, init):
    report = residualize(LLAMA, tmp_path / "out", init=init, r=8, alpha=16)
    assert len(report.modules) == 14  # every linear layer but lm_head
    assert "lm_head" not in {m.module for m in report.modules}
    with Checkpoint.open(tmp_path / "out" / "model") as model:
        for row in report.modules:
            got, w = _reconstructed(tmp_path / "out", LLAMA, row.module)
            torch.testing.assert_close(got, w, **tol(torch.float32))
            w_res = model.get(f"{row.module}.weight", dtype=torch.float64)
            assert row.residual_norm == pytest.approx(float(torch.linalg.vector_norm(w_res)), rel=1e-5)
            assert row.relative_residual == pytest.approx(row.residual_norm / float(torch.linalg.vector_norm(w)), rel=1e-5)
            assert 0 < row.energy_taken and 0 < row.relative_residual
            if init.startswith("pissa"):  # W = U_r S_r Vh_r + residual, orthogonal parts: the energies add up
                assert row.energy_taken + row.relative_residual**2 == pytest.approx(1.0, abs=1e-4)
    data = report.to_dict()
    assert data["settings"]["init"] == init and data["model"]["edited"] == 14
    assert "14 weights residualized" in report.render()


def test_pissa_energy_taken_is_the_top_singular_values_share(tmp_path):
    report = residualize(LLAMA, tmp_path / "out", r=4, target_modules=["q_proj"])
    with Checkpoint.open(LLAMA) as ckpt:
        for row in report.modules:
            S = torch.linalg.svdvals(ckpt.get(f"{row.module}.weight", dtype=torch.float64))
            assert row.energy_taken == pytest.approx(float((S[:4] ** 2).sum() / (S**2).sum()), rel=1e-5)
            assert row.residual_norm == pytest.approx(float(S[4:].pow(2).sum().sqrt()), rel=1e-5)


def test_layout_side_files_and_provenance(tmp_path):
    from fixtures.make import make_pair

    base, _ = make_pair("llama", tmp_path / "pair", max_shard_size="60KB")
    (base / "tokenizer_config.json").write_text("{}")
    (base / "special_file.txt").write_text("kept")
    report = residualize(base, tmp_path / "out", r=4, alpha=8, init="pissa_niter_2", seed=5)
    model = tmp_path / "out" / "model"
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "special_file.txt"} <= set(report.model.side_files)
    assert (model / "config.json").read_bytes() == (base / "config.json").read_bytes()
    with Checkpoint.open(base) as b, Checkpoint.open(model) as m:
        assert b.names() == m.names() and all(b.dtype(n) == m.dtype(n) for n in b.names())
        touched = {f"{row.module}.weight" for row in report.modules}
        for name in set(b.names()) - touched:
            assert torch.equal(b.get(name), m.get(name)), name  # untouched tensors copied as stored
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(tmp_path / "out" / "model")
    with safe_open(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["lorasurg.method"] == "pissa_niter_2" and meta["lorasurg.r"] == "4" and meta["lorasurg.alpha"] == "8"
    assert meta["lorasurg.base"] == str(base) and meta["lorasurg.seed"] == "5" and "lorasurg.version" in meta
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "pissa_niter_2" in readme and str(base) in readme and "lorasurg convert" in readme


def test_seeded_and_reproducible(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        residualize(LLAMA, tmp_path / name, init="pissa_niter_1", r=4, seed=seed, target_modules=["q_proj"])
    files = {n: load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in "abc"}
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(files["a"][key], files["b"][key])
    assert not torch.equal(files["a"][key], files["c"][key])


def test_rank_clamped_per_module_keeps_the_scale(tmp_path):
    report = residualize(LLAMA, tmp_path / "out", r=48, alpha=96, target_modules=["k_proj", "q_proj"])
    ranks = {row.module: (row.rank, row.clamped) for row in report.modules}
    assert ranks["model.layers.0.self_attn.k_proj"] == (32, True)  # (32, 64): min(out, in) = 32
    assert ranks["model.layers.0.self_attn.q_proj"] == (48, False)
    assert any("clamped" in n and "k_proj" in n for n in report.notes)
    adapter = Adapter.load(tmp_path / "out" / "adapter")
    r, alpha = adapter.rank_alpha("model.layers.0.self_attn.k_proj")
    assert (r, alpha) == (32, 64.0)  # scale 2 kept
    got, w = _reconstructed(tmp_path / "out", LLAMA, "model.layers.0.self_attn.k_proj")
    torch.testing.assert_close(got, w, **tol(torch.float32))


def test_rslora_and_gpt2_conv1d_layout(tmp_path):
    base = FIXTURES / "tiny-gpt2" / "base"
    residualize(base, tmp_path / "out", r=4, alpha=4, use_rslora=True)
    adapter = Adapter.load(tmp_path / "out" / "adapter")
    assert adapter.config.use_rslora and adapter.config.fan_in_fan_out
    module = "transformer.h.0.attn.c_attn"
    assert tuple(adapter.modules[module].A.shape) == (4, 64) and tuple(adapter.modules[module].B.shape) == (192, 4)
    got, w = _reconstructed(tmp_path / "out", base, module, fan_in_fan_out=True)
    torch.testing.assert_close(got, w, **tol(torch.float32))


def test_dtype_option_and_bin_base(tmp_path):
    binary = tmp_path / "bin"
    binary.mkdir()
    with Checkpoint.open(LLAMA) as ckpt:
        torch.save({n: ckpt.get(n) for n in ckpt.names()}, binary / "pytorch_model.bin")
    (binary / "config.json").write_text((LLAMA / "config.json").read_text())
    report = residualize(binary, tmp_path / "out", r=4, dtype="bfloat16", target_modules=["q_proj"])
    assert report.model.weight_files == ["model.safetensors"]
    with Checkpoint.open(tmp_path / "out" / "model") as m:
        assert {m.dtype(n) for n in m.names()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "model" / "config.json").read_text())["dtype"] == "bfloat16"


def test_embedding_and_conv_targets_are_noted(tmp_path):
    report = residualize(LLAMA, tmp_path / "out", r=4, target_modules=["embed_tokens", "q_proj"])
    assert any("model.embed_tokens" in n and "embedding" in n for n in report.notes)
    with Checkpoint.open(LLAMA) as b, Checkpoint.open(tmp_path / "out" / "model") as m:
        assert torch.equal(b.get("model.embed_tokens.weight"), m.get("model.embed_tokens.weight"))


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs, message", [
    (dict(init="gaussian"), "init must be pissa, pissa_niter_N"),
    (dict(init="pissa_niter_x"), "iteration count"),
    (dict(init="loftq"), "not supported"),
    (dict(r=0), "r must be a positive integer"),
    (dict(alpha=-1.0), "alpha must be a positive number"),
    (dict(dtype="int8"), "dtype must be auto"),
    (dict(target_modules=["no_such_proj"]), "matches none of the model's"),
    (dict(device="tpu:9"), "is not a device"),
])
def test_bad_options(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        residualize(LLAMA, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_tied_output_layer_refused(tmp_path):
    with pytest.raises(InputError, match=r"lm_head \(its weight is model.embed_tokens.weight\)"):
        residualize(FIXTURES / "tiny-qwen2" / "base", tmp_path / "out", target_modules=["lm_head", "q_proj"])
    assert not (tmp_path / "out").exists()


def test_existing_output_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    monkeypatch.setattr(Checkpoint, "open", lambda *a, **k: pytest.fail("read BASE before checking the output"))
    with pytest.raises(OutputExistsError, match="--force"):
        residualize(LLAMA, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_force_replaces(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    residualize(LLAMA, tmp_path / "out", r=2, target_modules=["q_proj"], force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "adapter", "model"]


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = residualize_run.init_factors

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(residualize_run, "init_factors", interrupt)
    with pytest.raises(KeyboardInterrupt):
        residualize(LLAMA, tmp_path / "out", r=2)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory

