"""Bad numbers on the command line: NaN/inf in an adapter or a BASE weight is refused by name and nothing is written
(``validate`` and ``inspect`` report it); a negative ``lora_alpha`` is carried exactly by every command (PEFT
subtracts the delta), ``lora_alpha`` 0 is refused where no factors can keep it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorasurg import Adapter
from lorasurg.engine.factors import lora_scale
from tests.clitools import LLAMA, PISSA, assert_clean, assert_finite, refused, run
from tests.surgery.validate.broken import Q0, clean_adapter, save

V0 = "model.layers.0.self_attn.v_proj"
A_KEY = f"base_model.model.{Q0}.lora_A.weight"
B_KEY = f"base_model.model.{V0}.lora_B.weight"


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, Path]:
    """Adapters on the tiny Llama: ``good``; ``nan`` (one NaN in a lora_A); ``inf`` (one inf in a lora_B);
    ``negative`` (``good`` with lora_alpha -8 and alpha_pattern {v_proj: -3}); ``zero`` (lora_alpha 0)."""
    root = tmp_path_factory.mktemp("adapters")
    good = clean_adapter(r=4)
    save(good, root / "good")
    nan, inf = clean_adapter(r=4), clean_adapter(r=4)
    nan.modules[Q0].A[1, 2] = float("nan")
    inf.modules[V0].B[0, 3] = float("inf")
    save(nan, root / "nan")
    save(inf, root / "inf")
    save(good, root / "negative", lora_alpha=-8, alpha_pattern={"v_proj": -3})
    save(good, root / "zero", lora_alpha=0)
    return {p.name: p for p in root.iterdir()}


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    """Each module's ``scale * B @ A`` in float64, PEFT's scale (patterns applied)."""
    adapter = Adapter.load(path)
    out = {}
    for name, mod in adapter.modules.items():
        scale = lora_scale(*adapter.rank_alpha(name), adapter.config.use_rslora)
        out[name] = scale * mod.B.double() @ mod.A.double()  # (out, r) @ (r, in) -> (out, in)
    return out


# ------------------------------------------------------------------------------------------------ NaN and inf


@pytest.mark.parametrize("which, key", [("nan", A_KEY), ("inf", B_KEY)])
@pytest.mark.parametrize("command", ["fuse", "rerank", "merge", "convert"])
def test_a_nonfinite_adapter_is_refused_by_every_command_that_uses_it(broken, tmp_path, which, key, command):
    out = tmp_path / "out"
    argv = {
        "fuse": ["fuse", LLAMA, broken[which]],
        "rerank": ["rerank", broken[which], "--r", "2"],
        "merge": ["merge", broken[which], broken["good"]],
        "convert": ["convert", broken[which], "--initial", broken["good"]],
    }[command]
    message = refused(run(*argv, "-o", out), key, "NaN", "inf")
    assert f"{1 if which == 'nan' else 0} NaN and {1 if which == 'inf' else 0} inf" in message
    assert not out.exists()
    assert_clean(tmp_path)


def test_inspect_lists_a_nonfinite_tensor_and_skips_its_spectrum(broken):
    result = run("inspect", broken["nan"], "--json")
    assert result.exit_code == 0 and "Traceback" not in result.stderr, result.output
    report = json.loads(result.stdout)
    assert any(p.startswith(A_KEY) and "1 NaN and 0 inf" in p for p in report["problems"])
    assert any(Q0 in n and "no spectrum" in n for n in report["notes"])
    spectra = {m["name"]: m["spectrum"] for m in report["modules"]}
    assert spectra[Q0] == [] and all(spectra[m] for m in spectra if m != Q0)


def test_validate_reports_a_nonfinite_tensor_once(broken):
    result = run("validate", broken["inf"], "--json")
    assert result.exit_code == 1, result.output
    found = [f for f in json.loads(result.stdout)["findings"] if f["code"] == "value-nonfinite"]
    assert [f["where"] for f in found] == [B_KEY]


@pytest.fixture(scope="module")
def nonfinite_base(tmp_path_factory) -> Path:
    """The tiny Llama base with one NaN and one inf in layer 0's q_proj weight."""
    base = tmp_path_factory.mktemp("nan-base") / "base"
    shutil.copytree(LLAMA, base)
    state = load_file(str(base / "model.safetensors"))
    state[f"{Q0}.weight"][0, 0] = float("nan")
    state[f"{Q0}.weight"][1, 1] = float("inf")
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    return base


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
def test_residualize_refuses_a_nonfinite_target_weight(nonfinite_base, tmp_path, init):
    out = tmp_path / "out"
    refused(run("residualize", nonfinite_base, "--init", init, "--r", "4", "-o", out),
            f"{Q0}.weight holds 1 NaN and 1 inf", f"--exclude-modules {Q0}")
    assert not out.exists()
    assert_clean(tmp_path)


