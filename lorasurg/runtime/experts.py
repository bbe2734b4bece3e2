"""Adapters with per-expert module keys, loaded on transformers-5 MoE models whose experts are fused parameters.

Adapters for Qwen3-MoE, Mixtral, DeepSeek and the like were written against transformers 4, where every expert is
a set of ``nn.Linear`` layers: ``model.layers.0.mlp.experts.3.gate_proj.lora_A.weight`` (Mixtral:
``block_sparse_moe.experts.3.w1``), config ``target_modules`` gate_proj/up_proj/down_proj. transformers 5 builds one
``mlp.experts`` module with fused parameters ``gate_up_proj (E, 2I, H)`` and ``down_proj (E, H, I)``.
:func:`fuse_expert_modules` places the adapter's module names among the model's parameters by transformers' own
loading rules (:func:`lorasurg.io.keymap.build_keymap` on the module's ``<name>.weight``, for a twin of the model on
the meta device), as PEFT 0.21.2 does (``peft/utils/transformers_weight_conversion.py``), and writes the LoRA of
each fused parameter in PEFT's ``target_parameters`` layout (:mod:`lorasurg.engine.experts`):

    down_proj:     experts stacked, ``lora_A (E r, I)`` expert-major, ``lora_B (H, r E)`` rank-major
    gate_up_proj:  per expert ``A_e = [A_gate; A_up] (2r, H)``, ``B_e = blockdiag(B_gate, B_up) (2I, 2r)``, then
                   stacked the same way: rank 2r, lora_alpha 2*alpha (the scale unchanged)

(copies only, so the tensors equal PEFT's bit for bit). The config becomes PEFT's: ``target_parameters`` gains the
fused leaf names (``gate_up_proj``, ``down_proj``; a router that became a module with a bare ``weight`` gets
``gate.weight``), ``target_modules`` loses the entries that only named converted modules, and
``rank_pattern``/``alpha_pattern`` gain ``.*\\.gate_up_proj`` where the fused rank differs from ``r``. Modules the
same rules rename (a VLM's ``model.layers`` is ``model.language_model.layers``) keep their LoRA under the new name.

Refused, with transformers' placement and PEFT's conditions (PEFT fails on each too): an expert or a projection
missing from a fused parameter (gate without up), experts of one parameter with different ranks or scales, and what
LoRA on a parameter cannot carry (dropout, DoRA, ``lora_bias``). Where PEFT 0.21.2 differs, on purpose: rsLoRA keeps
the scale (``alpha_pattern`` ``sqrt(2) * alpha``; PEFT doubles alpha, so its gate_up delta is ``sqrt(2)`` too
large); the LoRA of modules that still exist as layers (a shared expert, the MLP of a dense layer) is kept; and a
model type missing from PEFT's own table (Qwen2-MoE, :mod:`lorasurg.consumers.experts`) is converted too (PEFT
drops those tensors).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import replace
from typing import Any, Optional

import torch
from torch import nn

from .. import targeting
from ..engine.experts import join_experts, stack_parts
from ..engine.factors import lora_scale
from ..errors import InputError, UnsupportedError
from ..io.adapter import AdapterModule
from ..io.architecture import meta_model
from ..io.keymap import ExpertSlot, build_keymap
from .param_plan import parameter_config_problems, parameter_wrappers
from .walk import describe_unwrapped, unwrapped

__all__ = ["fuse_expert_modules"]


def _meta_twin(model: nn.Module) -> Optional[nn.Module]:
    """The model's architecture on the meta device, unwrapped (its names are the bare model's), or None when it is
    not a transformers model."""
    config = getattr(model, "config", None)
    if not hasattr(config, "to_dict") or not getattr(config, "model_type", None):
        return None
    return meta_model({**config.to_dict(), "architectures": [type(model).__name__]})


def _bare_weight(model: nn.Module, module: str) -> bool:
    """Whether ``module`` (unwrapped name) holds a 2-D ``weight`` parameter, e.g. a transformers-5 MoE router."""
    weight = unwrapped(model.get_submodule(module))._parameters.get("weight")
    return weight is not None and weight.dim() == 2


def _fuse(adapter: Any, parameter: str, slots: list[tuple[str, ExpertSlot]], source: str) -> tuple[Any, int, float]:
    """``((lora_A, lora_B), r, alpha)`` of one fused parameter from its experts' modules (all present: the keymap
    checked), after PEFT's conditions: one rank per projection, one scale for all; the ranks of the projections add
    up, and alpha follows so that the scale stays theirs."""
    parts: dict[int, dict[int, str]] = {}
    for key, slot in slots:
        parts.setdefault(slot.part, {})[slot.expert] = key.removesuffix(".weight")
    use_rslora = bool(getattr(adapter.config, "use_rslora", False))
    where = f"{source}: {parameter} fuses {len(parts)} projection(s) of {len(parts[0])} experts"
    scales = {}
    for part, experts in sorted(parts.items()):
        ranks = {e: adapter.modules[name].rank for e, name in sorted(experts.items())}
        if len(set(ranks.values())) != 1:
            raise InputError(f"{where}, but the experts of {experts[0]} and its siblings have different ranks "
                             f"{ranks}; fusing needs one rank for all experts of a projection (PEFT fails on it too)")
        scales.update({name: lora_scale(*adapter.rank_alpha(name), use_rslora) for name in experts.values()})
    first = next(iter(scales.values()))
    if not all(math.isclose(s, first) for s in scales.values()):
        raise InputError(f"{where}, but its experts have different LoRA scales {sorted(set(scales.values()))} "
                         "(rank_pattern / alpha_pattern); fusing needs one scale for them all")
    stacked = []
    for _, experts in sorted(parts.items()):
        mods = [adapter.modules[experts[e]] for e in range(len(experts))]
        stacked.append((torch.stack([m.A for m in mods]), torch.stack([m.B for m in mods])))  # (E, r, in), (E, out, r)
    A, B = stack_parts(stacked)  # (E, sum r, in), (E, sum out, sum r): block-diagonal per expert
    r0, alpha0 = adapter.rank_alpha(parts[0][0])
    growth = A.shape[1] / r0
    alpha = targeting.alpha_value(alpha0 * (math.sqrt(growth) if use_rslora else growth))  # alpha / r (/ sqrt r) kept
    return join_experts(A, B), int(A.shape[1]), alpha


def _gives(config: Any, key: str, r: int, alpha: float) -> bool:
    """Whether the config's rank/alpha patterns give the parameter ``key`` rank ``r`` and ``alpha``."""
    got_r, got_alpha = targeting.rank_alpha(config, key)
    return got_r == r and math.isclose(got_alpha, alpha)


