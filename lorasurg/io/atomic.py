"""Atomic outputs: every directory and file lorasurg writes is built under a temporary name next to its destination
and moved into place with ``os.replace`` once complete.

What every output gets from here (commands only open one with :func:`atomic_output_dir` or
:func:`atomic_output_file`):

* **Nothing half-written.** On any exception (``KeyboardInterrupt``, and the CLI's SIGTERM, which raises one) the
  temporary is removed, with SIGINT and SIGTERM held back until it is gone. An existing destination is only replaced
  with ``force``, after the new content is complete (``fuse -o BASE --force`` reads BASE until the end); if the
  final move fails, the old content is put back.
* **Checked before any work.** :func:`check_output_dir` (:func:`check_output_file` for a file) refuses a non-empty
  directory (an existing file) without ``force``, a file where a directory goes (and the reverse),
  and a place nothing can be created in (a parent that is a file, ``/proc``, ``/sys``, a read-only or forbidden
  directory), by creating and removing a probe directory there.
* **Modes from the umask.** Every file and directory in the output gets the mode the umask gives a new one (0644
  and 0755 under umask 022), whatever wrote it (safetensors and ``mkstemp`` create 0600 files).
* **Temporaries name their writer**: ``.NAME.tmp-PID-HOST-RANDOM`` (and ``.NAME.old-PID-HOST-RANDOM`` for the
  content being replaced). A run that writes NAME first removes those of a process on this host that no longer
  exists (killed with SIGKILL, a power loss) and warns once (:class:`~lorasurg.errors.LorasurgWarning`).
* **Write errors name the file.** An ``OSError`` while writing becomes an :class:`~lorasurg.errors.OutputError`
  naming the destination and the file; for a full disk (ENOSPC, EDQUOT) with what had been written and what is
  free, for the file-size limit (EFBIG, ``ulimit -f``) with the limit. :func:`ensure_room` refuses up front what
  cannot fit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from ..errors import InputError, LorasurgWarning, OutputError, OutputExistsError, option
from .sizes import format_size

__all__ = [
    "atomic_output_dir", "atomic_output_file", "check_output_dir", "check_output_file", "check_writable", "ensure_room",
    "named_errors", "destination",
]

PathLike = Union[str, os.PathLike]

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-(?P<host>[A-Za-z0-9._-]+)-[0-9a-f]{8}$")
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_WRITE_ERRNOS = _FULL | {errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR,
                         errno.EEXIST, errno.EISDIR}


# --- checks before any work ---------------------------------------------------------------------------------------

def check_output_dir(path: PathLike, force: bool = False) -> Path:
    """Refuse an output directory that would clobber something or cannot be written, before any work is done.

    A missing path or an empty directory is fine; a non-empty directory needs ``force``; a file is refused; so is a
    place where nothing can be created (see :func:`check_writable`).

    Raises:
        OutputExistsError: ``path`` is a non-empty directory and ``force`` is false.
        InputError: ``path`` is an existing file.
        OutputError: nothing can be created where ``path`` would go.
    """
    out = Path(path)
    if out.is_file():
        raise InputError(f"output path {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(
            f"output directory {out} exists and is not empty; choose another path or pass "
            f"{option('--force', 'force=True')} to replace it"
        )
    check_writable(out)
    return out


def check_output_file(path: PathLike, force: bool = False) -> Path:
    """Refuse an output file that would clobber something or cannot be written, before any work is done.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
        InputError: ``path`` is a directory.
        OutputError: nothing can be created where ``path`` would go (see :func:`check_writable`).
    """
    out = Path(path)
    if out.is_dir():
        raise InputError(f"output path {out} is a directory; give a file path")
    if out.exists() and not force:
        raise OutputExistsError(f"output file {out} exists; choose another path or pass "
                                f"{option('--force', 'force=True')} to replace it")
    check_writable(out)
    return out


def check_writable(path: PathLike) -> None:
    """Refuse ``path`` as an output when nothing can be created next to it: the nearest existing directory above it
    is a file, or creating a directory in it fails (permissions, a read-only filesystem, ``/proc``). A probe directory
    is created and removed; nothing else is touched.

    Raises:
        OutputError: naming the path, the directory and why.
    """
    out = Path(path).absolute()
    existing = out.parent
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write {path}: {existing} is a file, not a directory; choose another output path")
    try:
        _fresh_dir(existing, ".lorasurg-probe-").rmdir()
    except OSError as err:
        raise OutputError(f"cannot write {path}: nothing can be created in {existing} ({_reason(err)}); "
                          "choose another output path") from err


def ensure_room(directory: PathLike, total: int, largest: int, what: str) -> None:
    """Refuse, before writing, ``total`` bytes that the filesystem of ``directory`` has no room for, or a file of
    ``largest`` bytes above the process's file-size limit (``ulimit -f``).

    Args:
        directory: where the bytes go (a temporary directory of :func:`atomic_output_dir` is named by its destination).
        total: bytes the output needs at its peak; largest: its largest file; what: the output, for the message.

    Raises:
        OutputError: with what is needed and what is free (or the limit).
    """
    where = Path(directory)
    free = shutil.disk_usage(where).free
    if total > free:
        raise OutputError(f"not enough space for {what} in {destination(where)}: it needs {format_size(total)}, "
                          f"{format_size(free)} are free there; free some space or write it elsewhere")
    limit = _file_size_limit()
    if limit is not None and largest > limit:
        raise OutputError(f"cannot write {what} in {destination(where)}: its largest file needs "
                          f"{format_size(largest)}, above this process's file-size limit of {format_size(limit)} "
                          "(ulimit -f); raise the limit or write smaller files")


# --- atomic directories and files ---------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_output_dir(path: PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``path``, on error it is removed.

    The temporary directory is a sibling of ``path`` (same filesystem, so the final move is a rename); see the module
    docstring for the modes, the stale temporaries removed first and how write errors are reported.

    Raises:
        OutputExistsError / InputError / OutputError: see :func:`check_output_dir`; OutputError for a write that
        fails (disk full, file-size limit, permissions), naming the file.
    """
    out = check_output_dir(path, force).absolute()
    tmp, dir_mode = _temporary(out, _fresh_dir)
    with _writing(out, tmp, remove=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        yield tmp
        _apply_modes(tmp, dir_mode)
        if out.exists():
            trash = _fresh_dir(out.parent, _temp_prefix(out, "old"))
            os.replace(out, trash / "old")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(trash / "old", out)
                raise
            finally:
                shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)


