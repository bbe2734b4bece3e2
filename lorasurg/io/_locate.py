"""Find the weight files of a checkpoint: a directory, a single file, an index, or a hub repo id.

Directory rules, first match wins: ``model.safetensors.index.json``, ``model.safetensors``,
``pytorch_model.bin.index.json``, ``pytorch_model.bin``; then a single other ``*.safetensors.index.json`` or a
single other ``*.safetensors`` file. A PEFT adapter directory (``adapter_config.json``) is refused.

A string that is not an existing path but looks like ``org/name`` is resolved through the hub cache
(:func:`lorasurg.io.hub.resolve_source`: ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``revision`` are honoured),
fetching only ``model*.safetensors``, their index, config and tokenizer files; ``pytorch_model*.bin`` only when
the repo has no safetensors. No code from a repo is ever run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

from ..errors import InputError
from .hub import looks_like_repo_id, resolve_source

__all__ = ["Layout", "locate", "STANDARD_WEIGHT_NAMES"]

STANDARD_WEIGHT_NAMES: tuple[str, ...] = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_SIDE_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "chat_template*",
]
_SAFETENSORS_PATTERNS = ["model*.safetensors", "model.safetensors.index.json"]
_BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


@dataclass(frozen=True)
class Layout:
    """Where a checkpoint's files are.

    Attributes:
        path: the directory or file that was opened (for a hub id, its snapshot directory).
        root: the directory that may hold ``config.json``.
        files: the weight files, in shard order.
        weight_map: ``{tensor name: weight file}`` from an index, or None for an unsharded checkpoint.
    """

    path: Path
    root: Path
    files: tuple[Path, ...]
    weight_map: Optional[dict[str, Path]] = None


def locate(source: "str | os.PathLike[str]", revision: Optional[str] = None) -> Layout:
    """Resolve a local path or a hub repo id to its weight files.

    Raises:
        InputError: the path does not exist (and is not a cached/reachable repo id), holds no weights, or its
            index is malformed or names missing shards.
    """
    path = Path(source).expanduser()
    if path.exists():
        if revision is not None:
            raise InputError(f"revision={revision!r} applies to hub repo ids only, but {path} is a local path")
        return _locate_dir(path) if path.is_dir() else _locate_file(path)
    text = os.fspath(source)
    if looks_like_repo_id(text) and not text.endswith((".safetensors", ".json") + _TORCH_SUFFIXES):
        return _locate_dir(_snapshot(text, revision), repo_id=text)
    raise InputError(f"checkpoint path {path} does not exist; give a model directory, a weight file or a hub repo id")


def _locate_file(path: Path) -> Layout:
    if path.name.endswith(".index.json"):
        return _from_index(path)
    if path.suffix == ".safetensors" or path.suffix in _TORCH_SUFFIXES:
        return Layout(path, path.parent, (path,))
    raise InputError(
        f"{path} is not a weight file; give a .safetensors, .bin/.pt file, an *.index.json, or a model directory"
    )


def _locate_dir(directory: Path, repo_id: Optional[str] = None) -> Layout:
    for name in STANDARD_WEIGHT_NAMES:
        candidate = directory / name
        if candidate.is_file():
            layout = _locate_file(candidate)
            return Layout(directory, directory, layout.files, layout.weight_map)
    where = f"hub repo {repo_id} (snapshot {directory})" if repo_id else f"directory {directory}"
    present = sorted(p.name for p in directory.iterdir())
    if "adapter_config.json" in present:
        raise InputError(
            f"{where} is a PEFT adapter (it has adapter_config.json), not a model checkpoint; give the base or "
            "fine-tuned model directory here, and the adapter where an adapter is expected"
        )
    for pattern in ("*.safetensors.index.json", "*.safetensors"):
        found = sorted(directory.glob(pattern))
        if len(found) == 1:
            layout = _locate_file(found[0])
            return Layout(directory, directory, layout.files, layout.weight_map)
        if len(found) > 1:
            raise InputError(
                f"{where} holds several {pattern} files and none of the standard names "
                f"({', '.join(p.name for p in found)}); give the path of the one to read"
            )
    listing = ", ".join(present[:20]) + (f", ... ({len(present) - 20} more)" if len(present) > 20 else "")
    raise InputError(
        f"{where} holds no model weights (looked for {', '.join(STANDARD_WEIGHT_NAMES)}); "
        f"it contains: {listing or 'nothing'}. Give the directory that save_pretrained wrote, or a weight file"
    )


def _from_index(index: Path) -> Layout:
    """Read a ``*.index.json`` (``{"weight_map": {name: file}}``) and check that every shard exists."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"cannot read checkpoint index {index}: {err}; download or save it again") from err
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"checkpoint index {index} has no 'weight_map' of tensor name -> file name")
    problems: list[str] = []
    files: dict[str, Path] = {}
    for name in sorted(set(weight_map.values())):
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            problems.append(f"{name!r} lies outside the index's directory")
            continue
        files[name] = index.parent / rel
        if not files[name].is_file():
            count = sum(1 for v in weight_map.values() if v == name)
            problems.append(f"{name} (holds {count} tensors) is missing")
    if problems:
        raise InputError(
            f"checkpoint index {index} names shards that cannot be read: {'; '.join(problems)}. "
            "Download the missing files (or the whole checkpoint) again"
        )
    return Layout(index, index.parent, tuple(files.values()), {k: files[v] for k, v in weight_map.items()})


def _snapshot(repo_id: str, revision: Optional[str]) -> Path:
    """The hub snapshot directory of ``repo_id``: safetensors weights if the repo has them, else ``.bin``."""
    snap = resolve_source(repo_id, revision, _SIDE_PATTERNS + _SAFETENSORS_PATTERNS)
    if not any(snap.glob("*.safetensors")):
        snap = resolve_source(repo_id, revision, _SIDE_PATTERNS + _BIN_PATTERNS)
    return snap
