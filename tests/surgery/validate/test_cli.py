"""``lorasurg validate`` on the command line: exit codes 0/1/2, text, and --json as the only thing on stdout."""

from __future__ import annotations

import json

from click.testing import CliRunner

from lorasurg.cli import main

from tests.surgery.validate.broken import LLAMA, build, clean_adapter, save


def _run(*args):
    return CliRunner().invoke(main, ["validate", *map(str, args)])


def test_clean_adapter_exits_0(tmp_path):
    path = save(clean_adapter(), tmp_path / "a")
    result = _run(path, "--base", LLAMA)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("no problems found")


def test_errors_exit_1_with_every_finding_listed(tmp_path):
    path, base = build("target-unmatched", tmp_path / "a")
    result = _run(path, "--base", base)
    assert result.exit_code == 1
    assert "error    target-unmatched  target_modules['v_prj']" in result.stdout
    assert "fix: did you mean 'v_proj'" in result.stdout
    assert "1 error, 0 warnings, 0 info" in result.stdout
    assert result.stderr.strip() == "error: 1 error(s) found"


def test_warnings_alone_exit_0(tmp_path):
    path, base = build("untrained", tmp_path / "a")
    result = _run(path, "--base", base)
    assert result.exit_code == 0 and "warning  untrained  lora_B" in result.stdout


def test_json_is_one_document_on_stdout(tmp_path):
    path, base = build("bias-unflagged", tmp_path / "a")
    result = _run(path, "--base", base, "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)  # nothing else on stdout
    assert data["counts"]["error"] == 1 and data["base"] == str(base)
    (finding,) = data["findings"]
    assert set(finding) == {"severity", "code", "where", "message", "fix"}
    assert finding["code"] == "bias-unflagged" and finding["where"] == "model.layers.0.self_attn.q_proj"


def test_validation_that_cannot_run_exits_2(tmp_path):
    result = _run(tmp_path / "missing")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and "does not exist" in result.stderr
    assert "Traceback" not in result.output
    path = save(clean_adapter(), tmp_path / "a")
    bad_base = _run(path, "--base", tmp_path / "no-base", "--json")
    assert bad_base.exit_code == 2 and bad_base.stdout == ""


def test_fix_and_output_go_together(tmp_path):
    path = save(clean_adapter(), tmp_path / "a")
    for args in (["--fix"], ["-o", tmp_path / "out"]):
        result = _run(path, *args)
        assert result.exit_code == 2 and "--fix and -o/--output go together" in result.output
    assert not (tmp_path / "out").exists()
