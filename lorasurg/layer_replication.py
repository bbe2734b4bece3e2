"""PEFT's ``layer_replication``: which layer each layer of the replicated stack is a copy of, by name.

``LoraConfig(layer_replication=[[0, 4], [2, 5]])`` turns a stack of layers ``[0, 1, 2, 3, 4]`` into
``[0, 1, 2, 3, 2, 3, 4]``: each ``[start, end)`` pair appends copies of layers ``start .. end - 1``, in order, and the
copies share their base weights with the layer they copy (PEFT 0.21.2, ``peft.tuners.tuners_utils.replicate_layers``).
Each copy gets its own LoRA, so an adapter's module names are those of the replicated stack
(``model.layers.5.mlp.up_proj`` is a copy of ``model.layers.3.mlp.up_proj``), and transformers numbers the layers of a
fused checkpoint the same way (``config.num_hidden_layers`` is the new count).

PEFT finds the stack from the model's attributes: it follows ``.model`` as deep as it goes, then ``.bert`` if
present, and takes ``.layers`` (Llama and most decoders), ``.encoder.layer`` (BERT) or ``.h`` (Falcon, GPT-2); the
stack must be an ``nn.ModuleList``. :func:`find_layer_stack` applies the same rule to module names.

Pure functions over names and :class:`~lorasurg.modules.ModuleInfo` descriptions (strings in, strings out): the
runtime (:mod:`lorasurg.runtime.replication`), ``fuse``, ``validate`` and ``inspect`` all use them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, TypeVar

from .errors import ConfigError

__all__ = ["LayerStack", "expand_layer_map", "find_layer_stack", "replicated_view", "source_name", "layer_count"]

T = TypeVar("T")
_LIST_TYPES = ("ModuleList",)


@dataclass(frozen=True)
class LayerStack:
    """The replicated stack of a model.

    Attributes:
        prefix: the stack's module name (``model.layers``, ``bert.encoder.layer``, ``transformer.h``).
        count: how many layers the unreplicated model has.
        sources: for each layer of the replicated stack, in order, the index of the layer it copies.
    """

    prefix: str
    count: int
    sources: tuple[int, ...]

    def source_of(self, name: str) -> str:
        """The unreplicated name of module or tensor ``name`` (names outside the stack are their own)."""
        return source_name(name, self.prefix, self.sources)

    def copies_of(self, index: int) -> list[int]:
        """The replicated indices that copy original layer ``index`` (empty when the map leaves it out)."""
        return [j for j, i in enumerate(self.sources) if i == index]

    def rename(self, name: str, new_index: int) -> str:
        """Tensor or module ``name`` of an original layer, renamed into replicated layer ``new_index``."""
        head = f"{self.prefix}."
        rest = name[len(head):].split(".", 1)
        return f"{head}{new_index}" + (f".{rest[1]}" if len(rest) > 1 else "")

    def layer_of(self, name: str) -> Optional[int]:
        """The index within the stack of the layer that ``name`` lies in, or None."""
        found = re.match(rf"{re.escape(self.prefix)}\.(\d+)(\.|$)", name)
        return int(found.group(1)) if found else None


def expand_layer_map(layer_map: Sequence[Sequence[int]], count: int, *,
                     where: str = "layer_replication") -> tuple[int, ...]:
    """The original layer index of every layer of the replicated stack.

    Args:
        layer_map: ``[[start, end), ...]`` as in ``LoraConfig.layer_replication``.
        count: the number of layers of the unreplicated model.

    Raises:
        ConfigError: a pair is not two ints with ``0 <= start < end <= count`` (every bad pair is named).
    """
    bad = []
    sources: list[int] = []
    for pair in layer_map:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
            bad.append(f"{pair!r} is not a [start, end) pair of ints")
            continue
        start, end = pair
        if not 0 <= start < end <= count:
            bad.append(f"[{start}, {end}) is not a range of the model's {count} layers (0 <= start < end <= {count})")
            continue
        sources.extend(range(start, end))
    if bad:
        raise ConfigError(f"{where}={list(map(list, layer_map))!r}: " + "; ".join(bad)
                          + ". Each pair copies layers start .. end-1 of the base model, in order.")
    if not sources:
        raise ConfigError(f"{where}=[] replicates no layer; drop layer_replication or give [start, end) pairs")
    return tuple(sources)


def find_layer_stack(type_names: Mapping[str, str]) -> Optional[str]:
    """The name of the stack PEFT replicates, from ``{module name: class name}``; None when there is none.

    PEFT's rule (module docstring): follow ``model`` down, then ``bert``, then ``layers``, ``encoder.layer`` or ``h``,
    which must be a ``ModuleList``. Containers may be missing from ``type_names`` (a checkpoint described from its
    tensor names lists leaves only): a name counts as a module when some name lies under it, and a stack whose class
    is unknown must have numbered children.
    """
    present = set(type_names)
    for name in type_names:
        parts = name.split(".")
        present.update(".".join(parts[:i]) for i in range(1, len(parts)))
    root = ""
    while _join(root, "model") in present:
        root = _join(root, "model")
    if _join(root, "bert") in present:
        root = _join(root, "bert")
    for tail in ("layers", "encoder.layer", "h"):
        name = _join(root, tail)
        if name in present:
            kind = type_names.get(name)
            numbered = any(re.match(rf"{re.escape(name)}\.\d+(\.|$)", n) for n in type_names)
            return name if (kind in _LIST_TYPES if kind is not None else numbered) else None
    return None


def layer_count(names: Sequence[str], prefix: str) -> int:
    """How many layers stack ``prefix`` holds: one more than the largest index named under it (0 when none)."""
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)(\.|$)")
    indices = [int(m.group(1)) for m in map(pattern.match, names) if m]
    return max(indices) + 1 if indices else 0


def source_name(name: str, prefix: str, sources: Sequence[int]) -> str:
    """The unreplicated name of ``name``: ``<prefix>.<j>.rest`` becomes ``<prefix>.<sources[j]>.rest``.

    Raises:
        ConfigError: ``name`` is a layer of the stack past the replicated count.
    """
    found = re.match(rf"({re.escape(prefix)}\.)(\d+)(\.|$)", name)
    if not found:
        return name
    j = int(found.group(2))
    if j >= len(sources):
        raise ConfigError(f"{name}: layer {j} is past the {len(sources)} layers of the replicated stack {prefix}")
    return f"{found.group(1)}{sources[j]}{name[found.end(2):]}"


def replicated_view(infos: Mapping[str, T], prefix: str, sources: Sequence[int]) -> dict[str, T]:
    """``infos`` (``{module name: description}`` in ``named_modules`` order) as the replicated model would list them:
    the entries of each original layer ``i`` under ``<prefix>.i`` are repeated, in map order, under ``<prefix>.j``
    for every ``j`` that copies ``i``; original layers the map leaves out are gone; everything else is unchanged.
    """
    head = f"{prefix}."
    by_layer: dict[int, list[tuple[str, T]]] = {}
    before: list[tuple[str, T]] = []
    after: list[tuple[str, T]] = []
    for name, info in infos.items():
        found = re.match(rf"{re.escape(prefix)}\.(\d+)(\.|$)", name)
        if found:
            by_layer.setdefault(int(found.group(1)), []).append((name[len(head) + len(found.group(1)):], info))
        elif by_layer:
            after.append((name, info))
        else:
            before.append((name, info))
    view = dict(before)
    for j, i in enumerate(sources):
        for rest, info in by_layer.get(i, []):
            view[f"{head}{j}{rest}"] = info
    view.update(after)
    return view


def _join(root: str, tail: str) -> str:
    return f"{root}.{tail}" if root else tail
