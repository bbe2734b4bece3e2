"""Checkpoint keys and model parameters: transformers' own conversion rules, applied to names.

A checkpoint's keys and the parameters of the model transformers builds from it are two namespaces. transformers 5
converts between them when it loads (``transformers.conversion_mapping.get_model_conversion_mapping`` collects
the rules of a model and of each of its sub-models, ``transformers.core_model_loading.rename_source_key`` applies
them to one key); :func:`build_keymap` asks transformers for the rules of the model built on the meta device and
applies them to the checkpoint's key *names* only, in transformers' own key order. No tensor is read or converted.
Each key ends up as one of:

* **renamed** (``KeyMap.renamed``): the key holds one parameter or buffer whole, under another name or the same
  one. Qwen2-VL's ``model.layers.0.mlp.up_proj.weight`` is the model's
  ``model.language_model.layers.0.mlp.up_proj.weight``; Llava's ``language_model.lm_head.weight`` is ``lm_head.weight``;
  a checkpoint saved from the base model gains or loses the ``base_model_prefix``.
* an **expert slot** (``KeyMap.slots``): the key holds one expert's matrix inside a fused 3-D parameter. A converter
  whose operations are ``MergeModulelist(dim=0)`` (stack the per-expert ``(out, in)`` matrices along a new expert
  dimension), optionally followed by ``Concatenate(dim=1)`` (join several projections along the output
  dimension), gives, for expert ``e`` and the ``j``-th source pattern::

      parameter[e, rows_j, :] == checkpoint[key]          # parameter: (E, sum_j out_j, in); key: (out_j, in)

  with ``rows_j = [sum_{i<j} out_i, sum_{i<=j} out_i)``. Qwen3-MoE's ``model.layers.0.mlp.experts.3.up_proj.weight``
  is rows ``[I, 2I)`` of expert 3 of ``model.layers.0.mlp.experts.gate_up_proj``; Mixtral's
  ``model.layers.0.block_sparse_moe.experts.3.w1.weight`` is rows ``[0, I)`` of ``model.layers.0.mlp.experts.gate_up_proj``.
* **unplaced** (``KeyMap.unplaced``): the rules give a name the model has no parameter or buffer for, or convert
  the key with an operation other than the two above (a split, a transpose, a permutation); the reason is kept, so
  a command can refuse to drop the tensor silently.

A fused parameter whose expert slots do not fill it exactly (an expert missing, a shape that disagrees with the
model's) is unplaced too, every key of it with the reason.

With a transformers version that has no conversion rules (4.x), or for a model without any, every key is renamed by
the ``base_model_prefix`` rule alone (strip or add it, whichever names a parameter).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from torch import nn

__all__ = ["ExpertSlot", "KeyMap", "build_keymap", "conversion_rules"]


@dataclass(frozen=True)
class ExpertSlot:
    """Where one checkpoint key lies inside a fused expert parameter: ``parameter[expert, rows[0]:rows[1], :]``.

    Attributes:
        parameter: the model's fused parameter (``model.layers.0.mlp.experts.gate_up_proj``), ``(E, out, in)``.
        expert: the expert index ``e`` (the number in the checkpoint key).
        part: which of the fused projections this key is (0 for ``gate_proj``/``w1``, 1 for ``up_proj``/``w3``;
            0 for an unfused ``down_proj``).
        parts: how many projections the parameter fuses (2 for ``gate_up_proj``, 1 for ``down_proj``).
        rows: the output rows ``[start, stop)`` of ``parameter[e]`` this key fills.
    """

    parameter: str
    expert: int
    part: int
    parts: int
    rows: tuple[int, int]


@dataclass(frozen=True)
class KeyMap:
    """Checkpoint keys placed among a model's parameters (see the module docstring).

    Attributes:
        renamed: ``{checkpoint key: model parameter or buffer name}`` for keys held whole (identity included).
        slots: ``{checkpoint key: ExpertSlot}`` for per-expert keys merged into fused parameters.
        unplaced: ``{checkpoint key: why it has no place in the model}``.
        fused: ``{fused parameter: (number of experts, number of parts)}`` for the parameters the slots fill.
        rules: the names of the conversion rules that applied (for messages and reports), empty without any.
    """

    renamed: dict[str, str] = field(default_factory=dict)
    slots: dict[str, ExpertSlot] = field(default_factory=dict)
    unplaced: dict[str, str] = field(default_factory=dict)
    fused: dict[str, tuple[int, int]] = field(default_factory=dict)
    rules: tuple[str, ...] = ()

    def model_name(self, key: str) -> Optional[str]:
        """The model's name for checkpoint ``key`` (the fused parameter for an expert slot), or None if unplaced."""
        if key in self.renamed:
            return self.renamed[key]
        slot = self.slots.get(key)
        return slot.parameter if slot is not None else None

    def checkpoint_keys(self) -> dict[str, str]:
        """``{model name: checkpoint key}`` for the renamed keys (the inverse of :attr:`renamed`)."""
        return {model: key for key, model in self.renamed.items()}

    def slots_of(self, parameter: str) -> list[tuple[str, ExpertSlot]]:
        """The ``(checkpoint key, slot)`` pairs of one fused parameter, by expert, then part."""
        found = [(key, slot) for key, slot in self.slots.items() if slot.parameter == parameter]
        return sorted(found, key=lambda item: (item[1].expert, item[1].part))

    @property
    def is_identity(self) -> bool:
        """True when every key is the model's own name for it: nothing renamed, fused or unplaced."""
        return not self.slots and not self.unplaced and all(k == v for k, v in self.renamed.items())


