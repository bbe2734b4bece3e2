"""Which modules a LoRA config selects, and the rank and alpha each one gets, as PEFT 0.21 decides them.

Pure functions over module names and :class:`~lorasurg.modules.ModuleInfo` descriptions: no torch modules, no
files. ``config`` is any object with PEFT ``LoraConfig``'s attribute names (``lorasurg.LoraConfig``,
``peft.LoraConfig``, or a stand-in); missing optional attributes count as unset.

PEFT's rules, as mirrored here (``peft/tuners/tuners_utils.py``: ``check_target_module_exists``,
``inject_adapter``, ``_maybe_include_all_linear_layers``; ``peft/utils/other.py``: ``get_pattern_key``,
``_set_trainable``):

1. A module is *excluded* (never LoRA-targeted) when ``exclude_modules`` matches it (a string: regex matching
   the whole name; a list: an entry equal to the name or to a ``.``-suffix of it), or when it or one of its
   parents is a module to save (entry ``m`` spliced unparenthesised into ``(^|.*\\.)m($|\\..*)``).
2. ``target_modules``: a string is a regex that must match the whole name; ``"all-linear"`` (any case)
   becomes the set of full names of every linear-like module except the output layers; a list entry selects
   a name equal to it or ending in ``"." + entry``.
3. ``layers_to_transform`` (an int, or a non-empty list) keeps only modules whose layer index (see
   :func:`layer_index`) is in it. It applies only to list entries matched as a suffix: a name listed exactly
   bypasses it, and it never applies to a regex string.
4. A list of 20 or more entries is first shortened by PEFT to the fewest suffixes that select the same
   modules; this is mirrored because it changes which names count as "listed exactly" in rule 3.
5. Task heads are modules to save: ``classifier``/``score`` for ``SEQ_CLS``/``TOKEN_CLS``, ``qa_outputs``
   for ``QUESTION_ANS`` (PEFT's task model classes add them to ``modules_to_save`` before injecting).
6. Rank and alpha: the first ``rank_pattern``/``alpha_pattern`` key (dict order) that matches a whole
   ``.``-suffix of the module name wins, looked up separately for each; else ``r``/``lora_alpha``.

Not modelled (refused with :class:`~lorasurg.errors.UnsupportedError`): ``target_parameters``,
``layer_replication`` (callers select among the replicated names, :mod:`lorasurg.layer_replication`, with the
field cleared), ``ensure_weight_tying`` together with an embedding layer. Not modelled silently: PEFT's default
``target_modules`` per model type (``None`` is a :class:`~lorasurg.errors.ConfigError` here) and transformers-v5
MoE config conversion.
"""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Optional, Union

from .errors import ConfigError, UnsupportedError

if TYPE_CHECKING:  # only for annotations: keeps this module free of torch
    from .modules import ModuleInfo

__all__ = [
    "ALL_LINEAR",
    "select_modules",
    "match_modules",
    "matches_entry",
    "select_modules_to_save",
    "modules_to_save",
    "is_module_to_save",
    "layer_index",
    "pattern_key",
    "rank_alpha",
    "unused_pattern_keys",
    "exact_target_modules",
    "select_parameters",
    "without_parameters",
    "anchored_pattern_key",
    "rank_alpha_fields",
    "alpha_value",
    "nearest_names",
]

ALL_LINEAR = "all-linear"

# PEFT shortens target lists of at least this many entries (peft.utils.constants.MIN_TARGET_MODULES_FOR_OPTIMIZATION).
_CONDENSE_AT = 20

# Heads that PEFT's task model classes add to modules_to_save, by task type.
_TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

_WRAPPABLE = "nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/Conv2d/Conv3d"


# ----------------------------------------------------------------------------------------------- regex helpers


@lru_cache(maxsize=2048)
def _compile(pattern: str, field: str, value: Optional[str] = None) -> re.Pattern:
    """Compile ``pattern``, built from the user's ``value`` of ``field`` (``pattern`` itself when None)."""
    try:
        return re.compile(pattern)
    except re.error as err:
        shown = pattern if value is None else value
        raise ConfigError(f"{field}: {shown!r} is not a valid regular expression ({err}); fix or escape it.") from err


