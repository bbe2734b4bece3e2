"""Start-up: the garbage collector is paused while lorasurg imports and restored as it was; the console script
freezes the start-up objects before running a command (see ``lorasurg/__init__.py`` and ``lorasurg.cli.run``)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("enabled", [True, False])
def test_import_restores_the_collector_as_it_was(enabled):
    code = (
        "import gc\n"
        f"{'gc.enable()' if enabled else 'gc.disable()'}\n"
        "import lorasurg\n"
        "print(gc.isenabled(), hasattr(lorasurg, '_collecting'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(enabled), "False"]


def test_console_script_freezes_before_the_command(monkeypatch):
    import gc

    import lorasurg.cli as cli

    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(cli, "main", lambda: calls.append("main"))
    monkeypatch.setattr(cli, "ignore_signals", lambda: calls.append("ignore signals"))  # the command is over
    cli.run()
    assert calls == ["freeze", "main", "ignore signals"]


def test_both_entry_points_run_the_console_script():
    """``lorasurg`` (pyproject's script) and ``python -m lorasurg.cli`` both go through :func:`lorasurg.cli.run`."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lorasurg": "lorasurg.cli:run"}
    code = ("import runpy, lorasurg.cli as c; c.main = lambda: print('ran'); "
            "runpy.run_module('lorasurg.cli', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ran"
