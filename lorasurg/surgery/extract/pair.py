"""Before any work: are BASE and TUNED the same architecture, and which of their tensors are buffers?

Weights must match: a parameter on one side only, or a shape that differs, is refused with every difference listed.
Buffers are not weights (``register_buffer`` tensors such as ``embeddings.position_ids``, ``rotary_emb.inv_freq`` or
GPT-2's ``attn.bias``, which some transformers versions write into checkpoints and others do not; see
:meth:`lorasurg.io.checkpoint.Checkpoint.is_buffer`): a buffer on one side only, or on both sides with other
values, shape or dtype, is ignored and listed in the report as "buffer, ignored". A name is a buffer when either
side's architecture says so.
"""

from __future__ import annotations

import torch

from typing import Collection

from ...errors import ShapeMismatchError
from ...io.checkpoint import Checkpoint
from ..options import short_list as _short
from .report import BufferOutcome

__all__ = ["buffer_names", "check_pair"]


def buffer_names(base: Checkpoint, tuned: Checkpoint) -> set[str]:
    """Names either checkpoint holds that either side's architecture registers as buffers."""
    names = set(base.names()) | set(tuned.names())
    return {n for n in names if base.is_buffer(n) or tuned.is_buffer(n)}


def check_pair(base: Checkpoint, tuned: Checkpoint, resizable: Collection[str] = ()) -> list[BufferOutcome]:
    """Refuse checkpoints that are not the same architecture, listing every difference in their weights; return
    the buffers that are on one side only or differ (ignored), in base's shard order then tuned's.

    A tensor in ``resizable`` (the embedding layers' weights) may have more rows in TUNED than in BASE: a resized
    vocabulary, which :mod:`.tokens` handles. Reads the buffers both sides hold (small tensors), to compare them; no
    weight is read.

    Raises:
        ShapeMismatchError: config ``model_type``/``architectures`` differ; a weight is on one side only; a weight's
            shape differs (a resizable one: other than by more rows in TUNED).
    """
    problems: list[str] = []
    bc, tc = base.config or {}, tuned.config or {}
    for key in ("model_type", "architectures"):
        if key in bc and key in tc and bc[key] != tc[key]:
            problems.append(f"config {key}: base {bc[key]!r}, tuned {tc[key]!r}")
    buffers = buffer_names(base, tuned)
    aliases = set(base.tied_weights())  # the tuned side is the same architecture, or the names differ below
    b_names = set(base.names()) - aliases
    t_names = set(tuned.names()) - aliases
    only_b, only_t = sorted(b_names - t_names - buffers), sorted(t_names - b_names - buffers)
    if only_b:
        problems.append(f"missing from tuned ({len(only_b)}): {_short(only_b)}")
    if only_t:
        problems.append(f"missing from base ({len(only_t)}): {_short(only_t)}")
    shapes = [
        f"{n}: base {tuple(base.shape(n))}, tuned {tuple(tuned.shape(n))}"
        + (" (TUNED has fewer rows: a vocabulary cannot shrink into a LoRA adapter)" if n in resizable else "")
        for n in base.names() if n in t_names and n not in buffers and tuple(base.shape(n)) != tuple(tuned.shape(n))
        and not (n in resizable and _grown(base.shape(n), tuned.shape(n)))
    ]
    if shapes:
        problems.append(f"shape mismatch ({len(shapes)}): {_short(shapes)}")
    if problems:
        raise ShapeMismatchError(
            f"{base.source} and {tuned.source} are not the same architecture:\n  - " + "\n  - ".join(problems)
            + "\nextract needs a base checkpoint and a fine-tune of it with the same tensors and shapes."
        )
    ignored = [BufferOutcome(n, list(base.shape(n)), "base", "only in base")
               for n in base.names() if n in buffers and n not in t_names]
    ignored += [BufferOutcome(n, list(tuned.shape(n)), "tuned", "only in tuned")
                for n in tuned.names() if n in buffers and n not in b_names]
    for n in base.names():
        if n in buffers and n in t_names:
            difference = _difference(base, tuned, n)
            if difference:
                ignored.append(BufferOutcome(n, list(base.shape(n)), "both", difference))
    return ignored


def _grown(b_shape, t_shape) -> bool:
    """TUNED has more rows than BASE and the same row width (added tokens)."""
    return len(b_shape) == len(t_shape) == 2 and t_shape[1] == b_shape[1] and t_shape[0] > b_shape[0]


def _difference(base: Checkpoint, tuned: Checkpoint, name: str) -> str:
    """How a buffer both sides hold differs ("" when it does not)."""
    b_shape, t_shape = tuple(base.shape(name)), tuple(tuned.shape(name))
    if b_shape != t_shape:
        return f"shape {b_shape} in base, {t_shape} in tuned"
    b_dtype, t_dtype = base.dtype(name), tuned.dtype(name)
    if b_dtype != t_dtype:
        return f"{str(b_dtype).removeprefix('torch.')} in base, {str(t_dtype).removeprefix('torch.')} in tuned"
    return "" if torch.equal(base.get(name), tuned.get(name)) else "values differ between base and tuned"
