"""Where an adapter written by lorasurg came from: safetensors metadata and a README, written and read back.

``residualize`` records the method, rank, alpha, the base the residual was taken from and lorasurg's version in
the adapter file's safetensors header (``lorasurg.*`` keys) and in ``README.md`` next to it; ``convert`` reads
them back to name the original base in the plain LoRA it writes.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

from ..io.adapter import Adapter

__all__ = ["PREFIX", "provenance_metadata", "read_provenance", "provenance_lines", "lorasurg_version"]

PREFIX = "lorasurg."


def lorasurg_version() -> str:
    """The installed lorasurg version."""
    from .. import __version__  # at call time the package is fully imported

    return __version__


def provenance_metadata(**fields: object) -> dict[str, str]:
    """``{"lorasurg.<field>": str(value)}`` for every field that is not None, plus ``lorasurg.version``."""
    meta = {f"{PREFIX}{key}": str(value) for key, value in fields.items() if value is not None}
    meta[f"{PREFIX}version"] = lorasurg_version()
    return meta


def read_provenance(adapter_dir: Union[str, "os.PathLike[str]"]) -> dict[str, str]:
    """The ``lorasurg.*`` entries of a saved adapter's safetensors header, prefix removed (``{}`` if none)."""
    meta: Mapping[str, str] = Adapter.read_metadata(adapter_dir)
    return {key[len(PREFIX):]: value for key, value in meta.items() if key.startswith(PREFIX)}


def provenance_lines(fields: Mapping[str, Optional[object]]) -> list[str]:
    """Markdown list lines ``- field: value`` for a README."""
    return [f"- {key}: `{value}`" for key, value in fields.items() if value is not None]
