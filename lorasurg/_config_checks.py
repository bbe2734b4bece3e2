"""The refusals of :class:`lorasurg.LoraConfig`: field types and values, and PEFT's forbidden combinations.

:func:`field_problems` reads a config's attributes and returns every problem as ``(message, is_type_error)``;
it raises nothing and changes nothing. Sub-configs are checked in :mod:`lorasurg._subconfigs`.
"""

from __future__ import annotations

from numbers import Real
from typing import Any, Collection

from ._subconfigs import Problem

__all__ = ["field_problems", "valid_init_lora_weights", "reinitialised_on_load"]

_BIASES = ("none", "all", "lora_only")
_INIT_ANY_CASE = ("gaussian", "olora", "mica")  # PEFT's layers compare these lower-cased
_INIT_EXACT = ("eva", "loftq", "orthogonal", "lora_ga")


def valid_init_lora_weights(value: Any) -> bool:
    """Whether PEFT's LoRA layers know ``init_lora_weights=value``.

    True/False; "gaussian", "olora", "mica" in any case; "eva", "loftq", "orthogonal", "lora_ga";
    "pissa" or "pissa_niter_<int>"; a string starting with "corda" (PEFT's layers test the prefix only).
    """
    if isinstance(value, bool):
        return True
    if not isinstance(value, str):
        return False
    if value.lower() in _INIT_ANY_CASE or value in _INIT_EXACT or value == "pissa" or value.startswith("corda"):
        return True
    parts = value.split("_niter_")
    if not value.startswith("pissa") or len(parts) != 2:
        return False
    try:
        int(parts[1])
    except ValueError:
        return False
    return True


def reinitialised_on_load(value: Any) -> bool:
    """Whether PEFT, loading a saved adapter with ``init_lora_weights=value``, runs that init again before it
    copies the saved tensors in: "pissa"/"pissa_niter_<n>", "olora", "corda...", "loftq" and "lora_ga" decompose
    or quantise the base weight and replace it by a residual, "eva" resets ``lora_B``. A saved adapter should
    say ``True`` (PEFT's own PiSSA workflow saves it that way).
    """
    if not isinstance(value, str):
        return False
    lowered = value.lower()
    return lowered.startswith(("pissa", "corda")) or lowered == "olora" or value in ("loftq", "lora_ga", "eva")


def field_problems(cfg: Any, task_types: Collection[str]) -> list[Problem]:
    """Every problem in ``cfg``'s plain fields and their combinations (sub-configs excluded).

    Args:
        cfg: a normalised :class:`lorasurg.LoraConfig` (read only).
        task_types: the valid ``task_type`` values.

    Returns:
        ``(message, is_type_error)`` pairs; empty when the fields are valid.
    """
    problems: list[Problem] = []

    def bad(message: str, is_type: bool = False) -> None:
        problems.append((message, is_type))

    if cfg.task_type is not None and cfg.task_type not in task_types:
        bad(f"task_type={cfg.task_type!r} is not a PEFT task type; use one of {', '.join(task_types)}, or None")
    if cfg.peft_type != "LORA":
        bad(f"peft_type={cfg.peft_type!r}: a LoraConfig is always a LORA adapter; leave peft_type unset")
    _check_scalars(cfg, bad)
    _check_collections(cfg, bad)
    _check_combinations(cfg, bad)
    return problems


def _check_scalars(cfg: Any, bad) -> None:
    if not _is_int(cfg.r) or cfg.r <= 0:
        bad(f"r must be a positive int (the LoRA rank), got {cfg.r!r}", not _is_int(cfg.r))
    if not _is_number(cfg.lora_alpha):
        bad(f"lora_alpha must be a number, got {cfg.lora_alpha!r}", True)
    if not _is_number(cfg.lora_dropout) or not 0.0 <= cfg.lora_dropout <= 1.0:
        bad(f"lora_dropout must be a probability in [0, 1], got {cfg.lora_dropout!r}", not _is_number(cfg.lora_dropout))
    if cfg.bias not in _BIASES:
        bad(f"bias must be one of {list(_BIASES)}, got {cfg.bias!r}")
    if not valid_init_lora_weights(cfg.init_lora_weights):
        bad(
            f"init_lora_weights={cfg.init_lora_weights!r} is not an initialisation PEFT knows; use True, False, "
            "'gaussian', 'eva', 'olora', 'pissa', 'pissa_niter_<n>', 'corda', 'loftq', 'orthogonal', 'mica' "
            "or 'lora_ga'",
            not isinstance(cfg.init_lora_weights, (bool, str)),
        )


