"""Embedding layers whose fine-tune changed only some rows: trainable tokens, a LoRA, or the whole layer.

PEFT's ``trainable_token_indices`` (:mod:`lorasurg.runtime.tokens`) stores, for one embedding (or a bias-less output
head), the tuned values of the rows that changed; loaded, they *replace* those rows, so the adapted layer equals
TUNED's exactly. A LoRA of the same layer costs ``r * (rows + dim)`` numbers and approximates; the whole layer (in
``modules_to_save``) costs ``rows * dim``. With ``--embeddings``:

* ``auto`` (default): trainable tokens when they are no larger than the LoRA (``k * dim <= r * (rows + dim)``, ``k``
  the rows that changed, ``r`` capped at ``min(rows, dim)``) and every ``--for`` consumer reads them; else the LoRA
  (the whole layer when ``lora_bias`` is on, as PEFT refuses ``lora_bias`` on an embedding);
* ``tokens``: trainable tokens (a ``--for`` consumer that cannot read them drops the layer, listed);
* ``lora``, ``full``, ``skip``: the LoRA, the whole layer, or nothing, as before.

The report gives both sizes for every such layer. Only the rows that changed are read into memory (row blocks).

A resized vocabulary (TUNED's layer has more rows than BASE's, e.g. added special tokens): the added rows have no
base value, so they count as changed with the tuned row as their delta, a LoRA of the layer is impossible
(``lora`` is refused, ``auto`` takes the tokens), and the adapter loads onto BASE once its embeddings have TUNED's
row count (``model.resize_token_embeddings(n)``; the new rows' initial values do not matter, they are replaced).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ...consumers.rules import Consumer
from ...errors import InputError
from ...io.checkpoint import Checkpoint
from ...io.rewrite import TensorSource
from .build import Collected
from .plan import TensorRole

__all__ = ["RowChange", "EmbeddingChoice", "read_row_changes", "choose", "extract_rows"]

#: Bytes of one row block read at a time (float32 of both sides).
_BLOCK_BYTES = 2**26


@dataclass
class RowChange:
    """The rows of one embedding-layer weight that differ between BASE and TUNED.

    Attributes:
        indices: the row indices that changed (added rows included), ascending.
        values: TUNED's values of those rows, ``(k, dim)``, in TUNED's dtype, on the CPU.
        rows: BASE's row count; tuned_rows: TUNED's (larger when the vocabulary was resized).
        energy: ``sum ||tuned_row - base_row||^2`` over the changed rows (an added row: ``||tuned_row||^2``).
        finite: no NaN or inf in a delta.
    """

    indices: list[int]
    values: Tensor
    rows: int
    tuned_rows: int
    energy: float
    finite: bool

    @property
    def added(self) -> int:
        return self.tuned_rows - self.rows


@dataclass
class EmbeddingChoice:
    """What became of one embedding-layer weight, with the sizes it was chosen by (bytes)."""

    tensor: str
    rows: int
    dim: int
    changed: int
    added: int
    tokens_bytes: int
    lora_bytes: Optional[int]
    full_bytes: int
    chosen: str
    reason: str


def read_row_changes(base: Checkpoint, tuned: Checkpoint, name: str, device: torch.device) -> RowChange:
    """Compare tensor ``name`` row block by row block; keep the changed rows' tuned values (module docstring)."""
    rows, dim = (int(d) for d in base.shape(name))
    tuned_rows = int(tuned.shape(name)[0])
    block = max(1, _BLOCK_BYTES // (8 * max(dim, 1)))
    indices: list[int] = []
    kept: list[Tensor] = []
    energy, finite = 0.0, True
    base_blocks = TensorSource(base, None).row_blocks(name, block, device)
    try:
        for start, t in TensorSource(tuned, None).row_blocks(name, block, device):
            stop = start + t.shape[0]
            tf = t.to(torch.float32)
            old = min(stop, rows) - start
            delta = tf.clone()
            if old > 0:
                _, b = next(base_blocks)
                delta[:old] -= b[:old].to(torch.float32)  # added rows keep delta = tuned row
            changed = (delta != 0).any(dim=1)  # (n,): NaN != 0 too
            if not bool(torch.isfinite(delta).all()):
                finite = False
            picked = torch.nonzero(changed).flatten()
            if picked.numel():
                indices.extend(int(i) + start for i in picked)
                kept.append(t[picked].to("cpu"))
                energy += float(torch.linalg.vector_norm(delta[picked].double())) ** 2
    finally:
        base_blocks.close()
    values = torch.cat(kept) if kept else torch.empty(0, dim, dtype=tuned.dtype(name))
    return RowChange(indices, values, rows, tuned_rows, energy, finite)


def choose(change: RowChange, role: TensorRole, mode: str, *, r: int, itemsize: int, lora_bias: bool,
           has_bias: bool, blocked: Sequence[Consumer]) -> EmbeddingChoice:
    """Decide what ``change`` becomes (module docstring); ``blocked`` are the ``--for`` consumers that cannot read
    trainable tokens, ``has_bias`` whether the layer has a bias (PEFT's trainable tokens on a head drop it).

    Raises:
        InputError: ``lora`` asked for a resized layer (the message names it and what to use instead).
    """
    dim = int(change.values.shape[1])
    k = len(change.indices)
    tokens = k * dim * itemsize
    lora = None if change.added else min(r, change.rows, dim) * (change.rows + dim) * itemsize
    full = change.tuned_rows * dim * itemsize
    if change.added and mode == "lora":
        _refuse_lora(change, role)
    tokens_ok = not has_bias and not blocked
    why_not = (f"--for {', '.join(c.name for c in blocked)}: {blocked[0].title} "
               f"{blocked[0].rules['trainable_tokens'].says}"
               if blocked else "the layer has a bias, which PEFT's trainable tokens on a head drop" if has_bias else "")
    if mode == "tokens":
        chosen, reason = ("tokens", "--embeddings tokens") if tokens_ok else ("dropped", why_not)
    elif lora is None:
        chosen, reason = ("tokens", "added rows: a LoRA cannot carry them") if tokens_ok else ("dropped", why_not)
    elif tokens_ok and tokens <= lora:
        chosen, reason = "tokens", "no larger than the LoRA"
    elif lora_bias and role.kind == "embedding":
        chosen, reason = "full", "lora_bias is on and PEFT refuses lora_bias on Embedding layers, so saved in full"
    else:
        chosen, reason = "lora", "smaller than the trainable tokens" if lora < tokens or not why_not else why_not
    if chosen == "lora" and role.reason:  # a --for consumer cannot read this layer's LoRA either
        chosen, reason = "dropped", role.reason
    return EmbeddingChoice(role.name, change.tuned_rows, dim, k - change.added, change.added, tokens, lora, full,
                           chosen, reason)


def _refuse_lora(change: RowChange, role: TensorRole) -> None:
    raise InputError(
        f"{role.name}: TUNED has {change.tuned_rows} rows, BASE {change.rows} ({change.added} added): the added "
        "rows have no base value, so a LoRA of this layer cannot be extracted. Use --embeddings tokens (the "
        f"changed and added rows, exact; load it after model.resize_token_embeddings({change.tuned_rows})), "
        "--embeddings full, or --embeddings skip"
    )


def as_role(role: TensorRole, chosen: str, reason: str) -> TensorRole:
    """The plain role (``lora``/``save``/``drop``) a choice other than tokens stands for."""
    return dataclasses.replace(role, role={"lora": "lora", "full": "save", "dropped": "drop"}[chosen], reason=reason)


def extract_rows(base: Checkpoint, tuned: Checkpoint, role: TensorRole, run: Collected, device: torch.device, *,
                 mode: str, r: int, lora_bias: bool, has_bias: bool, blocked: Sequence[Consumer]
                 ) -> Optional[TensorRole]:
    """Read one embedding-layer weight's changed rows and record what it becomes in ``run`` (its tokens, a saved
    copy, or a drop); returns the ``lora`` role to fit when a LoRA is chosen, else None.

    ``role`` is a ``rows`` role, or (a resized layer under ``full``/``skip``) a ``save``/``drop`` role.

    Raises:
        InputError: see :func:`choose`.
    """
    change = read_row_changes(base, tuned, role.name, device)
    run.tuned_dtype[role.name] = tuned.dtype(role.name)
    if not change.finite:
        run.non_finite.append(f"{role.name} (shape {tuple(tuned.shape(role.name))})")
        return None
    if not change.indices:
        run.unchanged += 1
        return None
    if change.added:
        run.resized[role.name] = (change.rows, change.tuned_rows)
    itemsize = (run.out_dtype or tuned.dtype(role.name)).itemsize
    if role.role == "lora" and change.added:
        _refuse_lora(change, role)
    if role.role == "rows":
        choice = choose(change, role, mode, r=r, itemsize=itemsize, lora_bias=lora_bias, has_bias=has_bias,
                        blocked=blocked)
    else:
        dim = int(change.values.shape[1])
        chosen = "full" if role.role == "save" else "dropped"
        choice = EmbeddingChoice(role.name, change.tuned_rows, dim, len(change.indices) - change.added, change.added,
                                 len(change.indices) * dim * itemsize, None, change.tuned_rows * dim * itemsize,
                                 chosen, role.reason)
    run.embedding_choices.append(choice)
    shape = tuple(tuned.shape(role.name))
    if choice.chosen == "lora":
        run.row_roles[role.name] = as_role(role, "lora", "")
        return run.row_roles[role.name]
    if choice.chosen == "tokens":
        tokens_role = dataclasses.replace(role, role="tokens", reason=choice.reason)
        run.record_change(tokens_role, shape, change.energy)
        run.tokens[role.module] = (change.indices, run._cast(change.values))
        run.row_roles[role.name] = tokens_role
        return None
    plain = as_role(role, choice.chosen, choice.reason)
    run.row_roles[role.name] = plain
    run.record_change(plain, shape, change.energy, tuned=tuned.get(role.name) if plain.role == "save" else None)
    return None


def token_notes(run: Collected) -> list[str]:
    """What loading the tokens needs: BASE resized to TUNED's rows; a tied head that follows its embedding."""
    notes = []
    if run.resized:
        grown = ", ".join(f"{name}: {rows} -> {tuned} rows" for name, (rows, tuned) in run.resized.items())
        size = max(tuned for _, tuned in run.resized.values())
        notes.append(
            f"TUNED's vocabulary is larger than BASE's ({grown}): load the adapter into BASE after "
            f"model.resize_token_embeddings({size}); the added rows' values come from the adapter, whatever the "
            "resize put there"
        )
    for alias, canonical in run.aliases.items():
        module = canonical.rpartition(".")[0]
        if module in run.tokens:
            notes.append(
                f"{alias.rpartition('.')[0]} shares its weight with {module}: PEFT gives the tied head the same "
                "trainable tokens (the base config's tie_word_embeddings), so both change as in TUNED"
            )
    return notes
