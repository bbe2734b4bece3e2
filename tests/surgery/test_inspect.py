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