def test_residualize_without_the_nonfinite_module_writes_finite_tensors(nonfinite_base, tmp_path):
    out = tmp_path / "out"
    result = run("residualize", nonfinite_base, "--r", "4", "--exclude-modules", Q0, "-o", out)
    assert result.exit_code == 0, result.output
    assert_finite(out / "adapter")


def test_fuse_refuses_to_write_nan_it_would_make(nonfinite_base, broken, tmp_path):
    refused(run("fuse", nonfinite_base, broken["good"], "-o", tmp_path / "a"), f"{Q0}.weight in BASE", "NaN or inf")
    big = tmp_path / "big"
    shutil.copytree(LLAMA, big)
    state = load_file(str(big / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = 1e6  # beyond float16's range
    save_file(state, str(big / "model.safetensors"), metadata={"format": "pt"})
    refused(run("fuse", big, broken["good"], "--dtype", "float16", "-o", tmp_path / "b"),
            "model.layers.1.mlp.up_proj.weight would hold 0 NaN and 1 inf once cast to float16")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert_clean(tmp_path)


# ------------------------------------------------------------------------------------------------ lora_alpha sign


def test_validate_warns_of_a_negative_or_zero_alpha(broken):
    for which, where, value in (("negative", "lora_alpha", "-8"), ("negative", "alpha_pattern['v_proj']", "-3"),
                                ("zero", "lora_alpha", "0")):
        result = run("validate", broken[which], "--json")
        assert result.exit_code == 0, result.output
        found = {f["where"]: f for f in json.loads(result.stdout)["findings"] if f["code"] == "alpha-sign"}
        assert f"is {value}:" in found[where]["message"] and found[where]["severity"] == "warning"


@pytest.mark.parametrize("consumers", ["peft", "vllm", "llama.cpp", "all"])
def test_rerank_carries_a_negative_alpha_exactly(broken, tmp_path, consumers):
    """Above the stored rank the factors are kept (zero-padded): the delta, negative scale included, is unchanged."""
    result = run("rerank", broken["negative"], "--r", "6", "--for", consumers, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    expected, got = _deltas(broken["negative"]), _deltas(tmp_path / "out")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-9, msg=name)
    written = Adapter.load(tmp_path / "out")
    assert all(lora_scale(*written.rank_alpha(n), written.config.use_rslora) < 0 for n in got)


def test_rerank_truncates_a_negative_delta_like_its_positive_one(broken, tmp_path):
    for which in ("negative", "good"):
        assert run("rerank", broken[which], "--r", "2", "-o", tmp_path / which).exit_code == 0
    negative, good = _deltas(tmp_path / "negative"), _deltas(tmp_path / "good")
    for name, delta in negative.items():
        factor = -3 / 8 if "v_proj" in name else -1.0  # alpha -3 (pattern) or -8, against the good adapter's 8
        torch.testing.assert_close(delta, factor * good[name], rtol=1e-4, atol=1e-7, msg=name)


def test_merge_of_an_adapter_and_its_negation_is_zero(broken, tmp_path):
    negated = tmp_path / "negated"
    save(Adapter.load(broken["good"]), negated, lora_alpha=-8)
    for method in ("cat", "svd"):
        result = run("merge", broken["good"], negated, "--method", method, "--json", "-o", tmp_path / method)
        assert result.exit_code == 0, result.output
        for name, delta in _deltas(tmp_path / method).items():
            assert float(delta.abs().max()) < 1e-6, (method, name)


def test_convert_keeps_a_negative_scale(tmp_path):
    """TRAINED and INIT both at lora_alpha -r: the converted delta is s (B A - B0 A0) with s < 0."""
    trained, initial = tmp_path / "trained", tmp_path / "initial"
    for src, dst in ((PISSA / "trained", trained), (PISSA / "adapter", initial)):
        shutil.copytree(src, dst)
        config = json.loads((dst / "adapter_config.json").read_text())
        config["lora_alpha"] = -config["r"]
        (dst / "adapter_config.json").write_text(json.dumps(config))
    assert run("convert", trained, "--initial", initial, "-o", tmp_path / "out").exit_code == 0
    t, i, got = _deltas(trained), _deltas(initial), _deltas(tmp_path / "out")
    for name in got:
        torch.testing.assert_close(got[name], t[name] - i[name], rtol=1e-5, atol=1e-8, msg=name)


def test_rerank_refuses_a_zero_alpha(broken, tmp_path):
    refused(run("rerank", broken["zero"], "--r", "2", "-o", tmp_path / "out"), "scale 0 (lora_alpha 0)", Q0)
    assert not (tmp_path / "out").exists()
