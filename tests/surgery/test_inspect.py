"""``lorasurg inspect``: the report's figures and the CLI's output and exit codes."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from lorasurg import LoraConfig
from lorasurg.cli import main
from lorasurg.io.adapter import Adapter, AdapterModule
from lorasurg.surgery.inspect import inspect_adapter


def _save(tmp_path, gen, **config):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], rank_pattern={"v": 2}, **config)
    mods = {
        "l.0.q": AdapterModule("l.0.q", torch.randn(4, 6, generator=gen), torch.randn(6, 4, generator=gen)),
        "l.0.v": AdapterModule("l.0.v", torch.randn(2, 6, generator=gen), torch.randn(3, 2, generator=gen)),
    }
    Adapter(cfg, mods).save(tmp_path / "a")
    return tmp_path / "a"


def test_report_figures(tmp_path, gen):
    report = inspect_adapter(_save(tmp_path, gen, use_rslora=True))
    q, v = report.modules
    assert (q.name, q.rank, q.alpha, q.kind) == ("l.0.q", 4, 8, "linear")
    assert q.scale == 8 / 2 and v.scale == 8 / 2 ** 0.5  # rsLoRA: alpha / sqrt(r)
    assert report.total_parameters == 4 * 6 + 6 * 4 + 2 * 6 + 3 * 2
    assert report.total_bytes == 4 * report.total_parameters
    assert report.problems == []
    text = report.render()
    assert "l.0.v" in text and "no problems found" in text


def test_cli_text_and_json(tmp_path, gen):
    path = _save(tmp_path, gen)
    result = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [m["rank"] for m in data["modules"]] == [4, 2]
    assert data["config"]["rank_pattern"] == {"v": 2}
    text = CliRunner().invoke(main, ["inspect", str(path)])
    assert text.exit_code == 0 and "2 LoRA modules, 66 parameters" in text.output


def test_cli_reports_problems_without_failing(tmp_path, gen):
    path = _save(tmp_path, gen)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0
    assert "l.0.v: stored rank 2, config gives r=4" in result.output


def test_cli_bad_input_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "does not exist" in result.output
    assert "Traceback" not in result.output


def test_version_and_help():
    runner = CliRunner()
    assert runner.invoke(main, ["--version"]).output.strip() == "lorasurg, version 0.1.0"
    help_text = runner.invoke(main, ["--help"]).output
    assert "inspect" in help_text and "Examples" in help_text


# ------------------------------------------------------------------------------------ spectra, norms, plot

import math  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from lorasurg import Checkpoint, UnsupportedError  # noqa: E402
from tests.conftest import tol  # noqa: E402

LLAMA = Path(__file__).resolve().parents[2] / "fixtures" / "tiny-llama" / "base"


def _tol(dtype):
    """tests.conftest's tolerances, as pytest.approx's keywords."""
    t = tol(dtype)
    return {"rel": t["rtol"], "abs": t["atol"]}


def _orthonormal(n, k, gen):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q  # (n, k)


def _known_spectrum_adapter(tmp_path, gen, singular_values, scale_alpha=8):
    """layer 0's q: scale * B @ A = U diag(s) V^T with known s (r = len(s)); other modules random factors."""
    r = len(singular_values)
    U, V = _orthonormal(64, r, gen), _orthonormal(64, r, gen)
    s = torch.tensor(singular_values, dtype=torch.float64)
    scale = scale_alpha / r
    mods = {
        "model.layers.0.self_attn.q_proj": AdapterModule(
            "model.layers.0.self_attn.q_proj", (V * (s / scale).sqrt()).T.contiguous(), U * (s / scale).sqrt()),
        "model.layers.1.self_attn.q_proj": AdapterModule(
            "model.layers.1.self_attn.q_proj", torch.randn(r, 64, generator=gen, dtype=torch.float64),
            torch.randn(64, r, generator=gen, dtype=torch.float64)),
        "model.embed_tokens": AdapterModule(
            "model.embed_tokens", torch.randn(r, 256, generator=gen, dtype=torch.float64),
            torch.randn(64, r, generator=gen, dtype=torch.float64), embedding=True),
    }
    cfg = LoraConfig(r=r, lora_alpha=scale_alpha, target_modules=["q_proj", "embed_tokens"])
    Adapter(cfg, mods).save(tmp_path / "a")
    return tmp_path / "a", mods, scale


