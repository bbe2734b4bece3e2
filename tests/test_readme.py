"""Every example in README.md works as written: the python blocks run, every `lorasurg ...` line exits 0."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorasurg.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _commands() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                part = part.split("#")[0].strip()
                if part.startswith("lorasurg "):
                    lines.append(part)
    return lines


def test_readme_has_examples_for_every_command():
    commands = {shlex.split(c)[1] for c in _commands()}
    assert commands >= set(main.commands), f"commands without a README example: {set(main.commands) - commands}"


def _runnable(command: str) -> bool:
    """``--plot`` needs the optional matplotlib (the test extra installs it; skipped where it is absent)."""
    if "--plot" not in command:
        return True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_readme_cli_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    runner = CliRunner()
    for command in filter(_runnable, _commands()):  # in README order: later examples read what earlier ones wrote
        result = runner.invoke(main, shlex.split(command)[1:], catch_exceptions=False)
        assert result.exit_code == 0, f"{command}\n{result.output}"
        # every command's output ends with exactly one newline, so the next prompt starts on its own line
        assert result.stdout.endswith("\n") and not result.stdout.endswith("\n\n"), f"{command}: {result.stdout[-80:]!r}"


_PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("index", range(len(_PYTHON_BLOCKS)))
def test_readme_python_block_runs_on_its_own(index, tmp_path, monkeypatch):
    """Each python block runs as a user would paste it: in a fresh interpreter namespace and a fresh directory, with
    no name or file from another block."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    code = _PYTHON_BLOCKS[index]
    exec(compile(code, f"README.md (python block {index + 1})", "exec"), {"__name__": "readme"})
    for written in re.findall(r'\.save(?:_adapter)?\((?:model, )?"([^"]+)"', code):  # what it saved is complete
        assert (tmp_path / written / "adapter_model.safetensors").is_file(), written
        assert (tmp_path / written / "adapter_config.json").is_file(), written
