"""``validate --fix -o OUT``: a corrected copy of an adapter, for the fixes that cannot change what it does.

The fixes, one per finding code (:data:`FIXERS`, applied in this order):

=====================  ======================================================================================
code                   fix
=====================  ======================================================================================
``init-reinit``        ``init_lora_weights: true`` (and the loftq/eva/corda/lora_ga sub-config its init used
                       reset to PEFT's default), so PEFT does not run the init again on load
``bias-unflagged``     ``lora_bias: true``, when PEFT allows it (no LoRA on an embedding, no DoRA, init
                       true/false): PEFT then loads the ``lora_B.bias`` tensors it used to drop
``tensor-untargeted``  drop the tensors of modules the config does not target (PEFT ignored them anyway)
``pattern-unmatched``  rewrite a rank_pattern/alpha_pattern key that matches nothing as the anchored name of
                       the one module it was meant for (``"^" + re.escape(name)``, in the same dict position),
                       when no other key takes that module first (in file order or PEFT's sorted order)
``file-bin``           write the tensors as ``adapter_model.safetensors`` instead of the pickle file
``key-checkpoint-``    rename the keys of modules (and saved copies) keyed by the checkpoint's names to the
``name``               model's names, and the ``target_modules``/``modules_to_save`` entries and anchored
                       rank/alpha pattern keys that named them in full
``parameter-refused``  ``lora_dropout: 0`` (dropout acts only while training); the other refused settings change
                       what the adapter does and are left
``dense-converted``    list each dense layer PEFT's MoE conversion leaves unadapted in ``target_parameters`` as
                       ``"<module>.weight"``, with its rank and alpha under the parameter's anchored name where
                       they differ from ``r``/``lora_alpha``
=====================  ======================================================================================

Tensor values are never changed: every tensor written is a tensor read, same dtype and values, and the same key
except where ``key-checkpoint-name`` renames it. The config is the file's own JSON with only the fixed keys
changed, in the file's own key order (the order of pattern keys decides which one applies). Other files in the
adapter directory (README, tokenizer files) are copied as they are.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from torch import Tensor

from ...config import CONFIG_NAME
from ...errors import InputError
from ...findings import Finding
from ...io.adapter import BIN_WEIGHTS_NAME, WEIGHTS_NAME, parse_peft_key, peft_key
from ...io.writer import atomic_output_dir, write_file
from ...targeting import alpha_value, anchored_pattern_key, pattern_key, rank_alpha
from ..options import short_list
from .report import Change, FixResult
from .subject import Subject
from .target_checks import pattern_targets, unmatched_pattern_keys

_short = functools.partial(short_list, limit=2)  # a, b and N more

__all__ = ["FIXERS", "write_fixed_copy"]

# init sub-configs and the value PEFT gives them when their init is not used
_INIT_SUBCONFIGS = {"loftq_config": {}, "eva_config": None, "corda_config": None, "lora_ga_config": None}


@dataclass
class _Plan:
    """The copy being prepared: the config's JSON object, the tensors (None for a bare config), the changes."""

    config: dict
    state: Optional[dict[str, Tensor]]
    changes: list[Change]

    def change(self, code: str, where: str, description: str) -> None:
        self.changes.append(Change(code, where, description))


def _fix_init(subject: Subject, findings: list[Finding], plan: _Plan) -> None:
    old = plan.config.get("init_lora_weights")
    plan.config["init_lora_weights"] = True
    plan.change("init-reinit", "init_lora_weights", f"{old!r} -> true: PEFT no longer runs the init again on load")
    for key, default in _INIT_SUBCONFIGS.items():
        if plan.config.get(key) not in (None, {}):
            plan.change("init-reinit", key, f"reset to {json.dumps(default)}: only its init used it")
            plan.config[key] = copy.deepcopy(default)


def _fix_bias(subject: Subject, findings: list[Finding], plan: _Plan) -> None:
    modules = subject.adapter.modules.values()
    if plan.config.get("use_dora") or any(m.embedding for m in modules):
        return  # PEFT refuses lora_bias with DoRA or on an embedding: not a safe fix
    if plan.config.get("init_lora_weights", True) not in (True, False):
        return
    plan.config["lora_bias"] = True
    plan.change("bias-unflagged", "lora_bias",
                f"false -> true: {len(findings)} module(s) have lora_B.bias tensors, which PEFT dropped")


