"""What ``fuse`` changes in BASE's layout besides merging: trainable-token rows, and replicated layers.

Trainable tokens (``trainable_token_indices``, :mod:`lorasurg.runtime.tokens`): the adapter's rows replace rows
``indices`` of the module's weight, ``W[indices[i]] = rows[i]``, as PEFT's forward and merge do. An index past
BASE's rows (a vocabulary the fine-tune grew) grows the weight to ``max(index) + 1`` rows; every added row must be
one of the indices (it has no other value), and ``vocab_size`` in config.json follows. A head tied to the embedding
(one tensor in BASE) follows the embedding's rows, as PEFT's tied head does: the weight stays tied. An untied output
layer of BASE's vocabulary size that the adapter does not grow with it is refused (the fused model would not load).

Replicated layers (``layer_replication``, :mod:`lorasurg.layer_replication`): the stack is written as transformers
numbers it, one layer per entry of the replicated stack: ``<stack>.<j>.*`` is a copy of BASE's ``<stack>.<i>.*``
(``i`` the layer entry ``j`` copies) with copy ``j``'s adapter merged in; layers the map leaves out are not written;
``num_hidden_layers`` (and a per-layer ``layer_types`` list) in config.json follow.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from ...errors import InputError, UnsupportedError
from ...io.adapter import Adapter
from ...io.checkpoint import Checkpoint, RowReader
from ...layer_replication import LayerStack, expand_layer_map, find_layer_stack, layer_count
from ..options import short_list

__all__ = ["replicated_stack", "ReplicatedCheckpoint", "replicated", "plan_token_rows", "with_rows"]


def replicated_stack(base: Checkpoint, adapter: Adapter) -> Optional[LayerStack]:
    """The stack ``layer_replication`` replicates in BASE, or None without a map.

    Raises:
        InputError: BASE has no stack PEFT's rule finds, or the map names layers BASE lacks.
    """
    layer_map = adapter.config.layer_replication
    if not layer_map:
        return None
    infos = base.module_infos()
    prefix = find_layer_stack({n: i.type_name for n, i in infos.items()})
    if prefix is None:
        raise InputError(f"the adapter's layer_replication={layer_map} needs a stack of layers, which PEFT looks "
                         f"for at model(.model)*.layers, .encoder.layer or .h; BASE {base.source} has none")
    count = int((base.config or {}).get("num_hidden_layers") or layer_count(list(infos), prefix))
    try:
        sources = expand_layer_map(layer_map, count)
    except Exception as err:
        raise InputError(f"the adapter does not fit BASE {base.source}: {err}") from err
    return LayerStack(prefix, count, sources)


class ReplicatedCheckpoint(Checkpoint):
    """``base`` as PEFT's replicated model would be saved (a read-only view, no tensor copied): the stack's tensors
    under every copy's name (``<stack>.<j>.*`` reads BASE's ``<stack>.<i>.*``, ``i = sources[j]``), in BASE's shard
    order, the layers the map leaves out absent; :meth:`describe` sees the replicated ``num_hidden_layers``.
    ``config`` stays BASE's, so the rewrite writes the new count as an update. Reads go to ``base`` (which owns the
    files and closes them)."""

    def __init__(self, base: Checkpoint, stack: LayerStack, layer_config: dict) -> None:
        self.__dict__.update(base.__dict__)  # source, path, files, config: BASE's
        self._base, self._stack, self._layer_config = base, stack, layer_config
        self._source: dict[str, str] = {}  # view name -> BASE name
        entries = {}
        for name, entry in base._entries.items():
            index = stack.layer_of(name)
            for new in ([name] if index is None else [stack.rename(name, j) for j in stack.copies_of(index)]):
                entries[new] = entry
                self._source[new] = name
        self._entries = entries
        self._description = None

    def get(self, name: str, dtype: Optional[torch.dtype] = None, device=None) -> Tensor:
        self._entry(name)  # an unknown name is refused with this view's names
        return self._base.get(self._source[name], dtype=dtype, device=device)

    def row_reader(self, name: str) -> Optional[RowReader]:
        self._entry(name)
        return self._base.row_reader(self._source[name])

    def describe(self, task_type: Optional[str] = None):
        config, self.config = self.config, self._layer_config
        try:
            return super().describe(task_type)
        finally:
            self.config = config

    def close(self) -> None:
        """Nothing: BASE owns the files."""


def replicated(base: Checkpoint, adapter: Adapter) -> tuple[Checkpoint, dict[str, object], list[str]]:
    """``(BASE, {}, [])`` for an adapter without ``layer_replication``; else the :class:`ReplicatedCheckpoint` the
    fuse runs on, the config.json updates (``num_hidden_layers``, a per-layer ``layer_types``) and a note.

    Raises:
        InputError: see :func:`replicated_stack`.
    """
    stack = replicated_stack(base, adapter)
    if stack is None:
        return base, {}, []
    updates: dict[str, object] = {"num_hidden_layers": len(stack.sources)}
    layer_types = (base.config or {}).get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == stack.count:
        updates["layer_types"] = [layer_types[i] for i in stack.sources]
    note = (f"layer_replication={adapter.config.layer_replication}: {stack.prefix} written as {len(stack.sources)} "
            f"layers (from {stack.count}), each copy with its own merge")
    return ReplicatedCheckpoint(base, stack, {**(base.config or {}), **updates}), updates, [note]


def plan_token_rows(base: Checkpoint, adapter: Adapter, aliases: Mapping[str, str],
                    checkpoint_module: Callable[[str], Optional[str]]
                    ) -> tuple[dict[str, tuple[Tensor, Tensor, int]], dict[str, object], list[str]]:
    """``{BASE weight: (indices, rows, row count)}`` of the adapter's trainable tokens, config updates and notes.

    ``checkpoint_module(name)``: BASE's checkpoint module for an adapter (model) module name, or None where they are
    the same (:meth:`~lorasurg.io.architecture.ModelDescription.checkpoint_module`: a VLM's renamed tower).

    Raises:
        InputError: a module BASE lacks, rows of another width or count than the indices, added rows without
            values, an untied output layer left at BASE's vocabulary when the embedding grows.
        UnsupportedError: tokens on a module that also has LoRA factors or a saved copy.
    """
    out: dict[str, tuple[Tensor, Tensor, int]] = {}
    problems, notes = [], []
    indices_of = adapter.token_indices()
    for module, rows in adapter.token_rows().items():
        weight = f"{checkpoint_module(module) or module}.weight"
        stored = aliases.get(weight, weight)
        if module in adapter.modules or any(k.startswith(f"{module}.") and ".token_adapter." not in k
                                            for k in adapter.extra):
            raise UnsupportedError(f"{module} has trainable tokens and a LoRA or a saved copy (PEFT refuses both on "
                                   "one module); this adapter cannot come from PEFT")
        if stored not in base:
            problems.append(f"{module}: BASE has no {weight}")
            continue
        shape = tuple(base.shape(stored))
        indices = indices_of[module]
        if len(indices) != rows.shape[0]:
            problems.append(f"{module}: {rows.shape[0]} trainable-token rows but trainable_token_indices names "
                            f"{len(indices)} for it (a dict key must end the module's name)")
            continue
        if len(shape) != 2 or rows.dim() != 2 or rows.shape != (len(indices), shape[1]):
            problems.append(f"{module}: {len(indices)} indices and rows {tuple(rows.shape)} for a weight {shape}")
            continue
        count = max(shape[0], max(indices) + 1) if indices else shape[0]
        missing = sorted(set(range(shape[0], count)) - set(indices))
        if missing:
            problems.append(f"{module}: rows {missing[0]}..{missing[-1]} ({len(missing)}) are past BASE's "
                            f"{shape[0]} rows and have no value in the adapter")
            continue
        out[weight] = (torch.tensor(indices, dtype=torch.long), rows, count)
        notes.append(f"{module}: {len(indices)} trainable-token row(s) written into {weight}"
                     + (f", grown from {shape[0]} to {count} rows" if count > shape[0] else ""))
    if problems:
        raise InputError("the adapter's trainable tokens do not fit BASE " + base.source + ":\n  - "
                         + "\n  - ".join(problems))
    updates: dict[str, object] = {}
    grown = {w: c for w, (_, _, c) in out.items() if c > base.shape(aliases.get(w, w))[0]}
    if grown:
        vocab = (base.config or {}).get("vocab_size")
        rows = {c for c in grown.values()}
        stale = [n for n in _vocab_tensors(base, vocab) if n not in grown and n not in aliases]
        if len(rows) > 1 or stale:
            raise InputError(
                f"the adapter grows the vocabulary ({', '.join(f'{w}: {c} rows' for w, c in grown.items())}) but "
                + (f"{short_list(stale)} keep BASE's {vocab} rows" if stale else "not to one row count")
                + ": the fused model would not load. Fuse an adapter that grows every embedding layer alike, or "
                "load the adapter into a resized model instead")
        if vocab is not None:
            updates["vocab_size"] = rows.pop()
    return out, updates, notes


def _vocab_tensors(base: Checkpoint, vocab: Optional[int]) -> list[str]:
    """BASE's embedding-layer weights (input embedding, output layers) with ``vocab`` rows."""
    names = [f"{m}.weight" for m, i in base.module_infos().items() if i.kind == "embedding"]
    names += [f"{m}.weight" for m in base.output_layer_names()]
    return [n for n in dict.fromkeys(names) if n in base and vocab is not None and base.shape(n)[0] == vocab]


def with_rows(value: Tensor, indices: Tensor, rows: Tensor, count: int) -> Tensor:
    """``value`` (``(n, dim)``) grown to ``count`` rows, with rows ``indices`` replaced by ``rows``, in its dtype."""
    if count > value.shape[0]:
        value = torch.cat([value, value.new_zeros(count - value.shape[0], *value.shape[1:])])  # (count, dim)
    else:
        value = value.clone()
    return value.index_copy_(0, indices.to(value.device), rows.to(value.device, value.dtype))