def _matches_entry(entry: str, name: str) -> bool:
    """A list entry of target_modules/exclude_modules selects ``name`` when equal to it or to a ``.``-suffix."""
    return name == entry or name.endswith("." + entry)


def matches_entry(entry: str, name: str, *, regex: bool = False) -> bool:
    """Whether one ``target_modules``/``exclude_modules`` value selects ``name``, before any other rule.

    A list entry (``regex=False``) selects a name equal to it or ending in ``"." + entry``; a string value
    (``regex=True``) is a regex that must match the whole name.

    Raises:
        ConfigError: ``regex`` and ``entry`` is not a valid regex.
    """
    if regex:
        return _compile(entry, "target_modules/exclude_modules").fullmatch(name) is not None
    return _matches_entry(entry, name)


# ------------------------------------------------------------------------------------------------ small rules


def layer_index(module_name: str, layers_pattern: Union[str, Sequence[str], None] = None) -> Optional[int]:
    """The layer index PEFT reads from a module name for ``layers_to_transform``; None when it finds none.

    Without ``layers_pattern`` (None, ``""`` or ``[]``) it is the first number that is a whole name segment
    preceded by at least two segments (``model.layers.3.mlp`` -> 3, ``encoder.block.1.layer.0.x`` -> 1) and
    followed by another. With ``layers_pattern`` (a regex or a list of them, tried in order) it is the number
    right after the first segment run matching the pattern (``layers.3.`` -> 3).

    Raises:
        ConfigError: a layers_pattern is not a valid regex.
    """
    if not layers_pattern:
        found = _compile(r".*?\.[^.]*\.(?P<idx>\d+)\.", "layers_pattern").match(module_name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        found = None
        for pattern in patterns:
            # spliced unparenthesised, as PEFT does; lazy so the first layer number wins (MoE experts come later)
            found = _compile(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", "layers_pattern", pattern).match(module_name)
            if found:
                break
    return int(found.group("idx")) if found else None


def modules_to_save(config: Any) -> list[str]:
    """``config.modules_to_save`` plus the task heads PEFT adds for the config's ``task_type`` (rule 5)."""
    entries = list(getattr(config, "modules_to_save", None) or [])
    task_type = getattr(config, "task_type", None)
    entries.extend(_TASK_HEADS.get(getattr(task_type, "value", task_type), ()))
    return entries


def is_module_to_save(config: Any, module_name: str) -> bool:
    """Whether PEFT replaces ``module_name`` by a trainable, saved copy (``ModulesToSaveWrapper``).

    PEFT's test is a plain string suffix, without a ``.`` boundary: ``modules_to_save=["head"]`` also takes
    ``lm_head``. Task heads count (see :func:`modules_to_save`).
    """
    return any(module_name.endswith(entry) for entry in modules_to_save(config))


def select_modules_to_save(config: Any, modules: Iterable[str]) -> list[str]:
    """The names among ``modules`` (in order) that :func:`is_module_to_save` accepts."""
    entries = modules_to_save(config)
    return [name for name in modules if any(name.endswith(entry) for entry in entries)]


def _under_module_to_save(entries: Sequence[str], name: str) -> bool:
    # The module is, or lies inside, a module to save; PEFT splices the entry in without parentheses.
    return any(_compile(rf"(^|.*\.){entry}($|\..*)", "modules_to_save", entry).match(name) for entry in entries)


def _is_excluded(exclude: Any, save_entries: Sequence[str], name: str) -> bool:
    if exclude:
        if isinstance(exclude, str):
            if _compile(exclude, "exclude_modules").fullmatch(name):
                return True
        elif any(_matches_entry(entry, name) for entry in exclude):
            return True
    return _under_module_to_save(save_entries, name)


# ------------------------------------------------------------------------------------------ rank and alpha


def _pattern_key(patterns: Mapping[str, Any], module_name: str, field: str) -> Optional[str]:
    for key in patterns:
        if _compile(rf"(.*\.)?({key})$", field, key).match(module_name):
            return key
    return None


def pattern_key(patterns: Mapping[str, Any], module_name: str) -> Optional[str]:
    """The ``rank_pattern``/``alpha_pattern`` key that applies to ``module_name``, or None.

    The first key in dict order for which ``re.match(rf"(.*\\.)?({key})$", module_name)`` succeeds: the key
    is a regex that must match a whole ``.``-suffix of the name (the whole name included). A key starting
    with ``^`` can only match the entire name.

    Raises:
        ConfigError: a key is not a valid regex.
    """
    return _pattern_key(patterns, module_name, "rank_pattern/alpha_pattern key")


def rank_alpha(config: Any, module_name: str) -> tuple[int, float]:
    """``(r, lora_alpha)`` PEFT gives ``module_name``: from the first matching ``rank_pattern`` key and,
    separately, the first matching ``alpha_pattern`` key (:func:`pattern_key`); else ``config.r`` and
    ``config.lora_alpha``. The scale is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).

    Raises:
        ConfigError: a pattern key is not a valid regex.
    """
    rank_patterns = getattr(config, "rank_pattern", None) or {}
    alpha_patterns = getattr(config, "alpha_pattern", None) or {}
    r_key = _pattern_key(rank_patterns, module_name, "rank_pattern key")
    a_key = _pattern_key(alpha_patterns, module_name, "alpha_pattern key")
    r = rank_patterns[r_key] if r_key is not None else config.r
    alpha = alpha_patterns[a_key] if a_key is not None else config.lora_alpha
    return int(r), float(alpha)


def unused_pattern_keys(patterns: Mapping[str, Any], module_names: Iterable[str]) -> list[str]:
    """Keys of ``patterns`` that match none of ``module_names`` (PEFT ignores them, with a warning)."""
    names = list(module_names)
    return [key for key in patterns if not any(_pattern_key({key: None}, n, "pattern key") for n in names)]


def anchored_pattern_key(module_name: str) -> str:
    """A rank_pattern/alpha_pattern key that matches exactly the module ``module_name`` and nothing else.

    ``"^" + re.escape(module_name)``: the ``^`` forces PEFT's optional ``(.*\\.)?`` prefix to be empty, so the
    key cannot match a longer name ending in ``.module_name``; escaping the dots keeps it from matching a
    name that differs only where the dots are (``model.layers.1.q`` vs ``model_layers_1_q``).
    """
    return "^" + re.escape(module_name)


def rank_alpha_fields(per_module: Mapping[str, tuple[int, float]],
                      base: Optional[tuple[int, float]] = None) -> dict[str, Any]:
    """Config fields ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` that give each module exactly its
    ``(rank, alpha)`` under PEFT's rules (:func:`rank_alpha`).

    ``r`` is the largest rank and ``lora_alpha`` the alpha that the most modules of that rank have (the first such
    on a tie), so tools that ignore the patterns still see the typical module; every module whose rank or alpha
    differs gets an anchored key (:func:`anchored_pattern_key`, one module each) in ``rank_pattern`` /
    ``alpha_pattern``, separately (PEFT looks the two up separately). Alphas equal to 1e-12 relative count as
    equal; integral alphas are written as ints (:func:`alpha_value`).

    ``base`` forces ``(r, lora_alpha)`` instead (PEFT reads MoE experts at the config's global values, see
    :mod:`lorasurg.consumers.experts`); the patterns then cover every module that differs from it.

    Raises:
        ConfigError: ``per_module`` is empty, or a rank is below 1.
    """
    if not per_module:
        raise ConfigError("rank_alpha_fields needs at least one module")
    bad = {m: rank for m, (rank, _) in per_module.items() if rank < 1}
    if bad:
        raise ConfigError(f"ranks must be >= 1, got {bad}")
    alphas = {m: alpha_value(a) for m, (_, a) in per_module.items()}
    if base is not None:
        r, alpha = int(base[0]), alpha_value(base[1])
    else:
        r = max(rank for rank, _ in per_module.values())
        alpha = Counter(alphas[m] for m, (rank, _) in per_module.items() if rank == r).most_common(1)[0][0]
    return {
        "r": int(r),
        "lora_alpha": alpha,
        "rank_pattern": {anchored_pattern_key(m): int(k) for m, (k, _) in per_module.items() if k != r},
        "alpha_pattern": {
            anchored_pattern_key(m): a for m, a in alphas.items() if not math.isclose(a, alpha, rel_tol=1e-12)
        },
    }


def alpha_value(x: float) -> Union[int, float]:
    """``x`` as a config writes it: an int when integral to 1e-9 relative (PEFT writes lora_alpha as an int by
    default; ``scale * r`` computed in floats may land a rounding error off an integer), else a float."""
    nearest = round(x)
    if math.isclose(x, nearest, rel_tol=1e-9, abs_tol=1e-12):
        return int(nearest)
    return float(x)


# ------------------------------------------------------------------------------------------------ selection


def _condense(targets: Collection[str], other_names: Iterable[str]) -> set[str]:
    """PEFT's shortening of long target lists: for each target (ordered by its suffixes, shortest first), keep
    its shortest ``.``-suffix that no other module name has and no kept suffix already covers."""

    def suffixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]

    taken = {s for other in other_names for s in suffixes(other)}
    kept: set[str] = set()
    for item, item_suffixes in sorted(((t, suffixes(t)) for t in set(targets)), key=lambda pair: pair[1]):
        free = next((s for s in item_suffixes if s not in kept and s not in taken), None)
        if free is not None and not any(item.endswith("." + k) for k in kept):
            kept.add(free)
    return kept if kept and len(kept) < len(set(targets)) else set(targets)


def _resolve_targets(
    config: Any, modules: Mapping[str, ModuleInfo], output_layers: Collection[str]
) -> Union[str, set[str]]:
    targets = getattr(config, "target_modules", None)
    if targets is None:
        raise ConfigError(
            "target_modules is not set. PEFT would pick a default for some model types; lorasurg needs it "
            'explicitly: e.g. target_modules=["q_proj", "v_proj"] or "all-linear".'
        )
    if isinstance(targets, str):
        if targets.lower() != ALL_LINEAR:
            return targets
        targets = {name for name, info in modules.items() if info.is_linear_like and name not in output_layers}
    condense = isinstance(targets, (list, set, frozenset)) and len(set(targets)) >= _CONDENSE_AT
    targets = set(targets)
    if condense:
        names = list(modules)
        others = [n for n in names if not any(_matches_entry(t, n) for t in targets)]
        targets = _condense(targets, others)
    return targets


def _target_match(config: Any, targets: Union[str, set[str]], name: str) -> bool:
    if isinstance(targets, str):
        return _compile(targets, "target_modules").fullmatch(name) is not None
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = layer_index(name, getattr(config, "layers_pattern", None))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def select_parameters(config: Any, parameters: Iterable[str]) -> list[str]:
    """The parameters PEFT 0.21.2 wraps for ``config.target_parameters``, in the order of ``parameters``.

    A parameter's full name (``model.layers.0.mlp.experts.gate_up_proj``) is selected when it equals an entry or
    ends with ``"." + entry`` (PEFT's ``BaseTuner._inject_parameters``); no regex, no ``layers_to_transform``.
    """
    entries = list(getattr(config, "target_parameters", None) or [])
    return [name for name in parameters if any(name == t or name.endswith("." + t) for t in entries)]


def without_parameters(config: Any) -> Any:
    """``config`` with ``target_parameters`` cleared, for selecting its ``target_modules`` alone (the parameters
    are selected by :func:`select_parameters`)."""
    if not getattr(config, "target_parameters", None):
        return config
    import dataclasses

    return dataclasses.replace(config, target_parameters=None)


def _refuse_unsupported(config: Any) -> None:
    if getattr(config, "target_parameters", None):
        raise UnsupportedError(
            f"target_parameters={config.target_parameters!r} is not supported by lorasurg yet; "
            "use PEFT directly for adapters on nn.Parameters (e.g. MoE expert weights)."
        )
    if getattr(config, "layer_replication", None):
        raise UnsupportedError(
            "layer_replication is not supported by lorasurg yet (it changes the model's module names before "
            "targeting); use PEFT directly or drop layer_replication."
        )


def select_modules(
    config: Any, modules: Mapping[str, ModuleInfo], output_layers: Collection[str] = ()
) -> list[str]:
    """The modules PEFT wraps with LoRA for ``config``, in the order of ``modules`` (rules 1-5 above).

    Args:
        config: a LoRA config (PEFT ``LoraConfig`` attribute names).
        modules: ``{name: ModuleInfo}`` for every module of the model except the root, in ``named_modules``
            order (:func:`lorasurg.modules.describe_model`).
        output_layers: names ``"all-linear"`` leaves out (:func:`lorasurg.modules.output_layer_names`).

    Returns:
        The selected module names.

    Raises:
        ConfigError: target_modules is None or selects nothing (the message lists the nearest module
            names); a selected module is of a type LoRA cannot wrap (all of them are listed); a selected
            Conv with ``groups`` does not divide its rank; a regex in the config is invalid.
        UnsupportedError: target_parameters or layer_replication is set; ensure_weight_tying is set and an
            embedding is targeted or saved.
    """
    _refuse_unsupported(config)
    targets = _resolve_targets(config, modules, output_layers)
    selected, excluded = _match(config, targets, modules)
    if not selected:
        raise _nothing_selected(config, targets, modules, excluded)
    _check_wrappable(config, selected, modules)
    return selected


def match_modules(
    config: Any, modules: Mapping[str, ModuleInfo], output_layers: Collection[str] = ()
) -> tuple[list[str], list[str]]:
    """``(selected, excluded)``: what :func:`select_modules` selects, without its refusals.

    ``selected`` may be empty and may hold modules LoRA cannot wrap; ``excluded`` are the modules that
    ``exclude_modules`` or ``modules_to_save`` take out of targeting (rule 1), in model order. For callers that
    report problems themselves (``lorasurg validate``).

    Raises:
        ConfigError: target_modules is None; a regex in the config is invalid.
        UnsupportedError: target_parameters or layer_replication is set.
    """
    _refuse_unsupported(config)
    return _match(config, _resolve_targets(config, modules, output_layers), modules)


def _match(
    config: Any, targets: Union[str, set[str]], modules: Mapping[str, ModuleInfo]
) -> tuple[list[str], list[str]]:
    exclude = getattr(config, "exclude_modules", None)
    save_entries = modules_to_save(config)
    selected: list[str] = []
    excluded: list[str] = []
    for name in modules:
        if _is_excluded(exclude, save_entries, name):
            excluded.append(name)
        elif _target_match(config, targets, name):
            selected.append(name)
    return selected, excluded


def _nothing_selected(
    config: Any, targets: Union[str, set[str]], modules: Mapping[str, ModuleInfo], excluded: Sequence[str]
) -> ConfigError:
    raw = getattr(config, "target_modules", None)
    shown = raw if isinstance(raw, str) else sorted(raw)
    layers = getattr(config, "layers_to_transform", None)
    layer_note = ""
    if layers is not None:
        pattern = getattr(config, "layers_pattern", None)
        layer_note = f" with layers_to_transform={layers!r}, layers_pattern={pattern!r}"
    hidden = [name for name in excluded if _target_match(config, targets, name)]
    if isinstance(raw, str) and raw.lower() == ALL_LINEAR and not hidden:
        return ConfigError(
            "target_modules='all-linear' found no nn.Linear or Conv1D layer besides the output layers; "
            "name the modules to adapt in target_modules instead."
        )
    if hidden:
        return ConfigError(
            f"target_modules={shown!r}{layer_note} selects no module: every module it matches is excluded by "
            f"exclude_modules or modules_to_save ({_short_list(hidden)}). Remove them from exclude_modules / "
            "modules_to_save, or target other modules."
        )
    queries = [raw] if isinstance(raw, str) else sorted(raw)
    hints = "; ".join(f"{q!r} -> {', '.join(nearest_names(q, modules, n=5)) or 'nothing similar'}" for q in queries)
    return ConfigError(
        f"target_modules={shown!r}{layer_note} matches none of the model's {len(modules)} modules. "
        f"Nearest module names: {hints}. A list entry must equal a module name or a '.'-separated suffix of "
        "it (e.g. 'q_proj'); a string is a regex that must match the whole name."
    )


def _check_wrappable(config: Any, selected: Sequence[str], modules: Mapping[str, ModuleInfo]) -> None:
    problems, ranks = [], []
    for name in selected:
        info = modules[name]
        if info.type_name == "MultiheadAttention":
            continue  # PEFT's LoRA on its in_proj and out_proj
        if info.kind is None:
            problems.append(f"{name!r} ({info.type_name})")
        elif info.kind.startswith("conv") and info.groups > 1:
            r, _ = rank_alpha(config, name)
            if r % info.groups:
                ranks.append((f"{name!r} ({info.type_name}, groups={info.groups}) has rank {r}", info.groups))
    if problems:
        raise ConfigError(
            f"target_modules selects {len(problems)} module(s) LoRA cannot wrap: {'; '.join(problems)}. "
            f"LoRA wraps {_WRAPPABLE}. Narrow target_modules (e.g. to leaf names like 'q_proj') or add these "
            "to exclude_modules."
        )
    if ranks:
        groups = {g for _, g in ranks}
        examples = f" ({', '.join(str(k * min(groups)) for k in (1, 2, 4))}, ...)" if len(groups) == 1 else ""
        raise ConfigError(
            f"LoRA on a grouped convolution needs a rank that is a multiple of its groups{examples}, as in PEFT: "
            f"{'; '.join(text for text, _ in ranks)}. Set r, or a rank_pattern entry for each of them, to such a "
            "multiple, or do not target them."
        )
    if getattr(config, "ensure_weight_tying", False):
        tied = [n for n in list(selected) + select_modules_to_save(config, modules) if modules[n].kind == "embedding"]
        if tied:
            raise UnsupportedError(
                f"ensure_weight_tying with embedding layer(s) {_short_list(tied)} targeted or saved is not "
                "supported by lorasurg yet (PEFT then also adapts the tied output layer); set "
                "ensure_weight_tying=False or use PEFT directly."
            )


# ----------------------------------------------------------------------------------------- writing configs


def exact_target_modules(selected: Sequence[str], all_names: Sequence[str]) -> Union[list[str], str]:
    """A ``target_modules`` value that selects exactly ``selected`` among ``all_names`` under PEFT's rules
    (with no exclude_modules, layers_to_transform or modules_to_save interfering).

    Prefers, per leaf name (last segment), the leaf itself when it selects only modules in ``selected``, else
    the full names of that leaf's selected modules; returns the sorted list. A numeric leaf (``mlp.2`` in a
    ``Sequential``) is never used alone: ``"2"`` would also select layer 2 of any model with three layers. If that still selects something
    else (one module name being a ``.``-suffix of another), returns a regex string matching exactly the names.
    ``all_names`` must hold every module of the model, containers included, or a leaf may match a module the
    caller did not list.

    Raises:
        ConfigError: ``selected`` is empty or names modules missing from ``all_names``.
    """
    wanted = list(dict.fromkeys(selected))
    known = set(all_names)
    missing = [n for n in wanted if n not in known]
    if missing:
        raise ConfigError(
            f"exact_target_modules: selected module(s) {_short_list(missing)} are not modules of the model; "
            "select among all_names."
        )
    if not wanted:
        raise ConfigError("exact_target_modules: the selection is empty; select at least one module.")
    wanted_set = set(wanted)
    by_leaf: dict[str, list[str]] = {}
    for name in wanted:
        by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    entries: set[str] = set()
    for leaf, names in by_leaf.items():
        if not leaf.isdigit() and all(n in wanted_set for n in all_names if _matches_entry(leaf, n)):
            entries.add(leaf)
        else:
            entries.update(names)
    if {n for n in all_names if any(_matches_entry(e, n) for e in entries)} == wanted_set:
        return sorted(entries)
    return "|".join(re.escape(n) for n in sorted(wanted_set))


# ------------------------------------------------------------------------------------------------- messages


def nearest_names(query: str, names: Iterable[str], n: int = 5) -> list[str]:
    """Up to ``n`` module names or leaf names closest to ``query`` (difflib ratio), best first."""
    candidates: dict[str, None] = {}
    for name in names:
        candidates[name] = None
        candidates[name.rsplit(".", 1)[-1]] = None
    return difflib.get_close_matches(query, list(candidates), n=n, cutoff=0.5)


def _short_list(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
