"""Checks of LoRA on mixture-of-experts models as PEFT 0.21.2 loads it on transformers 5.

Two layouts (:mod:`lorasurg.consumers.experts`):

* ``target_parameters`` LoRAs (PEFT's ``ParamWrapper``, on fused 3-D experts or any 2-D weight): each saved path
  against its parameter, ``lora_A (r E, in)``, ``lora_B (out, r E)`` with ``r`` from the config under the
  parameter's name and ``in``/``out`` by PEFT's ``is_transposed`` rule (``rank-mismatch``, ``shape-mismatch``);
  entries that select nothing (``parameter-unmatched``); the settings a ``ParamWrapper`` refuses
  (``parameter-refused``: ``lora_dropout``, ``lora_bias``, DoRA, and ``fan_in_fan_out`` when no ``nn.Linear`` target
  resets it first, since PEFT wraps modules before parameters and sets the flag to False at each linear layer);
* per-expert LoRAs under the checkpoint's names (``mlp.experts.3.gate_proj``), which PEFT converts to
  ``target_parameters`` on load (:mod:`lorasurg.consumers.peft_conversion`); for the other model types (Qwen2-MoE) it
  converts the keys, not the config, so the config must list the fused parameters (``expert-unconverted``); and
  only when every part of a fused projection is targeted (``expert-fused-part``),
  every expert of an adapted layer is there (``expert-missing``; a layer without any is loaded with missing keys,
  ``expert-layer-missing``), the experts of a projection share one rank equal to the rank PEFT builds the fused
  LoRA at (``expert-rank``) and their scale is the one PEFT's conversion reads (``expert-scale``). The conversion
  takes the converted leaf names away from every layer, so dense layers that shared them lose their LoRA
  (``dense-converted``).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import Sequence

from ...consumers.experts import PEFT_MOE_SOURCE, peft_converts_experts
from ...engine.factors import lora_scale
from ...errors import LorasurgError
from ...findings import Finding
from ...targeting import anchored_pattern_key, match_modules, nearest_names, rank_alpha, without_parameters
from ..options import short_list
from .peft_view import PeftView
from .subject import BaseModel, Subject

_short = functools.partial(short_list, limit=3)  # a, b, c and N more

__all__ = ["check_experts"]

_REFUSED_FIX = {
    "lora_dropout": "set lora_dropout to 0: it only acts while training, so the loaded adapter does the same "
                    "(lorasurg validate --fix does)",
    "lora_bias": "a ParamWrapper has no bias: fuse the adapter into the model (lorasurg fuse), or drop the "
                 "lora_B.bias tensors and lora_bias",
    "use_dora": "a ParamWrapper has no DoRA: fuse the adapter into the model (lorasurg fuse) instead",
    "fan_in_fan_out": "set fan_in_fan_out to false: the experts are not GPT-2 Conv1D layers",
}


def check_experts(subject: Subject) -> list[Finding]:
    """Every check of the module docstring."""
    view = subject.peft_view()
    found = _unmatched_parameters(subject.config, subject.base)
    found += _refused(subject, view)
    if subject.adapter is not None:
        found += _parameter_shapes(subject, view)
        found += _per_expert(subject, view)
        found += _dense_converted(subject, view)
    return found


def _where(names: Sequence[str]) -> str:
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def _finding(code: str, names: Sequence[str], message: str, fix: str) -> Finding:
    return Finding(code, _where(names), message, fix, tuple(names) if len(names) > 1 else ())


# ------------------------------------------------------------------------------------------ target_parameters


def _unmatched_parameters(cfg, base: BaseModel) -> list[Finding]:
    names = list(base.parameters)
    return [
        Finding("parameter-unmatched", f"target_parameters[{entry!r}]",
                f"{entry!r} is neither a parameter name of {base.source} nor a '.'-suffix of one ({len(names)} "
                "parameters, 2-D weights and 3-D experts): PEFT adapts nothing for it",
                f"did you mean {' or '.join(repr(n) for n in nearest_names(entry, names, n=2))}?"
                if nearest_names(entry, names, n=2) else "check the parameter names (the model's named_parameters)")
        for entry in cfg.target_parameters or []
        if not any(n == entry or n.endswith("." + entry) for n in names)
    ]


def _refused(subject: Subject, view: PeftView) -> list[Finding]:
    """``parameter-refused`` for each setting PEFT's ParamWrapper raises on, when any parameter is wrapped."""
    cfg = subject.config
    if not view.parameters:
        return []
    settings = {"lora_dropout": cfg.lora_dropout, "lora_bias": cfg.lora_bias, "use_dora": cfg.use_dora,
                "fan_in_fan_out": _fan_in_fan_out(subject, view)}
    params = list(view.parameters)
    moved = sorted(view.converted.moved)
    how = (f"; PEFT's MoE conversion moved target_modules {moved} there ({PEFT_MOE_SOURCE})" if moved else "")
    return [
        Finding("parameter-refused", name,
                f"{name}={value!r} with target_parameters: PEFT's ParamWrapper raises 'does not work with {name}' "
                f"when it wraps {len(params)} parameter(s) ({_short(params)}){how}", _REFUSED_FIX[name], tuple(params))
        for name, value in settings.items() if value
    ]