def _patterns(config: Any, wanted: dict[str, tuple[int, float]]) -> tuple[dict, dict]:
    """``(rank_pattern, alpha_pattern)`` that give each parameter key its ``(r, alpha)``: PEFT's ``.*\\.<leaf>`` key
    (appended) for a leaf name whose parameters all want the same, else anchored keys (first, so they win)."""
    probe = copy.copy(config)
    probe.rank_pattern, probe.alpha_pattern = dict(config.rank_pattern or {}), dict(config.alpha_pattern or {})
    by_leaf: dict[str, set] = {}
    for key, value in wanted.items():
        by_leaf.setdefault(key.rpartition(".")[2], set()).add(value)
    for leaf, values in by_leaf.items():
        keys = [k for k in wanted if k.rpartition(".")[2] == leaf]
        if len(values) == 1 and not all(_gives(config, k, *wanted[k]) for k in keys):
            r, alpha = next(iter(values))
            probe.rank_pattern[rf".*\.{re.escape(leaf)}"], probe.alpha_pattern[rf".*\.{re.escape(leaf)}"] = r, alpha
    anchored = {targeting.anchored_pattern_key(k): v for k, v in wanted.items() if not _gives(probe, k, *v)}
    return ({**{k: r for k, (r, _) in anchored.items()}, **probe.rank_pattern},
            {**{k: a for k, (_, a) in anchored.items()}, **probe.alpha_pattern})


def _kept_targets(config: Any, infos: dict, remaining: list[str], converted: set[str]) -> Any:
    """``target_modules`` without the entries that only named converted modules (a regex or ``"all-linear"``
    becomes the exact names of the remaining modules), so that it selects every module LoRA that stays."""
    targets = config.target_modules
    if isinstance(targets, str):
        return targeting.exact_target_modules(remaining, list(infos)) if remaining else set()
    kept = {e for e in targets or () if not (any(targeting.matches_entry(e, n) for n in converted)
                                             and not any(targeting.matches_entry(e, n) for n in remaining))}
    probe = targeting.without_parameters(config)
    probe = replace(probe, target_modules=kept) if kept else probe
    selected = set(targeting.match_modules(probe, infos)[0]) if kept else set()
    return kept | {n for n in remaining if n not in selected}