def test_spectrum_is_exact_from_the_factors(tmp_path, gen):
    path, mods, scale = _known_spectrum_adapter(tmp_path, gen, [3.0, 2.0, 0.5, 0.01])
    report = inspect_adapter(path)
    by_name = {m.name: m for m in report.modules}
    known = by_name["model.layers.0.self_attn.q_proj"]
    assert known.spectrum == pytest.approx([3.0, 2.0, 0.5, 0.01], **_tol(torch.float64))
    assert known.delta_norm == pytest.approx(math.sqrt(9 + 4 + 0.25 + 1e-4), **_tol(torch.float64))
    p = torch.tensor([3.0, 2.0, 0.5, 0.01], dtype=torch.float64)
    p = p / p.sum()
    assert known.effective_rank == pytest.approx(float(torch.exp(-(p * p.log()).sum())), **_tol(torch.float64))
    assert (known.rank_90, known.rank_99) == (2, 3)  # 13/13.25 = 98.1% at rank 2, 99.99% at rank 3
    for name in ("model.layers.1.self_attn.q_proj", "model.embed_tokens"):  # random: against the dense SVD
        mod = mods[name]
        dense = scale * mod.B @ mod.A  # (out, r) @ (r, in) -> (out, in)
        full = torch.linalg.svdvals(dense)  # rank 4: the rest are rounding noise
        assert by_name[name].spectrum == pytest.approx(full[:4].tolist(), **_tol(torch.float64))
        assert float(full[4:].max()) < 1e-10 * float(full[0])
        assert by_name[name].delta_norm == pytest.approx(float(dense.norm()), **_tol(torch.float64))


def test_relative_norms_and_layer_type_totals(tmp_path, gen):
    path, _, _ = _known_spectrum_adapter(tmp_path, gen, [3.0, 2.0, 0.5, 0.01])
    report = inspect_adapter(path, LLAMA)
    with Checkpoint.open(LLAMA) as ckpt:
        for m in report.modules:
            weight = ckpt.get(f"{m.name}.weight", dtype=torch.float64)
            assert m.relative_norm == pytest.approx(m.delta_norm / float(weight.norm()), **_tol(torch.float32))
    q_total = next(t for t in report.layer_types if t.layer_type == "q_proj")
    q_mods = [m for m in report.modules if m.layer_type == "q_proj"]
    assert (q_total.modules, q_total.rank) == (2, 8)
    assert q_total.delta_norm == pytest.approx(math.hypot(*(m.delta_norm for m in q_mods)), **_tol(torch.float64))
    assert q_total.rank_99 == sum(m.rank_99 for m in q_mods)
    text = report.render()
    assert "per layer type:" in text and "/||W||_F" in text and "(base: " in text
    assert "rank stored 12, rank keeping 99% of each module's delta" in text


def test_spectrum_of_a_conv_lora(tmp_path, gen):
    A, B = torch.randn(2, 3, 3, 3, generator=gen), torch.randn(4, 2, 1, 1, generator=gen)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["conv"])
    Adapter(cfg, {"conv": AdapterModule("conv", A, B)}).save(tmp_path / "c")
    (conv,) = inspect_adapter(tmp_path / "c").modules
    dense = 2 * B.reshape(4, 2).double() @ A.reshape(2, 27).double()  # (4, 2) @ (2, 27) -> (4, 27)
    full = torch.linalg.svdvals(dense)  # rank 2: two nonzero values
    assert conv.spectrum == pytest.approx(full[:2].tolist(), **_tol(torch.float32))
    assert float(full[2:].abs().max()) < 1e-10


def _png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_is_a_png_of_the_expected_size(tmp_path, gen):
    pytest.importorskip("matplotlib")
    from lorasurg.surgery.inspect.plot import DPI, FIGSIZE

    path, _, _ = _known_spectrum_adapter(tmp_path, gen, [3.0, 2.0, 0.5, 0.01])
    result = CliRunner().invoke(main, ["inspect", str(path), "--base", str(LLAMA), "--plot",
                                       str(tmp_path / "plots" / "s.png")])
    assert result.exit_code == 0, result.output
    assert _png_size(tmp_path / "plots" / "s.png") == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI)) == (1400, 600)
    assert f"plot written to {tmp_path / 'plots' / 's.png'}" in result.output
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["s.png"]  # no temporary file left


def test_plot_refuses_an_existing_file_without_force(tmp_path, gen):
    pytest.importorskip("matplotlib")
    path = _save(tmp_path, gen)
    (tmp_path / "s.png").write_bytes(b"keep")
    result = CliRunner().invoke(main, ["inspect", str(path), "--plot", str(tmp_path / "s.png")])
    assert result.exit_code == 2 and "exists; choose another --plot file or pass --force" in result.output
    assert (tmp_path / "s.png").read_bytes() == b"keep"
    assert CliRunner().invoke(main, ["inspect", str(path), "--plot", str(tmp_path / "s.png"), "--force"]).exit_code == 0
    assert _png_size(tmp_path / "s.png") == (1400, 600)
    bad = CliRunner().invoke(main, ["inspect", str(path), "--plot", str(tmp_path / "s.jpg")])
    assert bad.exit_code == 2 and "give a file name ending in .png" in bad.output


def test_plot_without_matplotlib_names_the_extra(tmp_path, gen, monkeypatch):
    path = _save(tmp_path, gen)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(UnsupportedError, match=r"pip install lorasurg\[plot\]"):
        inspect_adapter(path, plot=tmp_path / "s.png")
    result = CliRunner().invoke(main, ["inspect", str(path), "--plot", str(tmp_path / "s.png")])
    assert result.exit_code == 2 and "--plot needs matplotlib, which is not installed" in result.output
    assert not (tmp_path / "s.png").exists()
