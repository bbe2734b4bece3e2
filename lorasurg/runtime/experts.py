"""Adapters with per-expert module keys, loaded on transformers-5 MoE models whose experts are fused parameters.

Adapters for Qwen3-MoE, Mixtral, DeepSeek and the like were written against transformers 4, where every expert is
a set of ``nn.Linear`` layers: ``model.layers.0.mlp.experts.3.gate_proj.lora_A.weight`` (Mixtral:
``block_sparse_moe.experts.3.w1``), config ``target_modules`` gate_proj/up_proj/down_proj. transformers 5 builds one
``mlp.experts`` module with fused parameters ``gate_up_proj (E, 2I, H)`` and ``down_proj (E, H, I)``; its own
loading rules (``transformers.conversion_mapping``: renamings, then a converter per fused parameter that stacks
the experts, ``MergeModulelist``, and concatenates gate and up, ``Concatenate(dim=1)``) say which checkpoint keys
become which parameter. :func:`fuse_expert_modules` applies those same rules to the adapter's module names, as PEFT
0.21.2 does (``peft/utils/transformers_weight_conversion.py``), and writes the LoRA on the fused parameters:

    down_proj:     A = [A_0; ...; A_{E-1}] (E*r, I), B column k*E + e = column k of B_e    (stack_experts)
    gate_up_proj:  per expert A_e = [A_gate; A_up] (2r, H), B_e = blockdiag(B_gate, B_up)  (concat_outputs),
                   then stacked as above; rank 2r, lora_alpha 2*alpha (the scale unchanged)

(:mod:`lorasurg.engine.param_factors`; copies only, so the tensors equal PEFT's bit for bit). The config becomes
PEFT's: ``target_parameters`` gains the fused leaf names (``gate_up_proj``, ``down_proj``; a router that became a
module with a bare ``weight`` gets ``gate.weight``), ``target_modules`` loses the entries that only named converted
modules, and ``rank_pattern``/``alpha_pattern`` gain ``.*\\.gate_up_proj`` where the fused rank differs from ``r``.
Modules renamed by the same rules (Mixtral's ``block_sparse_moe`` is ``mlp``) keep their LoRA under the new name.

Refused, each naming the layer and experts, where PEFT fails too: an expert missing from a fused parameter, a
projection missing (gate without up), experts of one parameter with different ranks or scales, and what LoRA on a
parameter cannot carry (dropout, DoRA, ``lora_bias``). Where PEFT 0.21.2 differs on purpose: rsLoRA keeps the scale
(``alpha_pattern`` ``sqrt(2) * alpha``; PEFT doubles alpha, so its gate_up delta is ``sqrt(2)`` too large); the
LoRA of modules that still exist as layers (a shared expert, the dense MLP of a dense layer) is kept, and a model
type absent from PEFT's own table (Qwen2-MoE) is converted by transformers' rules (PEFT drops those tensors).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from torch import nn

from .. import targeting
from ..engine.factors import lora_scale
from ..engine.param_factors import concat_outputs, param_layout, stack_experts
from ..errors import InputError, UnsupportedError
from ..io.adapter import AdapterModule
from .param_plan import parameter_config_problems, parameter_wrappers
from .walk import describe_unwrapped, unwrapped

__all__ = ["fuse_expert_modules"]


@dataclass
class _Fused:
    """The adapter modules one fused parameter is made of: ``sources[i][expert] = adapter module name``."""

    key: str  # the parameter, "<module>.<parameter>" in the model
    patterns: tuple[str, ...]  # the converter's source patterns, in concatenation order
    sources: dict[int, dict[int, str]] = field(default_factory=dict)


def _rules(model: nn.Module) -> Optional[tuple[list, list]]:
    """transformers' ``(renamings, converters)`` for this model, or None (not a transformers model, or no rules)."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # transformers < 5: models keep per-expert layers
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return (renamings, converters) if converters or renamings else None


