"""Writing checkpoints: atomic, non-clobbering output directories and a streaming sharded safetensors writer.

Every directory lorasurg writes is first built in a temporary sibling directory and moved into place with
``os.replace`` once complete, so an interrupted run leaves no half-written output, and a directory being
read (e.g. ``fuse`` writing over its own input with ``--force``) is only replaced after the last read.

:class:`ShardedWriter` writes the Hugging Face layout: ``model.safetensors`` (one shard), or
``model-00001-of-0000N.safetensors`` shards plus ``model.safetensors.index.json`` (written last), each shard
with ``{"format": "pt"}`` metadata. It holds about one tensor in memory (one row block of a tensor added with
:meth:`ShardedWriter.add_rows`): each tensor's bytes go to a spool file as they arrive, and a shard's file
(header, then data) is assembled from the spool when it is full.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch

from ..errors import InputError, OutputExistsError
from ._dtypes import code_of_dtype
from .sizes import UNITS, split_size

__all__ = [
    "atomic_output_dir",
    "atomic_output_file",
    "check_output_dir",
    "check_output_file",
    "parse_size",
    "ShardedWriter",
    "write_checkpoint",
    "copy_side_files",
    "SIDE_FILES",
    "DEFAULT_MAX_SHARD_SIZE",
]

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

    The temporary directory is a sibling of ``path`` (same filesystem, so the final move is a rename) and gets
    the permissions a new directory would get (umask). An existing ``path`` is only removed after the new
    content is complete, and only with ``force``; if the final move fails, the old content is put back.

    Raises:
        OutputExistsError / InputError: see :func:`check_output_dir`.
    """
    out = check_output_dir(path, force).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(out.parent, f".{out.name}.tmp-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_file(path: PathLike, force: bool = False) -> Path:
    """Refuse an output file path that would clobber something, before any work is done.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
        InputError: ``path`` is a directory.
    """
    out = Path(path)
    if out.is_dir():
        raise InputError(f"output path {out} is a directory; give a file path")
    if out.exists() and not force:
        raise OutputExistsError(f"output file {out} exists; choose another path or pass --force (force=True) to "
                                "replace it")
    return out


@contextlib.contextmanager
def atomic_output_file(path: PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; on success it replaces ``path`` (a rename), on error it is
    removed, so ``path`` is never half-written and an existing one is only replaced with ``force``.

    Raises:
        OutputExistsError / InputError: see :func:`check_output_file`.
    """
    out = check_output_file(path, force).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:  # a new file with the permissions the umask gives (mkstemp's are 0o600)
        tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


# --- sharded safetensors ----------------------------------------------------------------------------------

DEFAULT_MAX_SHARD_SIZE = "5GB"
SIDE_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def parse_size(size: Union[int, str]) -> int:
    """Bytes in ``size``: an int, or a string in :mod:`lorasurg.io.sizes`' grammar, read as transformers reads
    ``max_shard_size`` (``"5GB"`` = 5e9, ``"500MB"``, ``"2GiB"`` = 2 * 2**30; a decimal unit ending in a lower-case
    ``b``, like ``"5Gb"``, means bits).

    Raises:
        InputError: not a positive size.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        found = split_size(str(size))
        if found is None or found[1] == "%":
            raise InputError(f"shard size {size!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a number of bytes")
        number, unit = found
        value = int(number * UNITS[unit.lower()])
        if unit.endswith("b") and unit.upper() in {"KB", "MB", "GB", "TB"}:
            value //= 8
    if value <= 0:
        raise InputError(f"shard size {size!r} must be positive")
    return value


@dataclass(frozen=True)
class _Spooled:
    name: str
    code: str
    shape: tuple[int, ...]
    itemsize: int
    offset: int  # in the spool file
    nbytes: int


class ShardedWriter:
    """Stream tensors into safetensors shards in an existing directory (usually one from
    :func:`atomic_output_dir`).

    Tensors are packed into shards in the order they are added; a new shard starts when the next tensor would
    take the current one past ``max_shard_size`` (a larger tensor gets a shard of its own). On :meth:`finish`
    the shards are named ``{prefix}-00001-of-0000N.safetensors`` and ``{prefix}.safetensors.index.json``
    (``{"metadata": {"total_size", "total_parameters"}, "weight_map": {name: file}}``) is written last; a single
    shard is ``{prefix}.safetensors`` with no index. A tensor too large to hold can be added as a sequence of row
    blocks (:meth:`add_rows`). Used as a context manager, it finishes on success and
    removes its files on error.

    Args:
        directory: where to write; must exist and hold no ``{prefix}*.safetensors`` or index already.
        max_shard_size: bytes of tensor data per shard (int or ``"5GB"``-style string, see :func:`parse_size`).
        prefix: file-name stem (``"model"``; ``"adapter_model"`` for an adapter).
        metadata: extra string metadata for every shard's header (``{"format": "pt"}`` is always there).

    Raises:
        InputError: bad ``max_shard_size``, or ``directory`` is not a directory.
        OutputExistsError: ``directory`` already has files this writer would write.
    """

    def __init__(
        self,
        directory: PathLike,
        max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
        prefix: str = "model",
        metadata: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.directory = Path(directory)
        self.max_shard_size = parse_size(max_shard_size)
        self.prefix = prefix
        self.metadata = {**(metadata or {}), "format": "pt"}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise ValueError(f"safetensors metadata must map strings to strings, got {metadata!r}")
        if not self.directory.is_dir():
            raise InputError(f"output directory {self.directory} does not exist")
        if not prefix or "/" in prefix or os.sep in prefix:
            raise InputError(f"file prefix {prefix!r} must be a plain file-name stem such as 'model'")
        clash = sorted(p.name for p in self.directory.glob(f"{prefix}*.safetensors*"))
        if clash:
            raise OutputExistsError(
                f"{self.directory} already holds {', '.join(clash)}; write into an empty directory "
                "(atomic_output_dir) instead"
            )
        self._spool: BinaryIO = open(self.directory / f".{prefix}.spool", "w+b")
        self._pending: list[_Spooled] = []
        self._pending_bytes = 0
        self._parts: list[Path] = []
        self._shard_of: dict[str, int] = {}
        self._total_size = 0
        self._total_params = 0
        self.files: list[Path] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (any device; written contiguous, in its own dtype). The caller may free it after.

        Raises:
            ValueError: ``name`` was already added, or the writer is finished.
            UnsupportedError: a dtype safetensors cannot store.
        """
        self.add_rows(name, tuple(tensor.shape), tensor.dtype, [tensor])

    def add_rows(self, name: str, shape: Sequence[int], dtype: torch.dtype, blocks: Iterable[torch.Tensor]) -> None:
        """Append one tensor of ``shape`` and ``dtype`` given as consecutive row blocks (split along dim 0), each
        spooled to disk as it comes: the tensor is never whole in memory. A block may be flattened past dim 0
        (``(rows, prod(shape[1:]))``); the bytes written are the blocks' in order.

        ``blocks`` may be a generator that reads and computes each block: it is closed when this returns or raises.

        Raises:
            ValueError: ``name`` was already added, the writer is finished, a block has another dtype or a row width
                other than ``shape``'s, or the blocks do not add up to ``shape``.
            UnsupportedError: a dtype safetensors cannot store.
        """
        if self._spool.closed:
            raise ValueError(f"writer for {self.directory} is finished")
        if name in self._shard_of or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} is reserved or was already written to {self.directory}")
        code = code_of_dtype(dtype, where=f"tensor {name!r}")
        shape = tuple(int(d) for d in shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = math.prod(shape)
        nbytes = numel * itemsize
        per_row = math.prod(shape[1:]) if shape else 1
        if self._pending and self._pending_bytes + nbytes > self.max_shard_size:
            self._write_shard()
        offset = self._spool.tell()
        written = 0
        iterator = iter(blocks)
        try:
            for block in iterator:
                rows = block.shape[0] if block.dim() else 1
                if block.dtype != dtype or (shape and block.numel() != rows * per_row):
                    raise ValueError(f"row block of {name!r} has dtype {block.dtype} and shape {tuple(block.shape)}; "
                                     f"the tensor is {dtype} {shape}")
                data = block.detach().to("cpu").contiguous()
                self._spool.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))  # flat bytes: (block bytes,)
                written += data.numel()
                del data, block
            if written != numel:
                raise ValueError(f"the row blocks of {name!r} hold {written} elements; its shape {shape} needs {numel}")
        except BaseException:
            self._spool.seek(offset)  # nothing of a refused tensor stays in the spool
            self._spool.truncate()
            raise
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        self._pending.append(_Spooled(name, code, shape, itemsize, offset, nbytes))
        self._pending_bytes += nbytes
        self._shard_of[name] = len(self._parts)
        self._total_size += nbytes
        self._total_params += numel

    def end_shard(self) -> None:
        """Close the current shard now, so the next tensor starts a new one (to keep another checkpoint's shard
        boundaries). Does nothing when no tensor is pending.

        Raises:
            ValueError: the writer is finished.
        """
        if self._spool.closed:
            raise ValueError(f"writer for {self.directory} is finished")
        if self._pending:
            self._write_shard()

    def _write_shard(self) -> None:
        """Write the pending tensors as one shard: 8-byte header length, JSON header, data.

        Data is laid out by element size, largest first, so every tensor starts at a multiple of its element
        size (the header is padded with spaces to 8 bytes), as safetensors itself does.
        """
        order = sorted(self._pending, key=lambda e: -e.itemsize)
        header: dict[str, object] = {"__metadata__": self.metadata}
        start = 0
        for e in order:
            header[e.name] = {"dtype": e.code, "shape": list(e.shape), "data_offsets": [start, start + e.nbytes]}
            start += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        part = self.directory / f".{self.prefix}-{len(self._parts) + 1:05d}.part"
        self._spool.flush()
        with open(part, "wb", buffering=0) as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for e in order:
                _copy_range(self._spool.fileno(), out.fileno(), e.offset, e.nbytes)
        self._parts.append(part)
        self._spool.seek(0)
        self._spool.truncate()
        self._pending, self._pending_bytes = [], 0

    def finish(self) -> list[Path]:
        """Write the last shard, give shards their final names, write the index; return the files written."""
        if self._spool.closed:
            return list(self.files)
        if self._pending or not self._parts:
            self._write_shard()
        self._close_spool()
        count = len(self._parts)
        names = [f"{self.prefix}.safetensors"] if count == 1 else [
            f"{self.prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)
        ]
        for part, name in zip(self._parts, names):
            os.replace(part, self.directory / name)
        self.files = [self.directory / name for name in names]
        if count > 1:
            index = {
                "metadata": {"total_parameters": self._total_params, "total_size": self._total_size},
                "weight_map": {k: names[i] for k, i in sorted(self._shard_of.items())},
            }
            index_path = self.directory / f"{self.prefix}.safetensors.index.json"
            tmp = index_path.with_name(f".{index_path.name}.tmp")
            tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, index_path)
            self.files.append(index_path)
        return list(self.files)

    def abort(self) -> None:
        """Remove the spool and the shards written so far (the directory itself is left)."""
        self._close_spool()
        for part in self._parts:
            part.unlink(missing_ok=True)
        self._parts = []

    def _close_spool(self) -> None:
        if not self._spool.closed:
            self._spool.close()
            Path(self._spool.name).unlink(missing_ok=True)

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Append ``count`` bytes of file ``src`` from ``offset`` to file ``dst`` (in-kernel when the OS can)."""
    end = offset + count
    in_kernel = hasattr(os, "copy_file_range")
    while offset < end:
        if in_kernel:
            try:
                copied = os.copy_file_range(src, dst, end - offset, offset)
            except OSError:  # e.g. a filesystem without it: copy through user space instead
                in_kernel = False
                continue
        else:
            chunk = os.pread(src, min(end - offset, 16 << 20), offset)
            copied = os.write(dst, chunk) if chunk else 0
        if copied == 0:
            raise OSError(f"spool file ended early at byte {offset}")
        offset += copied


def write_checkpoint(
    path: PathLike,
    tensors: Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]],
    *,
    force: bool = False,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    prefix: str = "model",
    side_files_from: Optional[PathLike] = None,
    metadata: Optional[Mapping[str, str]] = None,
) -> list[Path]:
    """Write ``tensors`` (a mapping, or an iterable of ``(name, tensor)`` consumed one at a time) as a sharded
    safetensors checkpoint at ``path``, atomically; copy :data:`SIDE_FILES` from ``side_files_from`` if given.

    ``path`` may be the directory the tensors are being read from (with ``force``): it is replaced only after
    the last tensor is written.

    Returns:
        the files written, under ``path``.

    Raises:
        OutputExistsError: ``path`` is a non-empty directory and ``force`` is false.
        InputError: ``path`` is a file, or a bad ``max_shard_size``.
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    with atomic_output_dir(path, force) as tmp:
        with ShardedWriter(tmp, max_shard_size, prefix, metadata) as writer:
            for name, tensor in items:
                writer.add(name, tensor)
        copied = copy_side_files(side_files_from, tmp) if side_files_from is not None else []
        names = [f.name for f in writer.files] + copied
    return [Path(path) / name for name in names]


def copy_side_files(src_dir: PathLike, dst_dir: PathLike, names: Sequence[str] = SIDE_FILES) -> list[str]:
    """Copy the files ``names`` (config, tokenizer, ...) that exist in ``src_dir`` into ``dst_dir``.

    Each copy is a new file; nothing in ``src_dir`` is written. Missing names are skipped.

    Returns:
        the names copied.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if src.resolve() == dst.resolve():
        return []
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied
