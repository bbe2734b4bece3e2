"""GGUF LoRA files (llama.cpp's adapter format), written tensor by tensor and read lazily, with the ``gguf`` package.

:func:`write_gguf` takes the file's metadata and the list of its tensors (name, shape, type) before any tensor
value: it writes the header, the metadata and the tensor table first, then asks for each tensor's values in order
and writes them, so one tensor is in memory at a time. The file is written next to its final path and renamed
into place at the end (never half-written; an existing file is replaced only with ``force``).

Output types (``--outtype``, as llama.cpp's converter names them): ``f32``, ``f16``, ``bf16`` and ``q8_0``. 1-D
tensors are always f32, and a ``q8_0`` tensor whose rows are not a multiple of its 32-element block (a ``lora_b``
of rank 16) is written f16, as llama.cpp's converter does.

:func:`open_gguf` reads the metadata and the tensor table (the data is memory-mapped by ``gguf.GGUFReader``) and
dequantizes one tensor at a time to float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import ConfigError, InputError
from .writer import atomic_output_file

__all__ = ["OUTTYPES", "GgufEntry", "GgufFile", "tensor_type", "write_gguf", "open_gguf", "is_gguf"]

#: ``--outtype`` -> (``gguf.GGMLQuantizationType`` member, ``gguf.LlamaFileType`` member).
OUTTYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}
_MAGIC = b"GGUF"

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class GgufEntry:
    """One tensor of a GGUF file: its name, its shape (PyTorch order: GGML's ``ne`` reversed) and its type name."""

    name: str
    shape: tuple[int, ...]
    type: str


def tensor_type(outtype: str, shape: Sequence[int]) -> str:
    """The GGML type a tensor of ``shape`` is written in for ``outtype`` (see the module docstring).

    Raises:
        ConfigError: an unknown ``outtype``.
    """
    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    import gguf

    qtype = OUTTYPES[outtype][0]
    if len(shape) <= 1:
        return "F32"
    block, _ = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)]
    return qtype if shape[-1] % block == 0 else "F16"


def _nbytes(shape: Sequence[int], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) // block * size


def write_gguf(path: PathLike, architecture: str, metadata: Iterable[tuple[str, Any, str]],
               entries: Sequence[GgufEntry], produce: Callable[[GgufEntry], torch.Tensor], *,
               force: bool = False) -> int:
    """Write a GGUF file: metadata, then ``entries`` in order, each from ``produce(entry)`` (float values of
    ``entry.shape``, converted to ``entry.type`` here).

    Args:
        architecture: ``general.architecture``.
        metadata: ``(key, value, gguf.GGUFValueType member name)``; an array value is a list of ``UINT32``.
        produce: called once per entry, in order, after everything before the data is written.

    Returns:
        The file's size in bytes.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false; InputError: ``path`` is a directory.
    """
    import gguf

    with atomic_output_file(path, force) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture)
        try:
            for key, value, vtype in metadata:
                if isinstance(value, (list, tuple)):
                    writer.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
                else:
                    writer.add_key_value(key, value, getattr(gguf.GGUFValueType, vtype))
            types = {e.name: getattr(gguf.GGMLQuantizationType, e.type) for e in entries}
            for e in entries:
                writer.add_tensor_info(e.name, e.shape, np.dtype(np.float32), _nbytes(e.shape, types[e.name]),
                                       raw_dtype=types[e.name])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for e in entries:
                values = produce(e)
                if tuple(values.shape) != e.shape:
                    raise AssertionError(f"{e.name}: produced shape {tuple(values.shape)}, planned {e.shape}")
                data = values.detach().to(torch.float32).cpu().contiguous().numpy()
                writer.write_tensor_data(gguf.quants.quantize(data, types[e.name]))
        finally:
            writer.close()
        return tmp.stat().st_size


def is_gguf(path: PathLike) -> bool:
    """Whether ``path`` is a file that starts with GGUF's magic bytes."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as handle:
        return handle.read(4) == _MAGIC


@dataclass
class GgufFile:
    """A GGUF file's metadata and tensor table; tensor values are read one at a time with :meth:`read`.

    Attributes:
        path: the file.
        fields: ``{key: value}`` of every metadata entry (strings, numbers, lists).
        entries: ``{tensor name: GgufEntry}`` in file order.
    """

    path: Path
    fields: dict[str, Any]
    entries: dict[str, GgufEntry]
    _reader: Any = field(default=None, repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as float32 (dequantized), shaped as :attr:`entries` says, in memory of its own."""
        import gguf

        tensor = next(t for t in self._reader.tensors if t.name == name)
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(self.entries[name].shape))


def open_gguf(path: PathLike) -> GgufFile:
    """Read a GGUF file's metadata and tensor table.

    Raises:
        InputError: the file is missing, not GGUF, truncated or otherwise unreadable.
    """
    import gguf

    p = Path(path)
    if not is_gguf(p):
        raise InputError(f"{p} is not a GGUF file (no GGUF magic bytes at its start)")
    try:
        reader = gguf.GGUFReader(p)
        fields = {}
        for key, value in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            fields[key] = value.contents()
        entries = {t.name: GgufEntry(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name)
                   for t in reader.tensors}
    except (ValueError, OSError, IndexError, KeyError) as err:
        raise InputError(f"cannot read GGUF file {p}: {type(err).__name__}: {err}; write or download it again") from err
    return GgufFile(p, fields, entries, reader)