def _stacks_outputs(converter: Any) -> bool:
    """True for ``[MergeModulelist(0)]`` (experts stacked) and ``[MergeModulelist(0), Concatenate(1)]`` (then
    sources concatenated along outputs): the fusions whose LoRA is exact in the fused layout."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(converter.operations)
    if not ops or not isinstance(ops[0], MergeModulelist) or ops[0].dim != 0:
        return False
    return len(ops) == 1 or (len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim == 1)


def _place(name: str, rules: tuple[list, list]) -> tuple[str, str, Optional[Any], Optional[str]]:
    """Where transformers puts ``<name>.weight``: ``(key after the renamings, final key, the converter that fuses
    it or None, its matched pattern)``."""
    from transformers.core_model_loading import apply_renamings

    renamings, converters = rules
    key = apply_renamings(f"{name}.weight", renamings)
    for converter in converters:
        target, pattern = converter.rename_source_key(key)
        if pattern is not None:
            return key, target, converter, pattern
    return key, key, None, None


def _expert_index(key: str, pattern: str) -> Optional[int]:
    """The expert number that the ``*`` of a converter pattern stands for in ``key``."""
    found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
    return int(found.group(1)) if found else None


def _bare_weight(model: nn.Module, module: str) -> bool:
    """Whether ``module`` (unwrapped name) holds a 2-D ``weight`` parameter, e.g. a transformers-5 MoE router."""
    try:
        holder = unwrapped(model.get_submodule(module))
    except AttributeError:
        return False
    weight = holder._parameters.get("weight")
    return weight is not None and weight.dim() == 2


def _fuse_one(adapter: Any, fused: _Fused, model: nn.Module, source: str) -> tuple[tuple[Any, Any], int, float]:
    """``((A, B), r, alpha)`` of one fused parameter, after PEFT's conditions (raises InputError): the ranks of its
    sources add up, and alpha follows so that the scale stays the sources' one."""
    module, _, pname = fused.key.rpartition(".")
    holder = unwrapped(model.get_submodule(module))
    layout = param_layout(tuple(holder._parameters[pname].shape), bool(getattr(holder, "is_transposed", False)))
    shown = [p.removesuffix(".weight") for p in fused.patterns]
    where = f"{source}: {fused.key} (shape {layout.shape}) fuses {' and '.join(shown)} of {layout.experts} experts"
    present = [p for i, p in enumerate(shown) if i in fused.sources]
    absent = [p for i, p in enumerate(shown) if i not in fused.sources]
    if absent:
        raise InputError(f"{where}, but the adapter has LoRA for {', '.join(present)} only, not {', '.join(absent)}; "
                         "every one of them needs LoRA to be fused (PEFT refuses it too)")
    use_rslora = bool(getattr(adapter.config, "use_rslora", False))
    ranks: dict[int, int] = {}
    scales: dict[str, float] = {}
    for i, experts in sorted(fused.sources.items()):
        missing = sorted(set(range(layout.experts)) - set(experts))
        if missing or len(experts) != layout.experts:
            raise InputError(f"{where}, but the adapter has no LoRA for expert(s) {missing} of {shown[i]}; "
                             "every expert must be present to fuse them (an unchanged expert needs zero factors)")
        expert_ranks = {e: adapter.modules[n].rank for e, n in sorted(experts.items())}
        if len(set(expert_ranks.values())) != 1:
            raise InputError(f"{where}, but the experts of {shown[i]} have different ranks {expert_ranks}; "
                             "fusing needs one rank for all experts of a projection (PEFT fails on it too)")
        ranks[i] = next(iter(expert_ranks.values()))
        scales.update({n: lora_scale(*adapter.rank_alpha(n), use_rslora) for n in experts.values()})
    first = next(iter(scales.values()))
    if not all(math.isclose(v, first) for v in scales.values()):
        raise InputError(f"{where}, but its experts have different LoRA scales {sorted(set(scales.values()))} "
                         "(rank_pattern / alpha_pattern); fusing needs one scale for them all")
    if layout.transposed:
        raise UnsupportedError(f"{where} in an (experts, in, out) layout; lorasurg fuses expert LoRA into "
                               "(experts, out, in) parameters only")
    per_expert = []
    for e in range(layout.experts):
        mods = [adapter.modules[fused.sources[i][e]] for i in sorted(fused.sources)]
        per_expert.append(concat_outputs([m.A for m in mods], [m.B for m in mods]))  # (sum r, in), (sum out, sum r)
    A, B = stack_experts([a for a, _ in per_expert], [b for _, b in per_expert])
    r0, alpha0 = adapter.rank_alpha(fused.sources[0][0])
    r = sum(ranks.values())
    growth = r / r0
    return (A, B), r, _number(alpha0 * (math.sqrt(growth) if use_rslora else growth))  # scale alpha / r kept


def _number(x: float) -> float:
    """An integral alpha as an int (PEFT's configs hold ints), any other as it is."""
    return int(x) if float(x).is_integer() else x


def _gives(config: Any, key: str, r: int, alpha: float) -> bool:
    """Whether the config's rank/alpha patterns give the parameter ``key`` rank ``r`` and ``alpha``."""
    got_r, got_alpha = targeting.rank_alpha(config, key)
    return got_r == r and math.isclose(got_alpha, alpha)