def fuse_expert_modules(adapter: Any, model: nn.Module, source: str = "adapter") -> Any:
    """``adapter`` converted for ``model`` when transformers' loading rules move some of its modules into fused
    parameters or rename them (see the module docstring); ``adapter`` itself when nothing needs converting.

    Raises:
        InputError: some of the adapter's modules convert, and others have no place in the model (an expert or a
            projection missing from a fused parameter, ...), or the experts of a fused parameter differ in rank or
            scale; every problem is named.
        UnsupportedError: the adapter would need LoRA on parameters with what that cannot carry (dropout, DoRA,
            lora_bias).
    """
    infos = describe_unwrapped(model)
    on_parameters = set(parameter_wrappers(model, adapter.config).values())  # already in target_parameters form
    misplaced = {f"{n}.weight": n for n in adapter.modules
                 if (n not in infos or infos[n].kind is None) and n not in on_parameters}
    twin = _meta_twin(model) if misplaced else None
    if twin is None:
        return adapter
    shapes = {key: (adapter.modules[n].B.shape[0], adapter.modules[n].A.shape[1]) for key, n in misplaced.items()}
    keymap = build_keymap(twin, shapes)  # the (out, in) matrix each LoRA is for
    renamed, routers = {}, {}  # adapter module -> module in the model (LoRA on it, or on its bare "weight")
    for key, target in keymap.renamed.items():
        name, module = misplaced[key], target.removesuffix(".weight")
        if module in infos and infos[module].kind is not None and module != name:
            renamed[name] = module
        elif module in infos and infos[module].kind is None and _bare_weight(model, module):
            routers[name] = module
    fused = {p: keymap.slots_of(p) for p in keymap.fused}
    if not (fused or renamed or routers):
        return adapter
    if keymap.unplaced:
        by_reason: dict[str, list[str]] = {}
        for key, why in keymap.unplaced.items():
            by_reason.setdefault(why, []).append(misplaced[key])
        listing = "\n  ".join(f"{why} ({len(names)} module(s), e.g. {names[0]})" for why, names in by_reason.items())
        raise InputError(
            f"{source} is laid out for transformers 4; by transformers' own loading rules its LoRA moves into this "
            f"{type(model).__name__}'s fused expert parameters, but {len(keymap.unplaced)} of its modules have no "
            f"place there:\n  {listing}\nEvery expert of a fused parameter needs LoRA (an unchanged expert: zero "
            "factors), and so does every projection it fuses (part 0: gate_proj / w1, part 1: up_proj / w3); PEFT "
            "fails on these too")
    problems = parameter_config_problems(adapter.config) if fused or routers else []
    if problems:
        raise UnsupportedError(
            f"{source} has per-expert LoRA for this transformers-5 model's fused experts; loading it means LoRA on the "
            f"fused parameters (target_parameters, as PEFT does), which does not work with {'; '.join(problems)}")
    return _converted(adapter, model, infos, fused, renamed, routers, on_parameters, source)


def _converted(adapter: Any, model: nn.Module, infos: dict, fused: dict, renamed: dict[str, str],
               routers: dict[str, str], on_parameters: set[str], source: str) -> Any:
    """The adapter with the fused parameters' and routers' LoRA in PEFT's target_parameters form."""
    converted = {key.removesuffix(".weight") for slots in fused.values() for key, _ in slots} | set(routers)
    modules = {}
    for name, m in adapter.modules.items():
        if name not in converted:
            modules[renamed.get(name, name)] = replace(m, name=renamed.get(name, name))
    tensors, wanted = {}, {}
    for parameter, slots in fused.items():
        tensors[parameter], r, alpha = _fuse(adapter, parameter, slots, source)
        wanted[parameter] = (r, alpha)
    for old, module in routers.items():
        tensors[f"{module}.weight"] = (adapter.modules[old].A, adapter.modules[old].B)
        wanted[f"{module}.weight"] = adapter.rank_alpha(old)
    config = copy.deepcopy(adapter.config)
    leaves = {p.rpartition(".")[2] for p in fused} | {f"{m.rpartition('.')[2]}.weight" for m in routers.values()}
    config.target_parameters = sorted(set(config.target_parameters or ()) | leaves)
    config.target_modules = _kept_targets(config, infos, [n for n in modules if n not in on_parameters], converted)
    config.rank_pattern, config.alpha_pattern = _patterns(config, wanted)
    wrappers = parameter_wrappers(model, config)
    for key, (A, B) in tensors.items():
        modules[wrappers[key]] = AdapterModule(wrappers[key], A, B)
    return replace(adapter, config=config, modules=modules)