def _check_collections(cfg: Any, bad) -> None:
    for name in ("target_modules", "exclude_modules"):
        value = getattr(cfg, name)
        if value is not None and not isinstance(value, str) and not _is_str_collection(value):
            bad(f"{name} must be a regex string, a list of module names, or None; got {value!r}", True)
    for name, what, why in (
        ("target_parameters", "parameter names", ""),
        ("modules_to_save", "module names", " (PEFT would match it character by character)"),
    ):
        value = getattr(cfg, name)
        if isinstance(value, str):
            bad(f"{name} must be a list of {what} or None, not a string{why}; write [{value!r}]", True)
        elif value is not None and not _is_str_collection(value):
            bad(f"{name} must be a list of {what} or None; got {value!r}", True)
    ltt = cfg.layers_to_transform
    if ltt is not None and not _is_int(ltt) and not _is_int_list(ltt):
        bad(f"layers_to_transform must be a layer index, a list of layer indices, or None; got {ltt!r}", True)
    lp = cfg.layers_pattern
    if lp is not None and not isinstance(lp, str) and not _is_str_collection(lp):
        bad(f"layers_pattern must be a string, a list of strings, or None; got {lp!r}", True)
    _check_pattern(cfg.rank_pattern, "rank_pattern", "a positive int rank", lambda v: _is_int(v) and v > 0, bad)
    _check_pattern(cfg.alpha_pattern, "alpha_pattern", "a number", _is_number, bad)
    tti = cfg.trainable_token_indices
    if tti is not None and not _is_int_list(tti):
        if not (isinstance(tti, dict) and all(isinstance(k, str) and _is_int_list(v) for k, v in tti.items())):
            bad(
                "trainable_token_indices must be a list of token ids, a dict {embedding module name: list of "
                f"token ids}}, or None; got {tti!r}",
                True,
            )
    if cfg.alora_invocation_tokens is not None and not _is_int_list(cfg.alora_invocation_tokens):
        bad(f"alora_invocation_tokens must be a list of token ids or None; got {cfg.alora_invocation_tokens!r}", True)
    lr = cfg.layer_replication
    if lr is not None and not (isinstance(lr, (list, tuple)) and all(_is_int_list(p) and len(p) == 2 for p in lr)):
        bad(f"layer_replication must be a list of [start, end) layer index pairs or None; got {lr!r}", True)
    for name in ("loftq_config", "runtime_config"):
        value = getattr(cfg, name)
        if not isinstance(value, dict) and not (value is None and name == "loftq_config"):
            bad(f"{name} must be a dict, got {type(value).__name__}", True)


def _check_pattern(pattern: Any, name: str, what: str, ok, bad) -> None:
    if not isinstance(pattern, dict):
        bad(f"{name} must be a dict {{module name or regex: {what}}} ({{}} for none); got {pattern!r}", True)
        return
    wrong = {k: v for k, v in pattern.items() if not isinstance(k, str) or not ok(v)}
    if wrong:
        bad(f"{name} values must each be {what}, keys module names or regexes; refused entries: {wrong!r}", True)


def _check_combinations(cfg: Any, bad) -> None:
    regex_targets = isinstance(cfg.target_modules, str)
    if regex_targets and cfg.layers_to_transform is not None:
        bad(
            "layers_to_transform cannot be used when target_modules is a regex string; give target_modules as a "
            "list of module names, or put the layer indices into the regex and drop layers_to_transform"
        )
    if regex_targets and cfg.layers_pattern is not None:
        bad(
            "layers_pattern cannot be used when target_modules is a regex string; give target_modules as a list "
            "of module names, or drop layers_pattern"
        )
    if cfg.layers_pattern and cfg.layers_to_transform is None:
        bad(
            f"layers_pattern={cfg.layers_pattern!r} needs layers_to_transform (the layer indices to adapt); set "
            "layers_to_transform or drop layers_pattern"
        )
    if cfg.use_dora and cfg.megatron_config:
        bad("use_dora=True does not work with megatron_config (PEFT has no DoRA Megatron layers); set use_dora=False")
    if cfg.init_lora_weights == "loftq" and not cfg.loftq_config:
        bad("init_lora_weights='loftq' needs loftq_config, e.g. {'loftq_bits': 4, 'loftq_iter': 1}")
    if cfg.lora_bias and cfg.init_lora_weights not in (True, False):
        bad(
            f"lora_bias=True needs init_lora_weights True or False, got {cfg.init_lora_weights!r}; "
            "set lora_bias=False or init_lora_weights=True"
        )
    if cfg.lora_bias and cfg.use_dora:
        bad("lora_bias=True is not supported with use_dora=True; set one of them to False")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)


def _is_str_collection(value: Any) -> bool:
    return isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value)