def _patterns(config: Any, wanted: dict[str, tuple[int, float]]) -> tuple[dict, dict]:
    """``(rank_pattern, alpha_pattern)`` that give each parameter key its ``(r, alpha)``: PEFT's ``.*\.<leaf>`` key
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


def fuse_expert_modules(adapter: Any, model: nn.Module, source: str = "adapter") -> Any:
    """``adapter`` converted for ``model`` when transformers' loading rules move some of its modules into fused
    parameters (see the module docstring); ``adapter`` itself when nothing needs converting.

    Raises:
        InputError: a fused parameter cannot be built from the adapter (an expert or projection missing, ranks or
            scales differing between experts).
        UnsupportedError: the adapter would need LoRA on parameters with what that cannot carry (dropout, DoRA,
            lora_bias), or transformers fuses the experts in a way lorasurg cannot mirror.
    """
    infos = describe_unwrapped(model)
    on_parameters = set(parameter_wrappers(model, adapter.config).values())  # already in target_parameters form
    misplaced = [n for n in adapter.modules if (n not in infos or infos[n].kind is None) and n not in on_parameters]
    rules = _rules(model) if misplaced else None
    if rules is None:
        return adapter
    fused: dict[str, _Fused] = {}
    renamed: dict[str, str] = {}  # adapter module -> its module in the model
    routers: dict[str, str] = {}  # adapter module -> module whose bare "weight" carries its LoRA
    for name in misplaced:
        renamed_key, key, converter, pattern = _place(name, rules)
        if converter is not None:
            if not _stacks_outputs(converter):
                raise UnsupportedError(f"{source}: transformers builds {key} from {list(converter.source_patterns)} with "
                                       f"{list(converter.operations)}; lorasurg cannot fuse LoRA through that")
            group = fused.setdefault(key, _Fused(key, tuple(converter.source_patterns)))
            expert = _expert_index(renamed_key, pattern)
            if expert is None:
                raise UnsupportedError(f"{source}: cannot read the expert number of {name} from pattern {pattern!r}")
            group.sources.setdefault(group.patterns.index(pattern), {})[expert] = name
            continue
        module = key.removesuffix(".weight")
        if module in infos and infos[module].kind is not None:
            renamed[name] = module
        elif module in infos and _bare_weight(model, module) and adapter.modules[name].A.dim() == 2:
            routers[name] = module
    if not (fused or renamed or routers):
        return adapter
    problems = parameter_config_problems(adapter.config) if fused or routers else []
    if problems:
        raise UnsupportedError(
            f"{source} has per-expert LoRA for this transformers-5 model's fused experts; loading it means LoRA on the "
            f"fused parameters (target_parameters, as PEFT does), which does not work with {'; '.join(problems)}")
    return _converted(adapter, model, fused, renamed, routers, source)


def _kept_targets(config: Any, infos: dict, remaining: list[str], converted: set[str]) -> Any:
    """``target_modules`` without the entries that only named converted modules (a regex or ``"all-linear"``
    becomes the exact names of the remaining modules), so that it selects every module LoRA that stays."""
    targets = config.target_modules
    if isinstance(targets, str):
        return targeting.exact_target_modules(remaining, list(infos)) if remaining else set()
    kept = {e for e in targets or () if not (any(targeting.matches_entry(e, n) for n in converted)
                                             and not any(targeting.matches_entry(e, n) for n in remaining))}
    probe = copy.copy(config)
    probe.target_modules, probe.target_parameters = kept, None
    selected = set(targeting.match_modules(probe, infos)[0]) if kept else set()
    return kept | {n for n in remaining if n not in selected}


def _converted(adapter: Any, model: nn.Module, fused: dict[str, _Fused], renamed: dict[str, str],
               routers: dict[str, str], source: str) -> Any:
    """The adapter with the fused parameters' and routers' LoRA in PEFT's target_parameters form."""
    infos = describe_unwrapped(model)
    for key in fused:
        module, _, pname = key.rpartition(".")
        if module not in infos or pname not in unwrapped(model.get_submodule(module))._parameters:
            raise InputError(f"{source}: transformers' rules for this model put its per-expert LoRA into {key}, "
                             f"which this {type(model).__name__} does not have; load it into the model it was made for")
    converted = {n for f in fused.values() for experts in f.sources.values() for n in experts.values()} | set(routers)
    modules = {}
    for name, m in adapter.modules.items():
        if name not in converted:
            modules[renamed.get(name, name)] = replace(m, name=renamed.get(name, name))
    tensors, wanted = {}, {}
    for key, f in fused.items():
        tensors[key], r, alpha = _fuse_one(adapter, f, model, source)
        wanted[key] = (r, alpha)
    for old, module in routers.items():
        tensors[f"{module}.weight"] = (adapter.modules[old].A, adapter.modules[old].B)
        wanted[f"{module}.weight"] = adapter.rank_alpha(old)
    config = copy.deepcopy(adapter.config)
    leaves = {k.rpartition(".")[2] for k in fused} | {f"{m.rpartition('.')[2]}.weight" for m in routers.values()}
    config.target_parameters = sorted(set(config.target_parameters or ()) | leaves)
    config.target_modules = _kept_targets(config, infos, list(modules), converted)
    config.rank_pattern, config.alpha_pattern = _patterns(config, wanted)
    wrappers = parameter_wrappers(model, config)
    for key, (A, B) in tensors.items():
        modules[wrappers[key]] = AdapterModule(wrappers[key], A, B)
    return replace(adapter, config=config, modules=modules)