def _parsed_keys(state: dict[str, Tensor]):
    """``(key, module, part)`` for each PEFT key of ``state`` (a snapshot: the caller may change ``state``)."""
    for key in list(state):
        try:
            module, part = parse_peft_key(key)
        except InputError:
            continue
        yield key, module, part


def _fix_untargeted(subject: Subject, findings: list[Finding], plan: _Plan) -> None:
    doomed = {f.where for f in findings}
    dropped: dict[str, list[str]] = {}
    for key, module, part in _parsed_keys(plan.state):
        if part is not None and module in doomed:
            del plan.state[key]
            dropped.setdefault(module, []).append(part)
    for module, parts in dropped.items():
        plan.change("tensor-untargeted", module,
                    f"dropped {', '.join(parts)}: target_modules does not select the module, so PEFT ignored them")


def _fix_patterns(subject: Subject, findings: list[Finding], plan: _Plan) -> None:
    judged = pattern_targets(subject)
    if judged is None:
        return
    for item in unmatched_pattern_keys(subject.config, judged[0]):
        patterns = plan.config.get(item.field)
        if len(item.meant) != 1 or not isinstance(patterns, dict) or item.rewrite in patterns:
            continue
        rewritten = {(item.rewrite if k == item.key else k): v for k, v in patterns.items()}
        if not _wins(rewritten, item.meant[0], item.rewrite):
            continue  # an earlier key matches the module too: which one was meant is not clear
        plan.config[item.field] = rewritten
        plan.change("pattern-unmatched", f"{item.field}[{item.key!r}]",
                    f"key rewritten as {item.rewrite!r}: it now applies to {item.meant[0]} only, as meant")


def _wins(patterns: dict, module: str, key: str) -> bool:
    """``key`` is the pattern that applies to ``module`` in this order and in sorted order (PEFT writes
    ``adapter_config.json`` with sorted keys, nested dicts included, so a re-saved file has sorted patterns)."""
    return pattern_key(patterns, module) == key and pattern_key(dict(sorted(patterns.items())), module) == key


def _concerned(findings: list[Finding]) -> list[str]:
    return [name for f in findings for name in (f.modules or (f.where,))]


def _fix_checkpoint_names(subject: Subject, findings: list[Finding], plan: _Plan) -> None:
    names = subject.base.checkpoint_names
    doomed = set(_concerned(findings))
    renamed: dict[str, str] = {}
    for key, module, part in _parsed_keys(plan.state):
        if part is not None and module in doomed:
            renamed[module] = names[module]
            plan.state[peft_key(names[module], part)] = plan.state.pop(key)
        elif part is None and module in doomed:
            owner, _, leaf = module.rpartition(".")
            renamed[owner] = names[owner]
            plan.state[peft_key(names[owner], leaf)] = plan.state.pop(key)
    for field in ("target_modules", "modules_to_save"):
        if isinstance(plan.config.get(field), list):
            plan.config[field] = [renamed.get(entry, entry) for entry in plan.config[field]]
    anchored = {anchored_pattern_key(old): anchored_pattern_key(new) for old, new in renamed.items()}
    for field in ("rank_pattern", "alpha_pattern"):
        if isinstance(plan.config.get(field), dict):
            plan.config[field] = {anchored.get(k, k): v for k, v in plan.config[field].items()}
    plan.change("key-checkpoint-name", _short(sorted(renamed)),
                f"{len(renamed)} module(s) renamed to the model's names (e.g. {next(iter(renamed))} -> "
                f"{next(iter(renamed.values()))}), with the config entries that named them")


def _fix_dropout(subject: Subject, findings: list[Finding], plan: _Plan) -> None:
    if any(f.where == "lora_dropout" for f in findings):
        plan.change("parameter-refused", "lora_dropout",
                    f"{plan.config.get('lora_dropout')!r} -> 0: PEFT's ParamWrapper refuses dropout, which acts only "
                    "in training")
        plan.config["lora_dropout"] = 0.0


