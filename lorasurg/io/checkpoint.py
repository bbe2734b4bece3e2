"""A lazy, read-only view of a model checkpoint that reads one tensor at a time.

Formats: a directory written by ``save_pretrained`` (``model.safetensors``, a sharded
``model.safetensors.index.json``, ``pytorch_model.bin`` or its index), a single ``.safetensors`` / ``.bin``
file, an ``*.index.json``, or a Hugging Face hub repo id (see :mod:`lorasurg.io._locate` for the rules).

Opening reads only headers (safetensors) or the pickled structure (``.bin``, memory-mapped), and checks every
shard: a corrupt file or a missing shard fails here, before any work. :meth:`Checkpoint.get` then reads one
tensor into memory the caller owns, so streaming a model costs about one tensor of memory, not one model.

Example::

    with Checkpoint.open("path/to/model") as ckpt:
        for name in ckpt.names():
            w = ckpt.get(name, dtype=torch.float32)
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from ..errors import InputError
from ..modules import ModuleInfo
from ._locate import Layout, locate
from ._shards import RowReader, ShardReader, TensorEntry, open_shard
from .hub import looks_like_repo_id, resolve_source
from .architecture import ModelDescription, describe_checkpoint

__all__ = ["Checkpoint", "RowReader", "read_model_config"]


class Checkpoint:
    """Read-only access to a checkpoint's tensors by name, one tensor at a time.

    Create with :meth:`open`; close with :meth:`close` or use as a context manager.

    Attributes:
        source: what was given to :meth:`open` (a path or a repo id), for messages.
        path: the local directory or file opened (a hub id's snapshot directory).
        files: the weight files, in shard order.
        config: the parsed ``config.json`` of the checkpoint's directory (the directory of a single weight file
            or index given as a path), or None.
    """

    def __init__(self, layout: Layout, shards: list[ShardReader], config: Optional[dict], source: str) -> None:
        """Use :meth:`open`. ``shards`` are in ``layout.files`` order; the checkpoint takes ownership of them."""
        self.source = source
        self.path = layout.path
        self.files: tuple[Path, ...] = layout.files
        self.config = config
        self._shards = shards
        self._entries: dict[str, tuple[int, TensorEntry]] = {}
        self._active: Optional[int] = None
        self._description: Optional[ModelDescription] = None
        self._closed = False
        self._index_entries(layout)

    def _index_entries(self, layout: Layout) -> None:
        """Fill ``_entries`` in shard order; with an index, check it against the shards (all problems at once)."""
        problems: list[str] = []
        for i, shard in enumerate(self._shards):
            for entry in shard.entries():
                if layout.weight_map is not None and layout.weight_map.get(entry.name) != shard.path:
                    continue  # the index assigns this key elsewhere (or not at all): the index is authoritative
                self._entries[entry.name] = (i, entry)
            shard.release()
        if layout.weight_map is not None:
            for name, file in layout.weight_map.items():
                if name not in self._entries:
                    problems.append(f"{name!r} (index says {file.name})")
        if problems:
            shown = "; ".join(problems[:10]) + (f"; ... ({len(problems) - 10} more)" if len(problems) > 10 else "")
            raise InputError(
                f"checkpoint index in {layout.path} names {len(problems)} tensor(s) that their shard does not hold: "
                f"{shown}. The index and shards do not belong together: download or save the checkpoint again"
            )

    @classmethod
    def open(cls, source: Union[str, "os.PathLike[str]"], revision: Optional[str] = None) -> "Checkpoint":
        """Open a checkpoint directory, weight file, index file or hub repo id.

        Args:
            source: local path, or a hub repo id (``org/name``) resolved through huggingface_hub's cache.
            revision: branch, tag or commit of a hub repo (hub ids only).

        Raises:
            InputError: missing path; no weights; corrupt or truncated safetensors; an index naming missing shards
                or tensors; a ``.bin`` needing code to unpickle; a repo id not in the cache while offline;
                an unreadable config.json.
        """
        layout = locate(source, revision)
        config = _read_config(layout.root)
        shards: list[ShardReader] = []
        try:
            for file in layout.files:
                shards.append(open_shard(file))
            return cls(layout, shards, config, os.fspath(source))
        except BaseException:
            for shard in shards:
                shard.close()
            raise

    # --- tensors -------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Tensor names in shard order: every name of shard 1 (in file order), then shard 2, ..."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _entry(self, name: str) -> tuple[int, TensorEntry]:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise InputError(
                f"tensor {name!r} is not in checkpoint {self.source} ({len(self._entries)} tensors){hint} "
                "Use Checkpoint.names() (or `lorasurg inspect`) to list them"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` (from the header; nothing is read). Raises InputError if unknown."""
        return self._entry(name)[1].shape

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor ``name``. Raises InputError if unknown."""
        return self._entry(name)[1].dtype

    def shard_of(self, name: str) -> Path:
        """The weight file holding tensor ``name``. Raises InputError if unknown."""
        return self.files[self._entry(name)[0]]

    def row_reader(self, name: str) -> Optional[RowReader]:
        """A reader of row blocks of tensor ``name`` straight from its safetensors file (the caller closes it),
        for tensors too large to read whole; None when the tensor is in a ``.bin`` file.

        Raises:
            InputError: ``name`` is not in the checkpoint.
        """
        path = self.shard_of(name)
        return RowReader(path, name) if path.suffix == ".safetensors" else None

    def get(
        self,
        name: str,
        dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device, None] = None,
    ) -> torch.Tensor:
        """Read one tensor into new memory the caller owns (never a view into a mapped file).

        Args:
            name: the tensor's key.
            dtype: cast to this dtype (default: as stored).
            device: move to this device (default: CPU).

        Raises:
            InputError: ``name`` is not in the checkpoint (the message suggests near names).
            ValueError: the checkpoint is closed.
        """
        if self._closed:
            raise ValueError(f"checkpoint {self.source} is closed")
        index, _ = self._entry(name)
        if self._active is not None and self._active != index:
            self._shards[self._active].release()  # hold one .bin shard at a time
        self._active = index
        tensor = self._shards[index].read(name)
        if dtype is not None or device is not None:
            tensor = tensor.to(device=device, dtype=dtype)
        return tensor

    def tensors(
        self,
        names: Optional[list[str]] = None,
        dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device, None] = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for ``names`` (default: all, in shard order), reading one at a time."""
        for name in self.names() if names is None else names:
            yield name, self.get(name, dtype=dtype, device=device)

    # --- modules -------------------------------------------------------------------------------------------

    def describe(self, task_type: Optional[str] = None) -> ModelDescription:
        """Module kinds, output layers and tied weights (see :mod:`lorasurg.io.architecture`); cached."""
        if self._description is None or task_type is not None:
            shapes = {name: entry.shape for name, (_, entry) in self._entries.items()}
            description = describe_checkpoint(shapes, self.config, task_type)
            if task_type is not None:
                return description
            self._description = description
        return self._description

    def module_infos(self) -> dict[str, ModuleInfo]:
        """``{module name: ModuleInfo}``; module names are key prefixes (``<name>.weight`` is a key)."""
        return dict(self.describe().modules)

    def output_layer_names(self, task_type: Optional[str] = None) -> set[str]:
        """Names of the output layers (``lm_head``, or the classifier of a SEQ_CLS model without one)."""
        return set(self.describe(task_type).output_layers)

    def tied_weights(self) -> dict[str, str]:
        """``{alias key: canonical key}`` for tied parameters, e.g. ``{"lm_head.weight": "model.embed_tokens.weight"}``
        when save_pretrained dropped a tied ``lm_head``. Read ``get(canonical)`` for an alias the file lacks.
        """
        return dict(self.describe().tied)

    def is_buffer(self, name: str) -> bool:
        """Whether the architecture registers ``name`` as a buffer (``position_ids``, ``rotary_emb.inv_freq``, GPT-2's
        ``attn.bias``, ...), not a parameter; asked of names this checkpoint holds or not (a buffer only the other
        side of a pair has). Buffers are not weights: commands that read checkpoints ignore them and say so. See
        :mod:`lorasurg.io.architecture` for how they are known; without a config.json no name is a buffer.
        """
        return name in self.describe().buffers

    def buffer_names(self) -> list[str]:
        """The names of this checkpoint's tensors that are buffers (:meth:`is_buffer`), in shard order."""
        buffers = self.describe().buffers
        return [name for name in self._entries if name in buffers] if buffers else []

    # --- lifetime ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release every file handle and loaded shard. Further :meth:`get` calls raise ValueError."""
        for shard in self._shards:
            shard.close()
        self._closed = True

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self._entries)} tensors in {len(self.files)} file(s))"


def read_model_config(source: Union[str, "os.PathLike[str]"], revision: Optional[str] = None) -> tuple[dict, Path]:
    """``(config, path of config.json)`` of a model, reading nothing else: ``source`` is a model directory, a file in
    it (a weights file or its ``config.json``), or a hub repo id (only its ``config.json`` is fetched).

    Raises:
        InputError: no such path or repo, no config.json there, or one that is not a JSON object.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        root = path if path.is_dir() else path.parent
    elif looks_like_repo_id(text):
        root = resolve_source(text, revision, ["config.json"])
    else:
        raise InputError(f"{text} does not exist (neither a local path nor a hub repo id)")
    config = _read_config(root)
    if config is None:
        raise InputError(f"{root} has no config.json; give the base model's directory (or its config.json)")
    return config, root / "config.json"


def _read_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"cannot parse {path}: {err}; fix the JSON or remove the file") from err
    if not isinstance(config, dict):
        raise InputError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config


def _read_config(root: Path) -> Optional[dict]:
    """The parsed ``config.json`` in ``root``, or None when there is none.

    Raises:
        InputError: the file exists but is not a JSON object.
    """
    path = root / "config.json"
    return _read_json(path) if path.is_file() else None
