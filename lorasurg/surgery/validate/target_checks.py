"""Checks of the config against the base model: what its targeting fields select, and what they miss.

Every rule is :mod:`lorasurg.targeting`'s (PEFT 0.21.2's): a ``target_modules`` list entry selects a name equal
to it or ending in ``"." + entry``, a string is a regex matching the whole name; ``rank_pattern`` and
``alpha_pattern`` keys match a whole ``.``-suffix of a name (:func:`~lorasurg.targeting.pattern_key`);
``modules_to_save`` entries match any name ending in them.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from ...consumers.rules import CONSUMERS
from ...errors import ConfigError, LorasurgError
from ...findings import Finding
from ...modules import ModuleInfo
from ...targeting import (
    ALL_LINEAR,
    anchored_pattern_key,
    layer_index,
    match_modules,
    matches_entry,
    nearest_names,
    pattern_key,
    rank_alpha,
    unused_pattern_keys,
    without_parameters,
)
from .subject import BaseModel, Subject

__all__ = ["check_targets", "check_patterns", "pattern_targets", "UnmatchedKey", "unmatched_pattern_keys"]

_WRAPPABLE = "nn.Linear, GPT-2 Conv1D, nn.Embedding and nn.Conv1d/2d/3d"
_PEFT_PREFIX = "base_model.model."


def check_targets(subject: Subject) -> list[Finding]:
    """``target-*``, ``exclude-unmatched``, ``layers-*``, ``rank-too-large`` and ``save-unmatched``: the config
    against the base model's module names and shapes."""
    cfg, base = subject.config, subject.base
    selected = subject.selection()  # raises first when target_modules cannot be evaluated (None, bad regex)
    wrapped = subject.peft_view().parameters  # target_parameters, and what PEFT's MoE conversion moves there
    found = _unmatched_targets(cfg, base) + _layer_findings(cfg, base)
    if not selected and not found and not wrapped:  # nothing selected, and no finding above says why
        found.append(_none_selected(cfg, base))
    found += _unsupported([n for n in selected if f"{n}.weight" not in wrapped], base.modules)
    found += _unused_excludes(cfg, base)
    if not _one_rank_needed(cfg, subject.consumers):
        found += _too_large(cfg, [n for n in selected if base.modules[n].kind is not None], base.modules)
    found += _unmatched_saves(cfg, base)
    return found


def pattern_targets(subject: Subject) -> Optional[tuple[list[str], list[str]]]:
    """``(targeted modules, every module name)`` that rank_pattern/alpha_pattern keys are judged against: the
    LoRA-able modules the config selects in the base model, or without one (or when the selection cannot be
    evaluated: the targets check says why) the adapter's own modules; None when there is neither.
    """
    try:
        selected = subject.selection()
    except LorasurgError:
        selected = None
    if selected is not None:
        modules = subject.base.modules
        parameters = list(subject.peft_view().parameters)  # PEFT looks a parameter's rank up by its name
        return [n for n in selected if modules[n].kind is not None] + parameters, list(modules) + parameters
    if subject.adapter is not None and subject.adapter.modules:
        names = list(subject.adapter.modules)
        return names, names
    return None


def check_patterns(subject: Subject) -> list[Finding]:
    """``pattern-unmatched``: rank_pattern/alpha_pattern keys that match no targeted module (see
    :func:`pattern_targets`)."""
    judged = pattern_targets(subject)
    return [] if judged is None else pattern_findings(subject.config, *judged)


# ------------------------------------------------------------------------------------------ target_modules


def _unmatched_targets(cfg: Any, base: BaseModel) -> list[Finding]:
    target, names = cfg.target_modules, list(base.modules)
    if target is None:  # target_parameters alone
        return []
    if isinstance(target, str) and target.lower() == ALL_LINEAR:
        if any(info.is_linear_like and n not in base.output_layers for n, info in base.modules.items()):
            return []
        return [Finding("target-unmatched", "target_modules",
                        f"'all-linear' finds no nn.Linear or Conv1D layer in {base.source} besides its output layer",
                        "name the modules to adapt in target_modules")]
    if isinstance(target, str):
        if any(matches_entry(target, n, regex=True) for n in names):
            return []
        return [Finding("target-unmatched", "target_modules",
                        f"the regex {target!r} matches none of the {len(names)} module names of {base.source} (a "
                        "string target_modules must match a whole name)", _nearest_hint(target, names))]
    return [
        Finding("target-unmatched", f"target_modules[{entry!r}]",
                f"{entry!r} is neither a module name of {base.source} nor a '.'-suffix of one "
                f"({len(names)} modules): PEFT adapts nothing for it", _nearest_hint(entry, names))
        for entry in sorted(target)
        if not any(matches_entry(entry, n) for n in names)
    ]


