"""Resolve a local path or a Hugging Face hub repo id to a local directory.

A repo id is fetched with ``huggingface_hub.snapshot_download`` (its cache, ``HF_HUB_OFFLINE`` and the
``revision`` are honoured; only the files matching ``allow_patterns`` are fetched). Nothing is executed
from a repo: lorasurg never uses ``trust_remote_code``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import InputError

__all__ = ["looks_like_repo_id", "resolve_source"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def looks_like_repo_id(text: str) -> bool:
    """True for ``name`` or ``org/name`` (hub repo id syntax) that is not an existing local path."""
    return bool(_REPO_ID.match(text)) and not Path(text).exists() and not text.startswith((".", "/"))


def resolve_source(
    path_or_repo: Union[str, os.PathLike],
    revision: Optional[str] = None,
    allow_patterns: Optional[Sequence[str]] = None,
) -> Path:
    """The local directory holding ``path_or_repo``: the path itself, or the hub snapshot of a repo id.

    A repo id whose first part is an existing local directory (``out/nope`` with ``out/`` here) is taken as a
    path first: only the local hub cache is asked, never the network; so is every repo id with ``HF_HUB_OFFLINE``.
    Each failure says first that the path does not exist.

    Raises:
        InputError: the path does not exist and is not a repo id, or the repo cannot be fetched (offline and
            not cached, unknown repo, no network).
    """
    text = os.fspath(path_or_repo)
    path = Path(text)
    if path.exists():
        return path
    if not looks_like_repo_id(text):
        raise InputError(f"{text} does not exist (neither a local path nor a hub repo id)")
    parent = path.parent if path.parent != Path(".") and path.parent.is_dir() else None
    offline = _offline()
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=text, revision=revision, allow_patterns=list(allow_patterns or []) or None,
                                  local_files_only=offline or parent is not None)
    except Exception as err:  # huggingface_hub raises many types: offline, not found, auth, network
        if parent is not None:
            raise InputError(f"{text} does not exist: {parent} has no {path.name} (and no hub repo {text} is in the "
                             "local cache); check the path") from err
        hint = (
            "HF_HUB_OFFLINE=1 is set and the repo is not in the local cache: check the path, or download the repo "
            "first or unset HF_HUB_OFFLINE"
            if offline
            else "check the path, or the repo id, the revision, your network and your token (huggingface-cli login)"
        )
        why = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(
            f"{text} does not exist as a local path, and as a hub repo id it could not be fetched "
            f"({type(err).__name__}{': ' + why if why else ''}); {hint}"
        ) from err
    return Path(local)


def _offline() -> bool:
    """huggingface_hub's offline switch (``HF_HUB_OFFLINE``), as the library itself sees it."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return bool(constants.HF_HUB_OFFLINE)
