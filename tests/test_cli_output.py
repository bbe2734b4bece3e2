"""Every command's output ends with exactly one newline: reports (text and JSON), help, and error messages.

Commands are taken from ``main.commands``, so a new command is covered without editing this file; its report
output is covered by the README examples (``tests/test_readme.py`` requires one per command and checks the ending).
"""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from lorasurg.cli import main
from lorasurg.cli._app import emit


def _ends_with_one_newline(text: str) -> bool:
    return text.endswith("\n") and not text.endswith("\n\n")


@pytest.mark.parametrize("name", sorted(main.commands))
def test_help_ends_with_a_newline(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0 and _ends_with_one_newline(result.stdout), repr(result.stdout[-80:])


@pytest.mark.parametrize("name", sorted(main.commands))
def test_an_error_message_ends_with_a_newline(name, tmp_path):
    """Every argument a path that does not exist: a usage or input error (exit 2), its message on stderr."""
    arguments = [p for p in main.commands[name].params if isinstance(p, click.Argument)]
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path):
        result = runner.invoke(main, [name, *(f"missing-{p.name}" for p in arguments)])
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert result.stderr and _ends_with_one_newline(result.stderr), repr(result.stderr)


class _Report:
    def __init__(self, text: str) -> None:
        self.text = text

    def to_dict(self) -> dict:
        return {"text": self.text}

    def render(self) -> str:
        return self.text


@pytest.mark.parametrize("text", ["one line", "two\nlines", "ends\n", "ends twice\n\n", ""])
@pytest.mark.parametrize("as_json", [False, True])
def test_emit_ends_every_report_with_one_newline(text, as_json, capsys):
    emit(_Report(text), as_json)
    out = capsys.readouterr().out
    assert out.endswith("\n") and (out == "\n" or not out.endswith("\n\n")), repr(out)
