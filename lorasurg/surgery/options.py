"""Options every surgery operation reads the same way: devices, output dtypes, checkpoint sources.

One definition each, so ``--device``, ``--dtype`` and a BASE argument mean the same thing in every command.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..errors import ConfigError
from ..io.checkpoint import Checkpoint

__all__ = [
    "DTYPES", "Source", "Progress", "parse_device", "dtype_problem", "output_dtype", "open_checkpoint",
    "source_name", "default_output", "numel", "short_list", "task_type_of",
]

#: ``--dtype`` values other than ``auto`` and the dtypes they mean.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Source = Union[str, os.PathLike, Checkpoint]
Progress = Callable[[int, int, str], None]


def parse_device(spec: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ConfigError: not a device, or CUDA asked for where torch sees none.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {spec} asked for CUDA but torch sees no CUDA device; use --device cpu or auto")
    return device


def dtype_problem(dtype: str) -> Optional[str]:
    """The message for a ``dtype`` value that is neither ``auto`` nor one of :data:`DTYPES`, else None."""
    if dtype != "auto" and dtype not in DTYPES:
        return f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}"
    return None


def output_dtype(dtype: str) -> Optional[torch.dtype]:
    """The torch dtype of a ``--dtype`` value; None for ``auto`` (keep each tensor's own)."""
    return DTYPES.get(dtype)


def open_checkpoint(source: Source, opened: contextlib.ExitStack) -> Checkpoint:
    """``source`` itself if it is an open checkpoint, else a checkpoint closed when ``opened`` closes."""
    if isinstance(source, Checkpoint):
        return source
    return opened.enter_context(Checkpoint.open(source))


def source_name(source: Union[Source, "os.PathLike[str]"]) -> str:
    """How a source is named in reports: the path or repo id as given."""
    return str(source.source) if isinstance(source, Checkpoint) else os.fspath(source)


def default_output(source: Union[Source, "os.PathLike[str]"], suffix: str) -> Path:
    """``./<source name><suffix>`` in the working directory."""
    name = Path(source_name(source).rstrip("/")).name or "model"
    return Path(f"{name}{suffix}")


def task_type_of(config: Optional[dict]) -> Optional[str]:
    """The PEFT ``task_type`` a checkpoint's config implies: ``CAUSAL_LM`` for a ``*ForCausalLM``, else None."""
    archs = (config or {}).get("architectures") or [""]
    return "CAUSAL_LM" if isinstance(archs[0], str) and archs[0].endswith("ForCausalLM") else None


def numel(shape: Sequence[int]) -> int:
    """The number of elements of a tensor of ``shape``."""
    return math.prod(int(d) for d in shape)


def short_list(items: Sequence[str], limit: int = 10) -> str:
    """``a, b, c and 7 more``."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