@contextlib.contextmanager
def atomic_output_file(path: PathLike, force: bool = False) -> Iterator[Path]:
    """Yield the path of a fresh, empty temporary file next to ``path``; on success it replaces ``path`` (only with
    ``force`` when ``path`` exists), on error it is removed. Its mode is the umask's, as for :func:`atomic_output_dir`.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false. InputError: ``path`` is a directory.
        OutputError: as :func:`atomic_output_dir`.
    """
    out = check_output_file(path, force).absolute()
    tmp, mode = _temporary(out, _fresh_file)
    with _writing(out, tmp, remove=lambda: tmp.unlink(missing_ok=True)):
        yield tmp
        os.chmod(tmp, mode)  # a writer that replaced the file may have given it another mode
        os.replace(tmp, out)


@contextlib.contextmanager
def named_errors(path: PathLike) -> Iterator[None]:
    """Give an ``OSError`` raised inside (a ``write`` reports none) ``path`` as its file name."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror, os.fspath(path)) from err
        raise


def destination(path: PathLike) -> Path:
    """Where ``path`` ends up: each ``.NAME.tmp-...`` component of an atomic output replaced by ``NAME``."""
    parts = []
    for part in Path(path).parts:
        found = _TEMP.match(part)
        parts.append(found.group("name") if found else part)
    return Path(*parts)


# --- internals ----------------------------------------------------------------------------------------------------

def _temporary(out: Path, make: Callable[[Path, str], Path]) -> tuple[Path, int]:
    """Remove the stale temporaries of ``out``, create its parent directories and a fresh temporary next to it with
    ``make(parent, prefix)``; return the temporary and its mode (what mkdir's 0o777 or open's 0o666 became under the
    umask)."""
    _remove_stale(out)
    with _writing(out, out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = make(out.parent, _temp_prefix(out, "tmp"))
    return tmp, stat.S_IMODE(tmp.stat().st_mode)


@contextlib.contextmanager
def _writing(out: Path, tmp: Path, remove: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """On any exception, call ``remove`` (the partial output); turn an ``OSError`` of writing ``out`` (built in
    ``tmp``) into an :class:`OutputError` that names the file and, for a full disk or the file-size limit, the
    numbers. Errors that are not about writing pass through."""
    try:
        yield
    except BaseException as err:
        failed = _failed_file(err, out, tmp) if isinstance(err, OSError) else None
        written = _size_of(tmp) if failed is not None and tmp != out and tmp.exists() else 0
        if remove is not None:
            with _signals_held():  # a second Ctrl-C must not stop the removal halfway
                remove()
        if failed is None:
            raise
        raise OutputError(_write_failure(err, out, failed, written)) from err


def _failed_file(err: OSError, out: Path, tmp: Path) -> Optional[Path]:
    """The output file a failed write was writing (as it would be named in place), or None when ``err`` is not
    about writing ``out`` (a read error of an input passes through)."""
    if err.errno not in _WRITE_ERRNOS:
        return None
    files = [Path(os.path.abspath(f)) for f in (err.filename, getattr(err, "filename2", None)) if f is not None]
    ours = [f for f in files if _under(f, tmp) or _under(out, f) or _TEMP.match(f.name)]
    if ours:
        return destination(ours[0])
    if files and err.errno not in _FULL | {errno.EFBIG}:
        return None
    return destination(_newest(tmp)) if tmp.is_dir() else out


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block is done (they are delivered then); where the platform cannot,
    do nothing."""
    block = getattr(signal, "pthread_sigmask", None)
    if block is None:
        yield
        return
    previous = block(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        block(signal.SIG_SETMASK, previous)


def _write_failure(err: OSError, out: Path, culprit: Path, written: int) -> str:
    head = f"cannot write {out}"
    if culprit != out and _under(culprit, out):
        head += f" (writing {culprit.relative_to(out)})"
    elif culprit != out:
        head += f" (writing {culprit})"
    if err.errno in _FULL:
        return (f"{head}: no space left on the device. It had written {format_size(written)} when the disk filled "
                f"and needs more; {format_size(_free(out.parent))} are free there now that the partial output is "
                "removed. Free more space, or write elsewhere")
    if err.errno == errno.EFBIG:
        limit = _file_size_limit()
        said = f" of {format_size(limit)}" if limit is not None else ""
        return (f"{head}: the file needs more than this process's file-size limit{said} (ulimit -f); the partial "
                "output was removed. Raise the limit, or write to a filesystem that takes larger files")
    return f"{head}: {_reason(err)}; choose another output path"


def _reason(err: OSError) -> str:
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.EROFS:
        return "a read-only filesystem"
    if err.errno == errno.ENOENT:
        return "it takes no new entries, like the virtual filesystems /proc and /sys"
    return err.strerror or str(err)


def _host() -> str:
    """This machine's name as a temporary's name carries it."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "host"


def _temp_prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{os.getpid()}-{_host()}-"


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new empty directory ``parent/prefix<random>``, with the permissions the umask gives (unlike mkdtemp's
    0o700, which would make the final output unreadable to others)."""
    while True:
        candidate = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _fresh_file(parent: Path, prefix: str) -> Path:
    """A new empty file ``parent/prefix<random>``, mode 0o666 less the umask (unlike mkstemp's 0o600)."""
    while True:
        candidate = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return candidate
        except FileExistsError:
            continue


def _apply_modes(root: Path, dir_mode: int) -> None:
    """Give every directory under ``root`` ``dir_mode`` and every file ``dir_mode & 0o666`` (the umask's modes)."""
    for top, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(top, name), dir_mode, follow_symlinks=False)
        for name in files:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                os.chmod(path, dir_mode & 0o666)


def _remove_stale(out: Path) -> None:
    """Remove the temporaries of ``out`` left by a process of this host that is gone; warn once if any were."""
    host = _host()
    removed: list[str] = []
    try:
        siblings = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return
    for entry in siblings:
        found = _TEMP.match(entry.name)
        if found is None or found.group("name") != out.name or found.group("host") != host:
            continue
        pid = int(found.group("pid"))
        if pid == os.getpid() or _alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        if not entry.exists():
            removed.append(f"{entry.name} (process {pid})")
    if removed:
        warnings.warn(LorasurgWarning(
            f"removed {len(removed)} temporary output(s) next to {out} left by lorasurg runs that ended without "
            f"cleaning up (killed?): {', '.join(removed)}"), stacklevel=4)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    return True


def _under(path: Path, root: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(root)
    except ValueError:
        return False
    return True


def _newest(root: Path) -> Path:
    """The file under ``root`` modified last (the one being written when a write failed), or ``root``."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else root


def _size_of(root: Path) -> int:
    if root.is_file():
        return root.stat().st_size
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _free(directory: Path) -> int:
    while not directory.exists() and directory.parent != directory:
        directory = directory.parent
    return shutil.disk_usage(directory).free


def _file_size_limit() -> Optional[int]:
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)