def _fan_in_fan_out(subject: Subject, view: PeftView) -> bool:
    """The ``fan_in_fan_out`` PEFT's ParamWrappers see: PEFT wraps modules first and sets the config's flag to
    False at each ``nn.Linear`` (True at each GPT-2 ``Conv1D``), so the last such target decides."""
    value = bool(subject.config.fan_in_fan_out)
    if not value:
        return False
    base = subject.base
    real = {n: info for n, info in base.modules.items() if n not in base.experts}
    try:
        selected, _ = match_modules(without_parameters(view.converted.config), real, base.output_layers)
    except LorasurgError:
        return value
    for name in selected:
        if real[name].kind == "linear":
            value = real[name].fan_in_fan_out
    return value


def _parameter_shapes(subject: Subject, view: PeftView) -> list[Finding]:
    """``lora_A (r E, in)``, ``lora_B (out, r E)`` for each saved target_parameters LoRA."""
    cfg, found = view.converted.config, []
    for path, parameter in view.paths.items():
        mod = subject.adapter.modules.get(path)
        if mod is None or mod.A.dim() != 2 or mod.B.dim() != 2:
            continue
        info = view.parameters[parameter]
        r, _ = rank_alpha(cfg, parameter)
        given = "PEFT's MoE conversion gives" if r != rank_alpha(subject.config, parameter)[0] else "the config gives"
        experts, rows = info.experts, int(mod.A.shape[0])
        what = f"{parameter} ({experts} expert(s), in {info.in_features}, out {info.out_features})"
        if mod.A.shape[1] != info.in_features or mod.B.shape[0] != info.out_features:
            found.append(Finding(
                "shape-mismatch", path,
                f"lora_A is {tuple(mod.A.shape)} and lora_B {tuple(mod.B.shape)}, but the LoRA of {what} needs "
                f"(r*{experts}, {info.in_features}) and ({info.out_features}, r*{experts}) (PEFT's ParamWrapper "
                "layout)", "PEFT refuses to load it: validate against the base model the adapter was trained on"))
        elif rows != r * experts and rows == mod.B.shape[1]:
            per = f"{rows // experts} per expert" if rows % experts == 0 else "not a multiple of the experts"
            fix = (f"set rank_pattern {{{anchored_pattern_key(parameter)!r}: {rows // experts}}} (the parameter's "
                   "name: PEFT looks a ParamWrapper's rank up by it), with alpha_pattern to keep the scale"
                   if rows % experts == 0 else "save the adapter again: the factors belong to another model")
            found.append(Finding(
                "rank-mismatch", path,
                f"lora_A has {rows} rows ({per}), but {given} {parameter} r={r}, so PEFT builds "
                f"{r}*{experts} = {r * experts} rows for {what} and refuses the sizes", fix))
    return found


# ------------------------------------------------------------------------------------------ per-expert LoRAs


def _per_expert(subject: Subject, view: PeftView) -> list[Finding]:
    base, adapter = subject.base, subject.adapter
    present = [m for m in adapter.modules if m in base.experts]
    if not present:
        return []
    if not peft_converts_experts(base.model_type):
        unlisted = [m for m in present if base.experts[m].parameter not in view.parameters]
        if unlisted:  # PEFT converts the keys, not the config: only a config in the converted form loads them
            return [_finding(
                "expert-unconverted", unlisted,
                f"{len(unlisted)} per-expert LoRA module(s) ({_short(unlisted)}), but PEFT 0.21.2 converts the "
                f"config of per-expert adapters to the fused experts of transformers 5 only for some model types, "
                f"not {base.model_type!r}, and this config does not list their fused parameters "
                f"({_short(sorted({base.experts[m].parameter for m in unlisted}))}) in target_parameters: the model "
                "has no module by these names, and PEFT loads the adapter without them, silently",
                "list each fused parameter in target_parameters with rank_pattern/alpha_pattern entries of "
                "parts x r and parts x lora_alpha (the form PEFT's conversion gives: gate_up_proj 2r, 2 alpha), or "
                "write the experts as target_parameters LoRA (lorasurg extract does either, by --for)")]
    found = [
        Finding("expert-fused-part", "target_modules",
                f"target_modules names {list(got)} but not {list(missing)}, which transformers fuses with it into "
                f"{leaf}: PEFT raises 'Cannot convert PEFT target(s) {', '.join(got)} without also targeting "
                f"{', '.join(missing)}'", f"target {', '.join(missing)} too (with zero factors where there is no delta)")
        for leaf, (got, missing) in view.converted.partial.items()
    ]
    groups: dict[str, dict[int, dict[int, str]]] = {}  # parameter -> part -> expert -> module
    for module, slot in base.experts.items():
        groups.setdefault(slot.parameter, {}).setdefault(slot.part, {})[slot.expert] = module
    adapted = sorted({base.experts[m].parameter for m in present})
    for parameter in adapted:
        found += _expert_group(subject, view, parameter, groups[parameter])
    empty = [p for p in view.parameters if p in groups and p not in adapted]
    if empty:
        found.append(_finding(
            "expert-layer-missing", empty,
            f"PEFT's conversion adapts the experts of every layer ({len(empty)} fused parameter(s) without any "
            f"expert LoRA here: {_short(empty)}): it reports their keys missing and gives them a zero delta",
            "nothing changes what the adapter does; to load without the warning, give those experts zero factors"))
    return found


