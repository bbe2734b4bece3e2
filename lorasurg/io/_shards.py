"""Readers for one weight file (a shard): safetensors via ``safe_open``, ``.bin`` via ``torch.load(weights_only)``.

A shard reader lists its tensors (name, shape, dtype) in file order and reads one tensor at a time into memory
the caller owns: safetensors with the ``pread`` backend (no mmap at all; an older safetensors without it is read
through mmap and copied), ``.bin`` through ``torch.load(mmap=True)`` and a copy. A tensor returned here is
never a view into a mapped file, so a later write to that file cannot change (or zero) it.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import torch

from ..errors import InputError
from ._dtypes import DTYPE_OF_CODE, dtype_of_code

__all__ = ["TensorEntry", "ShardReader", "SafetensorsShard", "BinShard", "RowReader", "open_shard"]

_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors refuses headers above 100 MB


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a shard, described from the file's header without reading the tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class ShardReader(Protocol):
    """What :class:`~lorasurg.io.checkpoint.Checkpoint` needs from one weight file."""

    path: Path

    def entries(self) -> list[TensorEntry]:
        """The file's tensors in file order."""
        ...

    def read(self, name: str) -> torch.Tensor:
        """A contiguous CPU copy of one tensor, owned by the caller."""
        ...

    def release(self) -> None:
        """Drop any per-file memory (a loaded ``.bin``); :meth:`read` reloads it when needed."""
        ...

    def close(self) -> None:
        """Release file handles."""
        ...


def _owned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``tensor`` with its own storage (never a view into a mapped file)."""
    return tensor.detach().clone(memory_format=torch.contiguous_format)


class SafetensorsShard:
    """One ``.safetensors`` file, opened with ``safe_open`` (header validated on open)."""

    def __init__(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            try:
                self._handle = safe_open(str(path), framework="pt", backend="pread")
                self._copies = False
            except TypeError:  # safetensors < 0.8 has no pread backend: read through mmap, then copy
                self._handle = safe_open(str(path), framework="pt")
                self._copies = True
            keys = self._handle.offset_keys() if hasattr(self._handle, "offset_keys") else self._handle.keys()
            self._entries = []
            for name in keys:
                view = self._handle.get_slice(name)
                where = f"tensor {name!r} in {path}"
                self._entries.append(TensorEntry(name, tuple(view.get_shape()), dtype_of_code(view.get_dtype(), where)))
        except SafetensorError as err:
            raise InputError(
                f"{path} is not a readable safetensors file: {_diagnose_safetensors(path)} (safetensors says: {err}). "
                "The file is truncated or corrupt: download or save it again"
            ) from err
        except OSError as err:
            raise InputError(f"cannot read {path}: {err}") from err

    def entries(self) -> list[TensorEntry]:
        return list(self._entries)

    def read(self, name: str) -> torch.Tensor:
        tensor = self._handle.get_tensor(name)
        return _owned_copy(tensor) if self._copies else tensor

    def release(self) -> None:
        pass

    def close(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle is not None and hasattr(handle, "__exit__"):
            handle.__exit__(None, None, None)


class RowReader:
    """Row blocks of one tensor of a safetensors file, read with ``os.preadv`` into new memory.

    For tensors too large to hold whole: ``rows(start, stop)`` reads only those rows, flattened to
    ``(stop - start, prod(shape[1:]))``, straight from the file (no mmap, no whole-tensor read).
    """

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self._fd = os.open(path, os.O_RDONLY)
        try:
            (header_len,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            entry = json.loads(os.pread(self._fd, header_len, 8))[name]
        except Exception:
            os.close(self._fd)
            raise
        self.dtype = dtype_of_code(entry["dtype"], f"tensor {name!r} in {path}")
        self.shape = tuple(int(d) for d in entry["shape"])
        self._offset = 8 + header_len + int(entry["data_offsets"][0])
        self._row_bytes = math.prod(self.shape[1:]) * torch.empty((), dtype=self.dtype).element_size()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` as a new ``(stop - start, prod(shape[1:]))`` tensor.

        Raises:
            InputError: the file is shorter than its header says.
        """
        buf = bytearray((stop - start) * self._row_bytes)
        got = os.preadv(self._fd, [buf], self._offset + start * self._row_bytes)
        if got != len(buf):
            raise InputError(f"short read of {self.name!r} rows {start}:{stop} from {self.path}: the file is truncated")
        return torch.frombuffer(buf, dtype=self.dtype).view(stop - start, -1)  # (rows, prod(shape[1:]))

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored row."""
        return self._row_bytes

    def rows_into(self, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        """Rows ``[start, stop)`` read into ``buffer`` (a contiguous ``uint8`` CPU tensor of at least
        ``(stop - start) * row_bytes`` bytes, reused between calls so no memory is allocated per block).

        Returns a ``(stop - start, prod(shape[1:]))`` view of ``buffer`` in the tensor's dtype; it is overwritten by
        the next call with the same buffer.

        Raises:
            InputError: the file is shorter than its header says.
        """
        n = (stop - start) * self._row_bytes
        view = buffer[:n]
        got = os.preadv(self._fd, [memoryview(view.numpy())], self._offset + start * self._row_bytes)
        if got != n:
            raise InputError(f"short read of {self.name!r} rows {start}:{stop} from {self.path}: the file is truncated")
        return view.view(self.dtype).view(stop - start, -1)  # (rows, prod(shape[1:]))

    def close(self) -> None:
        os.close(self._fd)


def _diagnose_safetensors(path: Path) -> str:
    """Say in words what is wrong with a safetensors file that ``safe_open`` refused, naming the tensor when one
    entry of the header is at fault."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return f"the file has {size} bytes, fewer than the 8-byte header length"
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _HEADER_LIMIT:
            return f"its first 8 bytes give a header length of {header_len} bytes, so it is not a safetensors file"
        if size < 8 + header_len:
            return f"its header is {header_len} bytes long but the file has only {size} bytes"
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        return "its header is not valid JSON"
    if not isinstance(header, dict):
        kind = {list: "array", str: "string", type(None): "null", bool: "boolean"}.get(type(header), "number")
        return (f"its header is a JSON {kind} ({raw[:40].decode('utf-8', 'replace').strip()!r}), not an object of "
                "tensor entries")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                return f"its __metadata__ is {json.dumps(entry)[:60]}, not an object of strings"
            continue
        problem = _entry_problem(entry)
        if problem:
            return f"tensor {name!r}: {problem}"
        spans.append((entry["data_offsets"][0], entry["data_offsets"][1], name))
    at, previous = 0, None
    for begin, stop, name in sorted(spans):
        if begin != at:
            where = f"the previous tensor {previous!r} ends" if previous else "the data starts"
            return f"tensor {name!r} starts at data byte {begin} but {where} at byte {at} (overlap or gap)"
        at, previous = stop, name
    expected = 8 + header_len + at
    if size != expected:
        only = "only " if size < expected else ""
        return f"its header describes {expected} bytes but the file has {only}{size} bytes"
    return "its header is inconsistent"