def _none_selected(cfg: Any, base: BaseModel) -> Finding:
    target = cfg.target_modules
    regex = isinstance(target, str)
    entries = [target] if regex else sorted(target)
    matched = [n for n in base.modules if any(matches_entry(e, n, regex=regex) for e in entries)]
    return Finding(
        "target-none-selected", "target_modules",
        f"target_modules matches {len(matched)} module(s) of {base.source} (e.g. {matched[:3]}) but selects none: "
        f"exclude_modules={_shown(cfg.exclude_modules)}, modules_to_save={cfg.modules_to_save}, "
        f"layers_to_transform={cfg.layers_to_transform} take every one out",
        "loosen exclude_modules / modules_to_save, or fix layers_to_transform",
    )


def _unsupported(selected: Sequence[str], modules: Mapping[str, ModuleInfo]) -> list[Finding]:
    return [
        Finding("target-unsupported", name,
                f"target_modules selects it but LoRA cannot wrap it ({modules[name].type_name}, weight "
                f"{modules[name].weight_shape}); PEFT refuses it: LoRA wraps {_WRAPPABLE}",
                "narrow target_modules to the layers you mean (e.g. leaf names like 'q_proj'), or add it to "
                "exclude_modules")
        for name in selected
        if modules[name].kind is None and modules[name].type_name != "MultiheadAttention"
    ]


def _unused_excludes(cfg: Any, base: BaseModel) -> list[Finding]:
    exclude = cfg.exclude_modules
    if not exclude or cfg.target_modules is None:
        return []
    probe = copy.copy(without_parameters(cfg))
    probe.exclude_modules = None
    would, _ = match_modules(probe, base.modules, base.output_layers)
    regex = isinstance(exclude, str)
    found = []
    for entry in [exclude] if regex else sorted(exclude):
        if any(matches_entry(entry, n, regex=regex) for n in would):
            continue
        anywhere = any(matches_entry(entry, n, regex=regex) for n in base.modules)
        found.append(Finding(
            "exclude-unmatched", "exclude_modules" if regex else f"exclude_modules[{entry!r}]",
            f"{entry!r} excludes none of the {len(would)} modules target_modules selects"
            + ("" if anywhere else f" (it matches no module of {base.source} at all)"),
            _nearest_hint(entry, would) if not anywhere else "remove it, or target the modules it names",
        ))
    return found


# ------------------------------------------------------------------------------- layers_to_transform/pattern


def _layer_findings(cfg: Any, base: BaseModel) -> list[Finding]:
    layers = cfg.layers_to_transform
    if layers is None or isinstance(cfg.target_modules, str):
        return []
    names = list(base.modules)
    containers = sorted({m.group(1) for n in names for m in [re.search(r"(?:^|\.)([^.]+)\.\d+\.", n)] if m})
    raw = cfg.layers_pattern
    patterns = [raw] if isinstance(raw, str) else list(raw or [])
    found = [
        Finding("layers-pattern-unmatched", "layers_pattern" if isinstance(raw, str) else f"layers_pattern[{p!r}]",
                f"no module name of {base.source} has {p!r} followed by a layer number, so layers_to_transform "
                "selects nothing through it", f"the layer lists in its names are {containers}: use one of them")
        for p in patterns
        if not any(layer_index(n, p) is not None for n in names)
    ]
    if patterns and len(found) == len(patterns):
        return found
    present = sorted({i for i in (layer_index(n, raw or None) for n in names) if i is not None})
    wanted = [layers] if isinstance(layers, int) else list(layers)
    missing = [i for i in wanted if i not in present]
    if missing:
        found.append(Finding(
            "layers-out-of-range", "layers_to_transform",
            f"{missing} are not layers of {base.source}; its layers are {_ranges(present)}",
            "use layer indices the model has (they count from 0)",
        ))
    return found


# -------------------------------------------------------------------------------- rank_pattern/alpha_pattern


@dataclass(frozen=True)
class UnmatchedKey:
    """A rank_pattern/alpha_pattern key that matches no targeted module.

    Attributes:
        field: ``"rank_pattern"`` or ``"alpha_pattern"``.
        key: the key.
        meant: the targeted modules the key finds when read as most people read a regex (``re.search``
            anywhere in the name, a leading ``base_model.model.`` ignored).
        rewrite: a key that matches exactly ``meant`` under PEFT's rule, when there is one: the anchored full
            name for one module, else the key followed by ``\\..*`` or ``.*``.
    """

    field: str
    key: str
    meant: tuple[str, ...]
    rewrite: Optional[str]


def unmatched_pattern_keys(cfg: Any, targeted: Sequence[str]) -> list[UnmatchedKey]:
    """Every rank_pattern/alpha_pattern key that matches none of ``targeted`` (PEFT ignores those silently).

    Raises:
        ConfigError: a key is not a valid regex.
    """
    out = []
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(cfg, field) or {}
        for key in unused_pattern_keys(patterns, targeted):
            meant = tuple(_meant(key, targeted))
            out.append(UnmatchedKey(field, key, meant, _rewrite(key, meant, targeted)))
    return out


