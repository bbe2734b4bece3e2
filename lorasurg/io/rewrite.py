"""Rewrite a checkpoint tensor by tensor into a new directory laid out like it.

This is the one piece of machinery behind every command that writes a *model* (``residualize`` writes residual
weights, ``fuse`` merged ones): BASE is streamed tensor by tensor in shard order; an *editor* decides for each
tensor whether it is copied through as stored (same name, same dtype, same bytes) or replaced by tensors it
computes (possibly more than one: a new bias, an untied output head); everything else in BASE's directory that is
not a weight file (config.json, generation config, tokenizer files, chat template, model card, ...) is copied.

Layout of the output, as BASE's:

* the same shards: every tensor goes into the shard that held it in BASE (a tensor the editor adds goes with the
  tensor it was added for), the shards are named ``{prefix}.safetensors`` (one) or
  ``{prefix}-0000i-of-0000N.safetensors`` with ``{prefix}.safetensors.index.json`` written last, where ``prefix``
  is BASE's (``model``; a ``pytorch_model*.bin`` checkpoint, read with ``torch.load(weights_only=True)``,
  becomes ``model*.safetensors``);
* the same tensor names and dtypes, unless ``dtype`` asks for another float dtype (then every floating tensor is
  cast and config.json's ``dtype``/``torch_dtype`` says so) -- except buffers (:meth:`Checkpoint.is_buffer`:
  ``rotary_emb.inv_freq``, ``position_ids``, GPT-2's ``attn.bias``/``masked_bias``, ...), which are always copied as
  stored: a bfloat16 ``inv_freq`` would move the rotary frequencies of whatever still reads it, and a buffer is
  not a weight the requested dtype is about;
* config.json with ``config_updates`` applied (e.g. ``attention_bias: true``); copied byte for byte otherwise.

Files in BASE's directory that hold weights in other formats (``*.bin``, ``*.pt``, ``*.h5``, ``*.msgpack``,
``*.gguf``, ``*.onnx``, ...) would be stale next to the rewritten weights: they are not copied, and neither are
subdirectories or hidden files; :class:`RewriteResult` lists what was left out.

Memory: one tensor at a time (what the editor reads, plus what it returns), or less: a tensor named in
``copy_blocks`` is copied through in row blocks, and an editor may return a :class:`RowBlocks` (a tensor computed
block by block from :meth:`TensorSource.row_blocks`), which the writer spools block by block
(:meth:`~lorasurg.io.writer.ShardedWriter.add_rows`), so such a tensor is never whole in memory. Every tensor is
read through :meth:`TensorSource.read` or :meth:`TensorSource.row_blocks`, the places that decide how a tensor is
brought into memory.

Atomicity is the caller's: write into a directory from :func:`~lorasurg.io.writer.atomic_output_dir`.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import InputError
from ._memory import return_freed_memory
from .checkpoint import Checkpoint
from .values import all_finite, describe_nonfinite
from .writer import SIDE_FILES, ShardedWriter, copy_side_files, ensure_room

__all__ = [
    "TensorSource", "RowBlocks", "Edit", "RewriteResult", "rewrite_checkpoint", "WEIGHT_FILE_PATTERNS", "DTYPE_NAMES",
]

#: Files of a model directory that hold weights (in any format): never copied next to rewritten weights.
WEIGHT_FILE_PATTERNS: tuple[str, ...] = (
    "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.h5",
    "*.msgpack", "*.gguf", "*.onnx", "*.pdparams", "*.npz", "*.tflite",
)
#: Names config.json uses for a float dtype.
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")

Progress = Callable[[int, int, str], None]


class TensorSource:
    """Read access to BASE's tensors for an editor, in the dtype each will be written in.

    Attributes:
        checkpoint: the checkpoint being rewritten (names, shapes, dtypes, modules).
        dtype: the float dtype every floating tensor is written in, or None to keep each tensor's own.
    """

    def __init__(self, checkpoint: Checkpoint, dtype: Optional[torch.dtype]) -> None:
        self.checkpoint = checkpoint
        self.dtype = dtype

    def output_dtype(self, name: str) -> torch.dtype:
        """The dtype tensor ``name`` is written in: its own, or ``dtype`` for a floating tensor that is not a
        buffer."""
        stored = self.checkpoint.dtype(name)
        cast = self.dtype is not None and stored.is_floating_point and not self.checkpoint.is_buffer(name)
        return self.dtype if cast else stored

    def read(self, name: str, device: Union[str, torch.device, None] = None) -> Tensor:
        """Tensor ``name`` in its output dtype (see :meth:`output_dtype`), whole, on ``device`` (default CPU).

        This is where every tensor of a rewrite enters memory.
        """
        return self.checkpoint.get(name, dtype=self.output_dtype(name), device=device)

    def row_blocks(self, name: str, block_rows: int, device: Union[str, torch.device, None] = None
                   ) -> Iterator[tuple[int, Tensor]]:
        """Tensor ``name`` in its output dtype as ``(start row, block)`` pairs of at most ``block_rows`` rows (dim 0),
        each block ``(rows, *shape[1:])`` in new memory on ``device``, read straight from the safetensors file
        (:meth:`Checkpoint.row_reader`). A tensor of a ``.bin`` file (no row reader) or a scalar is read whole and
        given as slices of it. Close the generator (or run it to the end) to close the file.
        """
        shape = tuple(self.checkpoint.shape(name))
        reader = self.checkpoint.row_reader(name) if shape else None
        if reader is None:
            whole = self.read(name, device)
            if not shape:
                yield 0, whole
                return
            for start in range(0, shape[0], max(1, block_rows)):
                yield start, whole[start:start + block_rows]
            return
        dtype = self.output_dtype(name)
        try:
            for start in range(0, shape[0], max(1, block_rows)):
                stop = min(shape[0], start + max(1, block_rows))
                # no local keeps a block while the next one is read: one block in memory at a time
                yield start, reader.rows(start, stop).view(stop - start, *shape[1:]).to(device=device, dtype=dtype)
        finally:
            reader.close()


@dataclass
class RowBlocks:
    """A tensor an editor returns as consecutive row blocks (split along dim 0), computed as the writer asks for
    them: it is never whole in memory.

    Attributes:
        shape: the whole tensor's shape.
        dtype: its dtype (every block's).
        blocks: the blocks in order, each ``(rows, *shape[1:])`` (or flattened past dim 0); usually a generator.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocks: Iterable[Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


#: ``edit(name, source)``: None to copy tensor ``name`` through as stored (cast only for a ``dtype``), or the
#: ``(name, tensor)`` pairs to write in its place, in order (an empty list drops it); a tensor may be a
#: :class:`RowBlocks`.
Edit = Callable[[str, TensorSource], Optional[Sequence[tuple[str, Union[Tensor, RowBlocks]]]]]


@dataclass
class RewriteResult:
    """What :func:`rewrite_checkpoint` wrote.

    Attributes:
        weight_files: the weight files written (shards, then the index), names relative to the output directory.
        side_files: files copied from BASE's directory (config.json included).
        left_out: files and directories of BASE's directory that were not copied, with the reason.
        copied: tensors copied through unchanged.
        edited: BASE tensors the editor replaced (or dropped).
        written: tensors written in all.
        bytes: bytes of tensor data written.
        config_updates: the keys changed in config.json.
    """

    weight_files: list[str] = field(default_factory=list)
    side_files: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    copied: int = 0
    edited: int = 0
    written: int = 0
    bytes: int = 0
    config_updates: dict[str, Any] = field(default_factory=dict)


def rewrite_checkpoint(
    base: Checkpoint,
    directory: Union[str, os.PathLike],
    edit: Edit,
    *,
    dtype: Optional[torch.dtype] = None,
    config_updates: Optional[Mapping[str, Any]] = None,
    progress: Optional[Progress] = None,
    copy_blocks: Optional[Mapping[str, int]] = None,
) -> RewriteResult:
    """Write BASE, edited by ``edit``, into ``directory`` (created if missing; must hold no weights yet).

    Args:
        base: the open checkpoint to rewrite.
        directory: the output directory, usually inside :func:`~lorasurg.io.writer.atomic_output_dir`.
        edit: decides, tensor by tensor in shard order, what is written (see :data:`Edit`).
        dtype: write every floating tensor but buffers in this dtype (and say so in config.json); None keeps each
            tensor's.
        config_updates: keys to set in the copied config.json.
        progress: called as ``progress(done, total, name)`` in elements after each BASE tensor.
        copy_blocks: ``{tensor: rows}``: a tensor copied through (``edit`` returned None) is read and written in
            blocks of that many rows (:meth:`TensorSource.row_blocks`), never whole in memory.

    Returns:
        :class:`RewriteResult`.

    Raises:
        OutputExistsError: ``directory`` already holds weight files of that name.
        OutputError: the filesystem has no room for the weights (one shard's spool included), or a shard would pass
            the file-size limit (checked before anything is written, :func:`~lorasurg.io.writer.ensure_room`).
        UnsupportedError: a dtype safetensors cannot store.
        InputError: a tensor the rewrite made (an edit or a cast) holds NaN or inf (:func:`_check_finite` says why).
        and whatever ``edit`` raises (nothing is cleaned up here: use an atomic output directory).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    source = TensorSource(base, dtype)
    result = RewriteResult()
    names = base.names()
    shards: dict[Path, int] = {}
    for name in names:
        nbytes = math.prod(base.shape(name)) * torch.empty((), dtype=source.output_dtype(name)).element_size()
        shards[base.shard_of(name)] = shards.get(base.shard_of(name), 0) + nbytes
    largest = max(shards.values(), default=0)
    ensure_room(out, sum(shards.values()) + largest, largest, "the model's weights")  # + the spool of one shard
    total = sum(math.prod(base.shape(n)) for n in names)
    done = 0
    writer = ShardedWriter(out, max_shard_size=2**62, prefix=_output_prefix(base.files))
    with writer:
        current = None
        for name in names:
            shard = base.shard_of(name)
            if current is not None and shard != current:
                writer.end_shard()  # BASE's shard boundaries
            current = shard
            replacement = edit(name, source)
            made = replacement is not None or source.output_dtype(name) != base.dtype(name)  # computed or cast
            if replacement is None:
                rows = (copy_blocks or {}).get(name)
                copy = source.read(name) if rows is None else RowBlocks(
                    tuple(base.shape(name)), source.output_dtype(name), _blocks_only(source.row_blocks(name, rows)))
                replacement = [(name, copy)]
                result.copied += 1
            else:
                result.edited += 1
            for key, tensor in replacement:
                if isinstance(tensor, RowBlocks):
                    blocks = _finite_blocks(key, tensor.blocks, base, source) if made else tensor.blocks
                    writer.add_rows(key, tensor.shape, tensor.dtype, blocks)
                    result.bytes += tensor.nbytes
                else:
                    if made:
                        _check_finite(key, tensor, base, source)
                    writer.add(key, tensor)
                    result.bytes += tensor.numel() * tensor.element_size()
                result.written += 1
            replacement = copy = tensor = None  # nothing of this tensor stays alive while the next is read
            done += math.prod(base.shape(name))
            if progress is not None:
                progress(done, total, name)
    result.weight_files = [f.name for f in writer.files]
    updates = dict(config_updates or {})
    if dtype is not None and base.config is not None:
        updates.update({k: DTYPE_NAMES[dtype] for k in ("dtype", "torch_dtype") if k in base.config})
    result.config_updates = {k: v for k, v in updates.items() if (base.config or {}).get(k, object()) != v}
    result.side_files, result.left_out = _copy_side_files(base, out, result.config_updates)
    return result


def _check_finite(key: str, tensor: Tensor, base: Checkpoint, source: TensorSource) -> None:
    """Refuse to write a tensor the rewrite made (an edit, or a cast to ``dtype``) that holds NaN or inf, saying where
    they come from: BASE's own tensor, the cast, or the edit's arithmetic.

    Raises:
        InputError: naming the tensor, the counts and what to do.
    """
    if all_finite(tensor):
        return
    found = describe_nonfinite(tensor)
    if key in base and not _stored_finite(base, key):
        raise InputError(f"{key} in BASE ({base.path}) holds NaN or inf, so the rewritten tensor would hold {found}: "
                         "nothing was written. Fix the checkpoint (or leave this module out)")
    if key in base and source.output_dtype(key) != base.dtype(key):
        dtype = str(source.output_dtype(key)).removeprefix("torch.")
        raise InputError(f"{key} would hold {found} once cast to {dtype}: its values exceed that dtype's range. "
                         "Nothing was written; keep the stored dtype (--dtype auto) or use bfloat16")
    raise InputError(f"{key} would hold {found} (as {str(tensor.dtype).removeprefix('torch.')}): the arithmetic "
                     "overflowed. Nothing was written; check the inputs' values (lorasurg validate), or write a "
                     "wider --dtype")


def _finite_blocks(key: str, blocks: Iterable[Tensor], base: Checkpoint, source: TensorSource) -> Iterator[Tensor]:
    """``blocks``, each checked as :func:`_check_finite` checks a whole tensor."""
    for block in blocks:
        _check_finite(key, block, base, source)
        yield block


def _stored_finite(base: Checkpoint, name: str) -> bool:
    """Whether BASE's stored ``name`` holds only finite values (read in row blocks of about 64 MB)."""
    shape = tuple(base.shape(name))
    row = math.prod(shape[1:]) * torch.empty((), dtype=base.dtype(name)).element_size() if shape else 1
    pairs = TensorSource(base, None).row_blocks(name, max(1, (64 << 20) // max(row, 1)))
    try:
        return all(all_finite(block) for _, block in pairs)
    finally:
        pairs.close()


def _blocks_only(pairs: Iterator[tuple[int, Tensor]]) -> Iterator[Tensor]:
    """The blocks of ``(start, block)`` pairs, none kept while the next is read."""
    try:
        for _, block in pairs:
            yield block
            del block
            return_freed_memory()
    finally:
        pairs.close()


def _output_prefix(files: Sequence[Path]) -> str:
    """BASE's file-name stem without the shard numbering (``model``); ``pytorch_model`` becomes ``model``."""
    stem = files[0].name.split(".")[0] if files else "model"
    stem = _SHARD_SUFFIX.sub("", stem) or "model"
    return "model" if stem == "pytorch_model" else stem


def _is_weight_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in WEIGHT_FILE_PATTERNS)


def _copy_side_files(base: Checkpoint, out: Path, config_updates: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Copy BASE's non-weight files into ``out``; config.json with ``config_updates`` applied.

    A BASE given as a directory: every top-level file that is not a weight file or hidden. A BASE given as a
    weight file or index: the standard side files (:data:`~lorasurg.io.writer.SIDE_FILES`) of its directory.
    """
    root = base.path if base.path.is_dir() else base.path.parent
    left_out: list[str] = []
    if base.path.is_dir():
        names = []
        for entry in sorted(root.iterdir(), key=lambda p: p.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                left_out.append(f"{entry.name}/ (a subdirectory)")
            elif _is_weight_file(entry.name):
                if entry not in base.files and not entry.name.endswith(".index.json"):
                    left_out.append(f"{entry.name} (weights in another file or format: would be stale)")
            elif entry.is_file():
                names.append(entry.name)
    else:
        names = [n for n in SIDE_FILES if (root / n).is_file()]
    plain = [n for n in names if not (n == "config.json" and config_updates)]
    copied = copy_side_files(root, out, plain)
    if "config.json" in names and config_updates:
        config = dict(base.config or {})
        config.update(config_updates)
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        copied.append("config.json")
    return sorted(copied), left_out