def _fix_dense(subject: Subject, findings: list[Finding], plan: _Plan) -> None:
    cfg, lost = subject.config, _concerned(findings)
    plan.config["target_parameters"] = sorted(set(plan.config.get("target_parameters") or [])
                                              | {f"{m}.weight" for m in lost})
    if isinstance(plan.config.get("target_modules"), list):  # a full name PEFT moves would also fuse gate and up
        plan.config["target_modules"] = [e for e in plan.config["target_modules"] if e not in lost]
    keys = {anchored_pattern_key(m): anchored_pattern_key(f"{m}.weight") for m in lost}
    for field, default in (("rank_pattern", cfg.r), ("alpha_pattern", cfg.lora_alpha)):
        patterns = {keys.get(k, k): v for k, v in (plan.config.get(field) or {}).items()}
        for module in lost:  # PEFT looks a wrapped parameter's rank and alpha up by the parameter's name
            value = rank_alpha(cfg, module)[0 if field == "rank_pattern" else 1]
            if value != default and keys[anchored_pattern_key(module)] not in patterns:
                patterns[keys[anchored_pattern_key(module)]] = int(value) if field == "rank_pattern" \
                    else alpha_value(value)
        if patterns or field in plan.config:
            plan.config[field] = patterns
    plan.change("dense-converted", "target_parameters",
                f"added {len(lost)} dense layer weight(s) ({_short(lost)}), which PEFT's MoE conversion would leave "
                "unadapted (taken out of target_modules where named in full, their rank/alpha pattern keys moved to "
                "the parameter's name); their tensor keys stay as they are")


def _fix_bin(subject: Subject, findings: list[Finding], plan: _Plan) -> None:
    plan.change("file-bin", BIN_WEIGHTS_NAME, f"written as {WEIGHTS_NAME}: the same keys, dtypes and values")


FIXERS: dict[str, Callable[[Subject, list[Finding], _Plan], None]] = {
    "init-reinit": _fix_init,
    "bias-unflagged": _fix_bias,
    "tensor-untargeted": _fix_untargeted,
    "pattern-unmatched": _fix_patterns,
    "file-bin": _fix_bin,
    "key-checkpoint-name": _fix_checkpoint_names,
    "parameter-refused": _fix_dropout,
    "dense-converted": _fix_dense,
}
"""The safe fixes by the finding code they answer, in the order they are applied."""


def write_fixed_copy(subject: Subject, findings: list[Finding], output: os.PathLike, force: bool = False) -> FixResult:
    """Write ``subject`` with the :data:`FIXERS` for ``findings`` applied into ``output`` (atomically).

    Returns:
        The changes made (``remaining`` is left for the caller, who validates the copy); ``output`` None and
        a ``note`` when the config or the weights could not be read, so there is nothing safe to copy.

    Raises:
        OutputExistsError: ``output`` is not empty and ``force`` is false.
    """
    if subject.raw_config is None:
        return FixResult(None, note="the config is missing or unreadable, so there is no config to correct")
    if subject.directory is not None and subject.state is None:
        return FixResult(None, note="the weights are missing or unreadable, so there are no tensors to copy")
    plan = _Plan(copy.deepcopy(subject.raw_config), None if subject.state is None else dict(subject.state), [])
    for code, fixer in FIXERS.items():
        mine = [f for f in findings if f.code == code]
        if mine:
            fixer(subject, mine, plan)
    with atomic_output_dir(output, force) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(plan.config, indent=2), encoding="utf-8")
        if plan.state is not None:
            write_file(tmp, plan.state, WEIGHTS_NAME.removesuffix(".safetensors"))
        _copy_other_files(subject.directory, tmp)
    return FixResult(os.fspath(output), plan.changes)


def _copy_other_files(directory: Optional[Path], destination: Path) -> None:
    if directory is None:
        return
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name not in (CONFIG_NAME, WEIGHTS_NAME, BIN_WEIGHTS_NAME):
            shutil.copyfile(path, destination / path.name)
