"""Which mixture-of-experts and multimodal LoRA layouts each consumer serves, as data, and how to recognise them.

Everything here works on module names (and ranks, shapes and the config) alone: no base model is needed. The
layouts (each a feature of :data:`~lorasurg.consumers.rules.FEATURES`):

========================  ===========================================================================================
``moe_per_expert``        one LoRA module per routed expert and projection, under the checkpoint's names:
                          ``model.layers.L.mlp.experts.E.gate_proj`` (Qwen-MoE, DeepSeek, ...), Mixtral's
                          ``model.layers.L.block_sparse_moe.experts.E.w1``
``moe_target_parameters`` PEFT's ``target_parameters`` on fused 3-D experts (``ParamWrapper``): module
                          ``…experts.base_layer`` holds ``gate_up_proj``'s factors, ``…experts`` ``down_proj``'s;
                          A ``(r*E, in)`` with expert-major rows, B ``(out, r*E)`` with rank-major columns
                          (``k*E + e``)
``vision_tower``          LoRA on a vision tower or connector under transformers-5 module names (``model.visual.…``,
                          ``model.vision_tower.…``, ``model.multi_modal_projector.…``)
``checkpoint_tower_names``  the same under the checkpoint's top-level names (``visual.…``, ``vision_tower.…``,
                          ``multi_modal_projector.…``), as PEFT wrote them before transformers 4.52
========================  ===========================================================================================

A layout a consumer reads comes with :data:`CONDITIONS`: what the adapter must satisfy for that consumer to read
it as PEFT's reference computes it, each with what breaking it does (``refuses``, ``drops``, ``misreads``) and the
source it was read from. :func:`layout_violations` checks them. Numbers of experts come from the adapter (one more
than the largest expert index in any layer), or from the base checkpoint's keys when a caller has them
(:func:`checkpoint_experts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from ..io.adapter import Adapter
from .experts import PARAM_WRAPPER_REFUSES, peft_converts_experts
from .layout_rules import (
    CHECKPOINT_TOWER_NAME,
    CONDITIONS,
    EXPERT_NAME,
    FUSED_NAME,
    MLP_LEAVES,
    PEFT_CONVERTED_TYPE,
    PEFT_OPTIONS,
    PROJECTIONS,
    TOWER_NAME,
    VLLM_FUSED_MOE_TYPES,
    Condition,
)
from .rules import Consumer

__all__ = [
    "PROJECTIONS",
    "EXPERT_NAME",
    "TOWER_NAME",
    "CHECKPOINT_TOWER_NAME",
    "Condition",
    "PEFT_OPTIONS",
    "PEFT_CONVERTED_TYPE",
    "CONDITIONS",
    "ExpertGroup",
    "Violation",
    "expert_name",
    "expert_groups",
    "fused_expert_modules",
    "non_expert_mlp",
    "layout_features",
    "layout_violations",
    "treatment_for",
    "VLLM_FUSED_MOE_TYPES",
    "checkpoint_experts",
]

@dataclass
class ExpertGroup:
    """The per-expert modules of one MoE layer (``block``: ``model.layers.L.mlp.experts``).

    Attributes:
        block: the layer's ``…experts`` prefix.
        modules: ``{(expert index, projection): module name}``.
    """

    block: str
    modules: dict[tuple[int, str], str]

    @property
    def indices(self) -> set[int]:
        return {i for i, _ in self.modules}

    @property
    def projections(self) -> set[str]:
        return {p for _, p in self.modules}


@dataclass(frozen=True)
class Violation:
    """A broken :class:`Condition`: which consumer, which condition, the modules (or layers) and what is wrong."""

    consumer: str
    feature: str
    condition: Condition
    where: tuple[str, ...]
    detail: str


def expert_name(name: str) -> Optional[tuple[str, int, str]]:
    """``(block, expert index, projection)`` of a per-expert module name, or None."""
    m = EXPERT_NAME.match(name)
    return (m["block"], int(m["index"]), m["proj"]) if m else None


def expert_groups(names: Iterable[str]) -> dict[str, ExpertGroup]:
    """The per-expert module names among ``names``, grouped by MoE layer, in first-seen order."""
    groups: dict[str, ExpertGroup] = {}
    for name in names:
        parsed = expert_name(name)
        if parsed is not None:
            block, index, proj = parsed
            groups.setdefault(block, ExpertGroup(block, {})).modules[(index, proj)] = name
    return groups


def fused_expert_modules(adapter: Adapter) -> dict[str, str]:
    """``{module: block}`` for the modules of PEFT's ``target_parameters`` LoRA on fused experts (needs
    ``target_parameters`` in the config): ``…experts`` and ``…experts.base_layer``."""
    if not getattr(adapter.config, "target_parameters", None):
        return {}
    found = {}
    for name in adapter.modules:
        m = FUSED_NAME.match(name)
        if m:
            found[name] = m["block"]
    return found


def non_expert_mlp(names: Iterable[str], target_parameters: Optional[Iterable[str]] = None) -> list[str]:
    """Modules named like a routed expert's projections (gate/up/down, w1/w2/w3) that are not routed experts and
    are not listed in ``target_parameters`` as ``<module>.weight``: shared experts, dense MLP layers."""
    listed = {p.removesuffix(".weight") for p in (target_parameters or ())}
    return [n for n in names if n.rsplit(".", 1)[-1] in MLP_LEAVES and expert_name(n) is None
            and not any(n == p or n.endswith("." + p) for p in listed)]


def layout_features(adapter: Adapter) -> dict[str, list[str]]:
    """``{feature: module names}`` for the four layouts of this module (empty lists left out)."""
    fused = fused_expert_modules(adapter)
    found: dict[str, list[str]] = {"moe_per_expert": [], "moe_target_parameters": [], "vision_tower": [],
                                   "checkpoint_tower_names": []}
    for name in adapter.modules:
        if name in fused:
            found["moe_target_parameters"].append(name)
        elif expert_name(name) is not None:
            found["moe_per_expert"].append(name)
        if CHECKPOINT_TOWER_NAME.match(name):
            found["checkpoint_tower_names"].append(name)
        elif TOWER_NAME.search(name):
            found["vision_tower"].append(name)
    return {f: names for f, names in found.items() if names}


def treatment_for(c: Consumer, feature: str, model_type: Optional[str] = None) -> str:
    """``c.treatment(feature)``, with vLLM's model-dependent rule on fused experts resolved when the base's
    ``model_type`` is known: ``reads`` for the types of :data:`VLLM_FUSED_MOE_TYPES`, ``refuses`` for the others."""
    treatment = c.treatment(feature)
    if treatment == "model-dependent" and feature == "moe_target_parameters" and model_type \
            and c.name.startswith("vllm"):
        return "reads" if model_type in VLLM_FUSED_MOE_TYPES else "refuses"
    return treatment


# ------------------------------------------------------------------------------------------------ conditions


def layout_violations(adapter: Adapter, consumer: str, experts: Optional[Mapping[str, int]] = None,
                      model_type: Optional[str] = None) -> list[Violation]:
    """The :data:`CONDITIONS` of ``consumer`` that ``adapter`` breaks (empty when it reads every layout as PEFT's
    reference computes it, or has none).

    Args:
        experts: ``{block: number of experts}`` from the base checkpoint (:func:`checkpoint_experts`); default one
            more than the largest expert index the adapter has in the layer, or in any layer.
        model_type: the base's ``model_type``, when known: for a type PEFT does not convert per-expert LoRA for,
            the one PEFT condition broken is ``converted-type`` (the others are about the conversion).
    """
    table = CONDITIONS.get(consumer, {})
    out: list[Violation] = []
    cfg = adapter.config
    groups = expert_groups(adapter.modules)
    if (groups and model_type and PEFT_CONVERTED_TYPE in table.get("moe_per_expert", ())
            and not cfg.target_parameters and not peft_converts_experts(model_type)):
        names = tuple(m for g in groups.values() for m in g.modules.values())
        return [Violation(consumer, "moe_per_expert", PEFT_CONVERTED_TYPE, names,
                          f"model_type {model_type!r}: {len(names)} expert module(s)")]
    fused = fused_expert_modules(adapter)
    options = [f"{k}={getattr(cfg, k)!r}" for k in PARAM_WRAPPER_REFUSES if getattr(cfg, k)]
    for feature, present in (("moe_per_expert", bool(groups)), ("moe_target_parameters", bool(fused))):
        if present and options and PEFT_OPTIONS in table.get(feature, ()):
            where = [m for g in groups.values() for m in g.modules.values()] if feature == "moe_per_expert" else fused
            out.append(Violation(consumer, feature, PEFT_OPTIONS, tuple(where), ", ".join(options)))
    if groups and "moe_per_expert" in table:
        conditions = {c.code: c for c in table["moe_per_expert"]}
        found = _expert_checks(adapter, groups, experts)
        for code, (where, detail) in found.items():
            if code in conditions:
                out.append(Violation(consumer, "moe_per_expert", conditions[code], tuple(where), detail))
        if "non-expert-mlp" in conditions and (not model_type or peft_converts_experts(model_type)):
            others = non_expert_mlp(adapter.modules, cfg.target_parameters)
            if others:
                out.append(Violation(consumer, "moe_per_expert", conditions["non-expert-mlp"], tuple(others),
                                     f"{len(others)} module(s) outside the routed experts"))
    if fused and "moe_target_parameters" in table:
        conditions = {c.code: c for c in table["moe_target_parameters"]}
        if "both-parameters" in conditions:
            by_block: dict[str, set[str]] = {}
            for name, block in fused.items():
                by_block.setdefault(block, set()).add(name)
            single = [b for b, names in by_block.items() if len(names) < 2]
            if single:
                out.append(Violation(consumer, "moe_target_parameters", conditions["both-parameters"],
                                     tuple(single), f"{len(single)} layer(s) with one fused parameter adapted"))
    return out


def _expert_checks(adapter: Adapter, groups: Mapping[str, ExpertGroup],
                   experts: Optional[Mapping[str, int]]) -> dict[str, tuple[list[str], str]]:
    """``{condition code: (where, detail)}`` for the expert-layout conditions the adapter breaks."""
    found: dict[str, tuple[list[str], str]] = {}
    default_n = 1 + max(i for g in groups.values() for i in g.indices)
    lists: dict[str, tuple[list[str], list[str]]] = {c: ([], []) for c in ("all-experts", "all-projections",
                                                                          "group-rank")}
    for block, group in groups.items():
        n = (experts or {}).get(block, default_n)
        absent = sorted(set(range(n)) - group.indices)
        if absent:
            lists["all-experts"][0].append(block)
            lists["all-experts"][1].append(f"{block}: expert(s) {_ranges(absent)} of {n} missing")
        triple = _triple(group.projections)
        wanted = set(triple) if triple else group.projections
        per_index: dict[int, set[str]] = {}
        for i, p in group.modules:
            per_index.setdefault(i, set()).add(p)
        for index in sorted(per_index):
            lacking = sorted(wanted - per_index[index])
            if lacking:
                lists["all-projections"][0].append(f"{block}.{index}")
                lists["all-projections"][1].append(f"{block}.{index}: no {', '.join(lacking)}")
        for proj in sorted(group.projections):
            ranks = {adapter.modules[m].rank for (i, p), m in group.modules.items() if p == proj}
            if len(ranks) > 1:
                lists["group-rank"][0].append(f"{block}.*.{proj}")
                lists["group-rank"][1].append(f"{block}.*.{proj}: ranks {sorted(ranks)}")
    for code, (where, details) in lists.items():
        if where:
            found[code] = (where, "; ".join(details[:3]) + _more(details, 3))
    cfg = adapter.config
    off_rank = [m for g in groups.values() for m in g.modules.values() if adapter.modules[m].rank != cfg.r]
    if off_rank:
        ranks = sorted({adapter.modules[m].rank for m in off_rank})
        found["one-rank"] = (off_rank, f"{len(off_rank)} expert module(s) at rank {ranks}, config r={cfg.r}")
    off_alpha = [m for g in groups.values() for m in g.modules.values() if adapter.rank_alpha(m)[1] != cfg.lora_alpha]
    if off_alpha:
        found["one-alpha"] = (off_alpha, f"{len(off_alpha)} expert module(s) with their own alpha_pattern alpha")
    if cfg.use_rslora:
        names = [m for g in groups.values() for m in g.modules.values()]
        found["no-rslora"] = (names, "use_rslora is true")
    return found


def _triple(projections: set[str]) -> Optional[tuple[str, str, str]]:
    """The known (gate, up, down) naming that ``projections`` belong to, or None."""
    return next((t for t in PROJECTIONS if projections <= set(t)), None)


# ------------------------------------------------------------------------------------------------ base model


def checkpoint_experts(keys: Iterable[str]) -> dict[str, int]:
    """``{block: number of experts}`` from a checkpoint's tensor keys (``<block>.<index>.<proj>.weight``)."""
    counts: dict[str, int] = {}
    for key in keys:
        parsed = expert_name(key.removesuffix(".weight")) if key.endswith(".weight") else None
        if parsed is not None:
            block, index, _ = parsed
            counts[block] = max(counts.get(block, 0), index + 1)
    return counts


def _ranges(values: list[int]) -> str:
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def _more(items: list, shown: int) -> str:
    return f" and {len(items) - shown} more" if len(items) > shown else ""
