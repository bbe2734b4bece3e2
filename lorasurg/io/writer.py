"""Atomic, non-clobbering output directories (and, below, the sharded safetensors writer).

Every directory lorasurg writes is first built in a temporary sibling directory and moved into place with
``os.replace`` once complete, so an interrupted run leaves no half-written output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

from ..errors import InputError, OutputExistsError

__all__ = ["atomic_output_dir", "check_output_dir"]

PathLike = Union[str, os.PathLike]


def check_output_dir(path: PathLike, force: bool = False) -> Path:
    """Refuse an output path that would clobber something, before any work is done.

    A missing path or an empty directory is fine; a non-empty directory needs ``force``; a file is refused.

    Raises:
        OutputExistsError: ``path`` is a non-empty directory and ``force`` is false.
        InputError: ``path`` is an existing file.
    """
    out = Path(path)
    if out.is_file():
        raise InputError(f"output path {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(
            f"output directory {out} exists and is not empty; choose another path or pass --force (force=True) "
            "to replace it"
        )
    return out


@contextlib.contextmanager
def atomic_output_dir(path: PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``path``, on error it is removed.

    The temporary directory is a sibling of ``path`` (same filesystem, so the final move is a rename).
    An existing ``path`` is only removed after the new content is complete, and only with ``force``.

    Raises:
        OutputExistsError / InputError: see :func:`check_output_dir`.
    """
    out = check_output_dir(path, force).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
