"""Helpers for tests that drive ``lorasurg`` as a user types it and check what it left on disk.

``run`` invokes the CLI in-process (click's runner: stdout and stderr apart); ``refused`` checks a clean refusal
(exit code, an ``error:`` message naming what it must, no traceback); ``assert_clean`` that no temporary of an
atomic output is left; ``assert_modes`` that every file has the umask's mode; ``assert_finite`` that no written
tensor holds NaN or inf.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path
from typing import Iterator

import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file

from lorasurg.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
LLAMA = str(FIXTURES / "tiny-llama" / "base")
LLAMA_TUNED = str(FIXTURES / "tiny-llama" / "tuned")
PISSA = FIXTURES / "tiny-llama" / "pissa"

_TEMPORARY = re.compile(r"^\..+\.(tmp|old)-\d+-.+-[0-9a-f]{8}$|^\.lorasurg-probe-")


def run(*args: str) -> Result:
    """``lorasurg ARGS...`` in-process; exceptions other than the CLI's own exits are caught into the result."""
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(result: Result, *needles: str, code: int = 2) -> str:
    """Assert a clean refusal: exit ``code``, nothing on stdout, stderr starting ``error:`` and naming every needle,
    no traceback. Returns stderr."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.stdout == "", result.stdout
    assert result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and not isinstance(result.exception, (AssertionError, TypeError))
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    return result.stderr


def assert_clean(*roots: Path) -> None:
    """No temporary directory or file of an atomic output (``.NAME.tmp-...``, ``.NAME.old-...``, a probe) anywhere
    under ``roots``."""
    for root in roots:
        left = [p for p in Path(root).rglob(".*") if _TEMPORARY.match(p.name)]
        assert not left, left


def assert_modes(root: Path, file_mode: int = 0o644, dir_mode: int = 0o755) -> None:
    """Every file under ``root`` has ``file_mode`` and every directory (``root`` included) ``dir_mode``."""
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths
             if stat.S_IMODE(p.stat().st_mode) != (dir_mode if p.is_dir() else file_mode)}
    assert not wrong, wrong


def assert_finite(root: Path) -> None:
    """Every floating tensor of every ``.safetensors`` file under ``root`` holds finite values only."""
    files = list(Path(root).rglob("*.safetensors"))
    assert files, f"no safetensors file under {root}"
    for path in files:
        for key, tensor in load_file(str(path)).items():
            assert not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()), f"{path}: {key}"


@contextlib.contextmanager
def umask(mask: int = 0o022) -> Iterator[None]:
    """Run the block under ``mask`` (restored after)."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)