def _expert_group(subject: Subject, view: PeftView, parameter: str, parts: dict[int, dict[int, str]]) -> list[Finding]:
    """``expert-missing``, ``expert-rank``, ``expert-scale`` for the experts of one fused parameter."""
    adapter, cfg = subject.adapter.modules, subject.config
    members = [parts[p][e] for p in sorted(parts) for e in sorted(parts[p])]
    missing = [m for m in members if m not in adapter]
    if missing:
        return [_finding(
            "expert-missing", missing,
            f"{len(missing)} of the {len(members)} expert matrices fused into {parameter} have no LoRA "
            f"({_short(missing)}), while others do: PEFT's conversion stacks every expert of the layer and fails "
            "(a size mismatch)", "give the missing experts zero factors at the same rank (lorasurg extract does)")]
    found, stacked = [], 0
    for part in sorted(parts):
        ranks = {m: adapter[m].rank for m in parts[part].values()}
        common, _ = Counter(ranks.values()).most_common(1)[0]
        odd = [m for m, r in ranks.items() if r != common]
        if odd:
            found.append(_finding(
                "expert-rank", odd,
                f"the experts of {parameter} have ranks {sorted(set(ranks.values()))} ({_short(odd)} differ from "
                f"{common}): PEFT's conversion stacks them into one tensor and fails",
                f"give every expert one rank: lorasurg rerank --r {max(ranks.values())} zero-pads them (lossless)"))
        stacked += common
    if found:
        return found
    r_peft, alpha_peft = rank_alpha(view.converted.config, parameter)
    if stacked != r_peft:
        return [_finding(
            "expert-rank", members,
            f"the experts of {parameter} stack to rank {stacked}, but PEFT builds its LoRA at rank {r_peft} (the "
            f"config's r={cfg.r}" + (f", times {len(parts)} for the fused parts" if len(parts) > 1 else "")
            + "; per-expert rank_pattern entries are not read) and refuses the sizes",
            "give the experts the config's r (rank_pattern cannot change it): lorasurg rerank --r N pads or cuts "
            "every module to N")]
    scale = lora_scale(r_peft, alpha_peft, cfg.use_rslora)
    off = [m for m in members if not math.isclose(lora_scale(*rank_alpha(cfg, m), cfg.use_rslora), scale,
                                                  rel_tol=1e-9)]
    if off:
        given = lora_scale(*rank_alpha(cfg, off[0]), cfg.use_rslora)
        why = ("rsLoRA's alpha/sqrt(r) with the doubled r and alpha PEFT gives the fused gate_up_proj"
               if cfg.use_rslora and len(parts) > 1 else "per-expert alpha_pattern / rank_pattern entries are not read")
        found.append(_finding(
            "expert-scale", off,
            f"PEFT's conversion reads {parameter} at scale {scale:.6g} (lora_alpha={alpha_peft:g}, r={r_peft}), but the "
            f"adapter gives {_short(off)} scale {given:.6g} ({why}): their delta is silently {scale / given:.4g}x",
            "fold each expert's scale into its lora_B and use the config's lora_alpha for every expert"))
    return found


def _dense_converted(subject: Subject, view: PeftView) -> list[Finding]:
    """Linear layers the original target_modules selects and PEFT's converted config no longer does."""
    moved = view.converted.moved
    if not moved:
        return []
    base = subject.base
    real = {n: info for n, info in base.modules.items() if n not in base.experts}
    try:
        before = set(subject.selection() or ())
        after, _ = match_modules(without_parameters(view.converted.config), real, base.output_layers) \
            if view.converted.config.target_modules else ([], [])
    except LorasurgError:
        return []
    lost = [m for m in sorted(subject.adapter.modules)
            if m not in base.experts and view.name(m) in before and view.name(m) not in after
            and f"{view.name(m)}.weight" not in view.parameters]
    if not lost:
        return []
    return [_finding(
        "dense-converted", lost,
        f"PEFT's MoE conversion on {base.model_type} moves target_modules {sorted(moved)} to the experts' fused "
        f"parameters ({sorted(set(moved.values()))}); {len(lost)} linear layer(s) those entries also selected "
        f"({_short(lost)}) are then not adapted: PEFT loads their LoRA keys as unexpected and ignores them silently "
        f"({PEFT_MOE_SOURCE})",
        "list them in target_parameters as '<module>.weight' (PEFT adapts the weight as the linear layer; their "
        "rank_pattern/alpha_pattern keys must then name the parameter, '^<module>\\.weight'): lorasurg validate --fix "
        "does")]