def pattern_findings(cfg: Any, targeted: Sequence[str], all_names: Iterable[str]) -> list[Finding]:
    """``pattern-unmatched`` for each key of :func:`unmatched_pattern_keys`; ``all_names`` says what else the
    key matches (modules that are not targeted)."""
    names = list(all_names)
    found = []
    for item in unmatched_pattern_keys(cfg, targeted):
        default = f"r={cfg.r}" if item.field == "rank_pattern" else f"lora_alpha={cfg.lora_alpha}"
        elsewhere = [n for n in names if n not in targeted and pattern_key({item.key: None}, n)]
        note = f"; it matches {elsewhere[:3]}, which target_modules does not select" if elsewhere else ""
        if len(item.meant) == 1:
            fix = (f"it seems meant for {item.meant[0]!r}: write the key as {item.rewrite!r} "
                   "(lorasurg validate --fix does)")
        elif item.rewrite is not None:
            fix = (f"it seems meant for {len(item.meant)} modules (e.g. {list(item.meant[:2])}): write the key as "
                   f"{item.rewrite!r}")
        else:
            fix = "check the spelling against the module names (lorasurg inspect lists them)"
        found.append(Finding(
            "pattern-unmatched", f"{item.field}[{item.key!r}]",
            f"the key matches none of the {len(targeted)} targeted modules{note}, so PEFT ignores it silently and "
            f"every targeted module keeps {default}. PEFT's rule: the key must match a whole '.'-suffix of the "
            "module name (re.match(r'(.*\\.)?(KEY)$', name))", fix,
        ))
    return found


def _meant(key: str, names: Sequence[str]) -> list[str]:
    keys = {key, key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key}
    try:
        compiled = [re.compile(k) for k in keys]
    except re.error:
        return []
    return [n for n in names if any(c.search(n) for c in compiled)]


def _rewrite(key: str, meant: Sequence[str], targeted: Sequence[str]) -> Optional[str]:
    if len(meant) == 1:
        return anchored_pattern_key(meant[0])
    if not meant:
        return None
    for candidate in (key + r"\..*", key + ".*"):
        try:
            if {n for n in targeted if pattern_key({candidate: None}, n)} == set(meant):
                return candidate
        except ConfigError:  # the candidate is not a valid regex
            return None
    return None


# ----------------------------------------------------------------------------------------- ranks and saves


def _one_rank_needed(cfg: Any, consumers: Sequence[str]) -> bool:
    """The named consumers read the scale by rules that agree only when every module has one rank (vLLM's global
    ``lora_alpha / r`` and llama.cpp's ``lora_alpha / r_m``), and the config has it: ``prepare_for``'s ``padded``
    layout. A module padded beyond ``min(out, in)`` is then the price of that agreement (the ``--for`` report gives
    it in bytes), not a mistake, and ``rank_pattern`` (``rank-too-large``'s hint) would break the agreement."""
    layouts = {CONSUMERS[c].layout for c in consumers if c in CONSUMERS} - {"patterns"}
    return len(layouts) > 1 and not cfg.rank_pattern


def _too_large(cfg: Any, targeted: Sequence[str], modules: Mapping[str, ModuleInfo]) -> list[Finding]:
    found = []
    for name in targeted:
        info = modules[name]
        if info.weight_shape is None:
            continue
        r, _ = rank_alpha(cfg, name)
        A_shape, _, out = info.lora_shapes(r)
        inp = math.prod(A_shape[1:])
        cap = min(out, inp)
        if r > cap:
            found.append(Finding(
                "rank-too-large", name,
                f"r={r} but its delta is {out}x{inp}: at most rank {cap} is usable, {r - cap} of the rank is wasted",
                f"lower r, or set rank_pattern {{{anchored_pattern_key(name)!r}: {cap}}}",
            ))
    return found


def _unmatched_saves(cfg: Any, base: BaseModel) -> list[Finding]:
    return [
        Finding("save-unmatched", f"modules_to_save[{entry!r}]",
                f"{entry!r} matches no module of {base.source} (PEFT takes every module whose name ends in it): "
                "nothing is trained or saved for it", _nearest_hint(entry, base.modules))
        for entry in cfg.modules_to_save or []
        if not any(n.endswith(entry) for n in base.modules)
    ]


# ------------------------------------------------------------------------------------------------- helpers


def _nearest_hint(query: str, names: Iterable[str]) -> str:
    close = nearest_names(query, names, n=3)
    if close:
        return f"did you mean {' or '.join(repr(c) for c in close)}?"
    return "check the module names (lorasurg inspect, or Checkpoint.module_infos())"


def _ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5] -> '0-2, 5'``."""
    parts, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts) or "none"


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) or value is None else repr(sorted(value))