def _entry_problem(entry: object) -> Optional[str]:
    """What is wrong with one tensor's header entry ``{"dtype", "shape", "data_offsets"}``, or None."""
    if not isinstance(entry, dict):
        return f"its entry is {json.dumps(entry)[:60]}, not an object with dtype, shape and data_offsets"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_OF_CODE:
        return f"dtype {dtype!r} is not a safetensors dtype lorasurg reads ({', '.join(sorted(DTYPE_OF_CODE))})"
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return f"shape {shape!r} is not a list of non-negative integers"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        return f"data_offsets {offsets!r} are not two non-negative integers"
    nbytes = math.prod(shape) * DTYPE_OF_CODE[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        return (f"shape {shape} in {dtype} takes {nbytes} bytes but its data_offsets {offsets} span "
                f"{offsets[1] - offsets[0]}")
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class BinShard:
    """One ``pytorch_model*.bin`` file, read with ``torch.load(weights_only=True)`` (never unpickling code).

    The file is loaded with ``mmap=True`` when its format allows (zip format), so listing and reading cost
    little memory; the loaded dict is kept until :meth:`release`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._state: Optional[dict[str, torch.Tensor]] = None
        state = self._load()
        self._entries = [TensorEntry(name, tuple(t.shape), t.dtype) for name, t in state.items()]

    def _load(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            self._state = _load_bin(self.path)
        return self._state

    def entries(self) -> list[TensorEntry]:
        return list(self._entries)

    def read(self, name: str) -> torch.Tensor:
        return _owned_copy(self._load()[name])

    def release(self) -> None:
        self._state = None

    def close(self) -> None:
        self._state = None


def _torch_load(path: Path, mmap: bool) -> object:
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``; mmap when the file's format allows it.

    Raises:
        InputError: the file needs code to unpickle (refused), is corrupt, or is not a dict of tensors.
    """
    try:
        try:
            obj = _torch_load(path, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = _torch_load(path, mmap=False)  # legacy (non-zip) torch.save format
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f" (it references {found.group(1)})" if found else ""
        raise InputError(
            f"refusing to read {path}: loading it needs code to be unpickled{what}, and lorasurg only reads .bin "
            "files with torch.load(weights_only=True). If you trust the file, convert it to safetensors in a "
            "trusted environment (torch.load(..., weights_only=False), then safetensors.torch.save_file) and "
            "give lorasurg the .safetensors file"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise InputError(
            f"cannot read {path} as a PyTorch checkpoint ({str(err).splitlines()[0]}); the file is truncated or "
            "corrupt: download or save it again"
        ) from err
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        keys = list(obj)[:10] if isinstance(obj, dict) else []
        raise InputError(
            f"{path} does not hold a flat state dict of tensors (found {type(obj).__name__}"
            f"{' with keys ' + repr(keys) if keys else ''}); save the model's state_dict() itself"
        )
    return obj


def open_shard(path: Path) -> ShardReader:
    """The reader for one weight file, chosen by its suffix (``.safetensors``; anything else is a torch file).

    Raises:
        InputError: the file is missing, unreadable, corrupt, or (``.bin``) needs code to unpickle.
    """
    if not path.is_file():
        raise InputError(f"weight file {path} does not exist")
    if not os.access(path, os.R_OK):
        raise InputError(f"weight file {path} is not readable; check its permissions")
    return SafetensorsShard(path) if path.suffix == ".safetensors" else BinShard(path)