def conversion_rules(model: nn.Module) -> Optional[list]:
    """transformers' conversion rules of ``model`` (fresh objects: they keep state while they rename), or None
    when the installed transformers has none (4.x) or ``model`` is not a transformers model."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return None
    try:
        return list(get_model_conversion_mapping(model))
    except Exception:  # noqa: BLE001 - a model transformers cannot collect rules for has none we can apply
        return None


def build_keymap(model: nn.Module, shapes: Mapping[str, Sequence[int]]) -> KeyMap:
    """Place every key of a checkpoint (``{key: shape}``) among the parameters and buffers of ``model`` (a
    transformers model, normally on the meta device), by transformers' conversion rules (module docstring)."""
    names = _model_names(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    rules = conversion_rules(model)
    if rules is None:
        return _prefix_only(shapes, names, prefix)
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    renamings = [rule for rule in rules if isinstance(rule, WeightRenaming)]
    converters = [rule for rule in rules if isinstance(rule, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    lookup = dict.fromkeys(names, True)
    renamed: dict[str, str] = {}
    unplaced: dict[str, str] = {}
    pending: dict[str, tuple[str, int, int, int]] = {}  # key -> (parameter, expert, part, parts)
    for key in sorted(shapes, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix or None, lookup)
        if pattern is None:
            if target in names:
                renamed[key] = target
            else:
                unplaced[key] = f"the model ({type(model).__name__}) has no parameter or buffer {target!r}"
            continue
        converter = by_pattern[pattern]
        problem = _unsupported_operations(converter)
        if problem is None and target not in names:
            problem = f"the model ({type(model).__name__}) has no parameter {target!r}"
        expert = _expert_index(pattern, key, renamings) if problem is None else None
        if problem is None and expert is None:
            problem = f"no expert number in it for transformers' pattern {pattern!r}"
        if problem is not None:
            unplaced[key] = problem
            continue
        parts = len(converter.source_patterns)
        pending[key] = (target, expert, converter.source_patterns.index(pattern), parts)
    slots, fused = _fill_slots(pending, shapes, dict(_parameter_shapes(model)), unplaced)
    used = tuple(dict.fromkeys(type(rule).__name__ for rule in rules if rule.was_used()))
    return KeyMap(renamed, slots, unplaced, fused, used)


def _model_names(model: nn.Module) -> set[str]:
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return names | {name for name, _ in model.named_buffers(remove_duplicate=False)}


def _parameter_shapes(model: nn.Module):
    for name, param in model.named_parameters(remove_duplicate=False):
        yield name, tuple(param.shape)


def _prefix_only(shapes: Mapping[str, Sequence[int]], names: set[str], prefix: str) -> KeyMap:
    """Without transformers' rules: identity, or the base_model_prefix stripped or added, per key."""
    renamed: dict[str, str] = {}
    unplaced: dict[str, str] = {}
    for key in shapes:
        candidates = [key]
        if prefix:
            candidates += [key[len(prefix) + 1 :]] if key.startswith(prefix + ".") else [f"{prefix}.{key}"]
        found = next((c for c in candidates if c in names), None)
        if found is None:
            unplaced[key] = f"the model has no parameter or buffer {key!r}"
        else:
            renamed[key] = found
    return KeyMap(renamed, {}, unplaced)


def _unsupported_operations(converter) -> Optional[str]:
    """None for ``MergeModulelist(dim=0)`` [+ ``Concatenate(dim=1)``], else why the converter is not supported."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    if ops in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
        return None
    shown = ", ".join(f"{name}(dim={dim})" if dim is not None else name for name, dim in ops)
    return f"transformers converts it with {shown}, which lorasurg does not map yet"


def _expert_index(pattern: str, key: str, renamings: list) -> Optional[int]:
    """The number the ``*`` of a converter's source pattern stands for in ``key`` (after the renamings)."""
    from transformers.core_model_loading import apply_renamings

    if "*" not in pattern:
        return None
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    found = re.search(regex, apply_renamings(key, renamings))
    return int(found.group(1)) if found else None


def _fill_slots(
    pending: Mapping[str, tuple[str, int, int, int]],
    shapes: Mapping[str, Sequence[int]],
    parameters: Mapping[str, tuple[int, ...]],
    unplaced: dict[str, str],
) -> tuple[dict[str, ExpertSlot], dict[str, tuple[int, int]]]:
    """Row ranges of each per-expert key in its fused parameter, checked against the parameter's shape.

    A fused parameter ``(E, out, in)`` must be filled exactly: experts ``0..E-1``, each with every part, parts of
    one expert stacked along ``out`` to ``out`` rows, every part ``in`` wide. Otherwise each of its keys is unplaced.
    """
    by_parameter: dict[str, dict[tuple[int, int], str]] = {}
    parts_of: dict[str, int] = {}
    for key, (parameter, expert, part, parts) in pending.items():
        by_parameter.setdefault(parameter, {})[(expert, part)] = key
        parts_of[parameter] = parts
    slots: dict[str, ExpertSlot] = {}
    fused: dict[str, tuple[int, int]] = {}
    for parameter, keys in by_parameter.items():
        shape, parts = parameters[parameter], parts_of[parameter]
        problem = _fill_problem(parameter, shape, parts, keys, shapes)
        if problem is not None:
            unplaced.update(dict.fromkeys(keys.values(), problem))
            continue
        for (expert, part), key in keys.items():
            start = sum(int(shapes[keys[(expert, j)]][0]) for j in range(part))
            slots[key] = ExpertSlot(parameter, expert, part, parts, (start, start + int(shapes[key][0])))
        fused[parameter] = (int(shape[0]), parts)
    return slots, fused


def _fill_problem(
    parameter: str, shape: tuple[int, ...], parts: int, keys: Mapping[tuple[int, int], str],
    shapes: Mapping[str, Sequence[int]],
) -> Optional[str]:
    if len(shape) != 3:
        return f"fused parameter {parameter!r} has shape {shape}, not (experts, out, in)"
    experts, out, width = shape
    expected = {(e, j) for e in range(experts) for j in range(parts)}
    if set(keys) != expected:
        missing = sorted(expected - set(keys))
        extra = sorted(set(keys) - expected)
        detail = (f"missing (expert, part) {missing[:4]}" if missing else "") + (
            f"{'; ' if missing else ''}unexpected {extra[:4]}" if extra else "")
        return f"the checkpoint's experts do not fill {parameter!r} {tuple(shape)}: {detail}"
    for expert in range(experts):
        matrices = [tuple(shapes[keys[(expert, j)]]) for j in range(parts)]
        if any(len(m) != 2 or m[1] != width for m in matrices) or sum(m[0] for m in matrices) != out:
            return (f"expert {expert}'s matrices {matrices} do not stack to {parameter!r}'s (out, in) = "
                    f"({out}, {width})")
    return None
