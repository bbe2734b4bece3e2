"""``lorasurg merge`` and ``lorasurg rerank`` on the command line: outputs, JSON, and every bad input's message,
exit code 2 and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lorasurg.cli import main
from lorasurg.io.adapter import Adapter
from tests.surgery.adapters import LAYERS, make_adapter


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def adapters(tmp_path) -> dict[str, Path]:
    """Two r=4 adapters and one r=2 adapter on the same layers, one DoRA adapter, one for another base."""
    layers = {"lin": LAYERS["lin"], "c1": LAYERS["c1"], "emb": LAYERS["emb"]}
    paths = {}
    for name, adapter in {
        "a": make_adapter(layers, r=4, seed=1),
        "b": make_adapter(layers, r=4, seed=2, use_rslora=True),
        "r2": make_adapter(layers, r=2, seed=3),
        "dora": make_adapter(layers, r=4, seed=4, use_dora=True),
        "other": make_adapter({**layers, "lin": ("linear", (10, 14))}, r=4, seed=5),
    }.items():
        paths[name] = adapter.save(tmp_path / name)
    return paths


def test_merge_writes_and_reports(tmp_path, adapters):
    out = tmp_path / "m"
    result = run("merge", adapters["a"], adapters["b"], "--weights", "0.7,0.3", "-o", out)
    assert result.exit_code == 0, result.output
    merged = Adapter.load(out)
    assert set(merged.modules) == {"lin", "c1", "emb"} and merged.config.r == 4
    text = result.output
    assert "method=svd r=4" in text and "vs exact sum" in text and f"wrote {out}" in text
    assert "rsLoRA inputs" in text


def test_merge_json_every_method(tmp_path, adapters):
    for method in ["svd", "cat", "linear", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                   "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]:
        extra = [] if method in ("svd", "cat", "linear") else ["--density", "0.5"]
        result = run("merge", adapters["a"], adapters["b"], "--method", method, *extra, "--json", "-o",
                     tmp_path / method)
        assert result.exit_code == 0, (method, result.output)
        data = json.loads(result.output)
        assert data["settings"]["method"] == method and data["totals"]["modules"] == 3
        assert Adapter.load(tmp_path / method).problems() == []


def test_merge_default_output_path(tmp_path, adapters, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("merge", adapters["a"], adapters["r2"], "--method", "cat")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a+r2-cat" / "adapter_config.json").is_file()
    assert "wrote a+r2-cat" in result.output


@pytest.mark.parametrize("args, message", [
    (["a", "b", "--weights", "0.5"], "1 weight(s) [0.5] for 2 adapters"),
    (["a", "b", "--weights", "0.5,x"], "--weights '0.5,x': give numbers separated by commas"),
    (["a", "r2", "--method", "linear"], "needs every adapter to have the same rank on a module"),
    (["a", "b", "--method", "ties"], "method ties needs --density D"),
    (["a", "b", "--method", "ties", "--density", "0"], "--density must be in (0, 1]"),
    (["a", "b", "--method", "dare_ties", "--density", "1.01"], "--density must be in (0, 1]"),
    (["a", "b", "--density", "0.5"], "--density applies to the methods that trim or drop entries"),
    (["a", "b", "--r", "0"], "--r must be an integer >= 1, got 0"),
    (["a", "b", "--method", "linear", "--r", "8"], "--r sets the new rank of the svd methods"),
    (["a", "--method", "ties_svd", "--density", "0.5"], "needs at least two adapters, got one"),
    (["a", "dora"], "cannot merge DoRA adapters"),
    (["a", "other"], "different base models: 1 module(s)"),
    (["a", "b", "--method", "mean"], "Invalid value for '--method'"),
])
def test_merge_bad_input(tmp_path, adapters, args, message):
    args = [adapters.get(a, a) for a in args]
    result = run("merge", *args, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_merge_refuses_an_existing_output_without_force(tmp_path, adapters):
    out = tmp_path / "m"
    assert run("merge", adapters["a"], adapters["b"], "-o", out).exit_code == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    result = run("merge", adapters["a"], adapters["b"], "--weights", "1,1", "-o", out)
    assert result.exit_code == 2 and "pass --force" in result.output
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert run("merge", adapters["a"], adapters["b"], "--weights", "1,1", "-o", out, "--force").exit_code == 0
    assert (out / "adapter_model.safetensors").read_bytes() != before


def test_merge_clamps_r_and_says_so(tmp_path, adapters):
    result = run("merge", adapters["a"], adapters["b"], "--r", "100", "-o", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert "r=100 exceeds min(out, in)" in result.output
    assert Adapter.load(tmp_path / "m").modules["lin"].rank == 10


def test_rerank_writes_and_reports(tmp_path, adapters):
    result = run("rerank", adapters["a"], "--r", "2", "-o", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert "old r" in result.output and "energy kept" in result.output and f"wrote {tmp_path / 'r'}" in result.output
    assert Adapter.load(tmp_path / "r").config.r == 2
    result = run("rerank", adapters["dora"], "--rank-policy", "energy:0.5", "--json", "-o", tmp_path / "p")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["settings"]["rank_policy"] == "energy:0.5" and any("DoRA" in n for n in data["notes"])
    loaded = Adapter.load(tmp_path / "p")
    assert torch.equal(loaded.modules["lin"].magnitude, Adapter.load(adapters["dora"]).modules["lin"].magnitude)


def test_rerank_default_output_path(tmp_path, adapters, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("rerank", adapters["a"], "--r", "3").exit_code == 0
    assert (tmp_path / "a-r3" / "adapter_config.json").is_file()


@pytest.mark.parametrize("args, message", [
    ([], "rerank needs a new rank"),
    (["--r", "0"], "--r must be an integer >= 1, got 0"),
    (["--rank-policy", "energy:1.5"], "the value must be a fraction"),
    (["--rank-policy", "nope"], "unknown rank policy"),
])
def test_rerank_bad_input(tmp_path, adapters, args, message):
    result = run("rerank", adapters["a"], *args, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_rerank_missing_adapter_and_existing_output(tmp_path, adapters):
    result = run("rerank", tmp_path / "nope", "--r", "2", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "nope" in result.output
    assert run("rerank", adapters["a"], "--r", "2", "-o", tmp_path / "out").exit_code == 0
    result = run("rerank", adapters["a"], "--r", "3", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "--force" in result.output
