"""Writing checkpoints: atomic, non-clobbering output directories and a streaming sharded safetensors writer.

Every directory lorasurg writes is first built in a temporary sibling directory and moved into place with
``os.replace`` once complete (:mod:`.atomic`, re-exported here: :func:`atomic_output_dir`,
:func:`atomic_output_file`, :func:`check_output_dir`), so an interrupted run leaves no half-written output, a
directory being read (e.g. ``fuse`` writing over its own input with ``--force``) is only replaced after the last
read, every file gets the umask's mode, and a write that fails says which file and why.

:class:`ShardedWriter` writes the Hugging Face layout: ``model.safetensors`` (one shard), or
``model-00001-of-0000N.safetensors`` shards plus ``model.safetensors.index.json`` (written last), each shard
with ``{"format": "pt"}`` metadata. It holds about one tensor in memory (one row block of a tensor added with
:meth:`ShardedWriter.add_rows`): each tensor's bytes go to a spool file as they arrive, and a shard's file
(header, then data) is assembled from the spool when it is full.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping, Optional, Sequence, Union

import torch

from ..errors import InputError, OutputExistsError
from ._dtypes import code_of_dtype
from .atomic import (
    atomic_output_dir, atomic_output_file, check_output_dir, check_output_file, check_writable, ensure_room,
    named_errors,
)
from .sizes import UNITS, split_size

__all__ = [
    "atomic_output_dir",
    "atomic_output_file",
    "check_output_dir",
    "check_output_file",
    "check_writable",
    "ensure_room",
    "parse_size",
    "ShardedWriter",
    "write_checkpoint",
    "write_file",
    "copy_side_files",
    "SIDE_FILES",
    "DEFAULT_MAX_SHARD_SIZE",
]

PathLike = Union[str, os.PathLike]


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
                with named_errors(self._spool.name):
                    self._spool.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))  # (block bytes,)
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
        with named_errors(part):
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
            with named_errors(tmp):
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


def write_file(directory: PathLike, tensors: Mapping[str, torch.Tensor], prefix: str,
               metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``tensors`` as one ``{prefix}.safetensors`` in ``directory`` (an atomic output's temporary directory),
    after checking there is room for it (:func:`ensure_room`: the spool, then the file). Returns the file.

    Raises:
        OutputError: no room, or the write fails (from :func:`atomic_output_dir`, naming the file).
    """
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    ensure_room(directory, 2 * nbytes, nbytes, f"{prefix}.safetensors")
    with ShardedWriter(directory, max_shard_size=2**62, prefix=prefix, metadata=metadata) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    return writer.files[0]


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
