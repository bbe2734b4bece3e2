"""Per-expert LoRA written so that PEFT (on transformers 5), vLLM and llama.cpp all read it: lossless completion.

The three consumers share the conditions of :data:`~lorasurg.consumers.layouts.CONDITIONS` on per-expert modules
(every expert of an adapted MoE layer, gate, up and down for each, one rank per projection in a layer; PEFT: one
rank and one scale for every routed expert). :func:`complete_experts` makes an adapter meet them without changing
its delta:

* a missing expert or projection gets zero factors (``B = 0``, so ``B @ A = 0``) of the common rank, shaped like
  its siblings (gate and up are ``(I, H)``, down ``(H, I)``), with a zero ``lora_B.bias`` when ``lora_bias`` is set;
* every per-expert module is zero-padded to the largest per-expert rank ``R`` (``A`` gains zero rows, ``B`` zero
  columns: ``B @ A`` unchanged bit for bit).

One scale for the experts (and the config's ``r = R``, no rsLoRA) is the layout's job
(:func:`~lorasurg.consumers.prepare.prepare_for`). The number of experts is one more than the largest index in
any layer; a layer with no per-expert module at all is not invented (its size is unknown without the base).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from ..io.adapter import Adapter, AdapterModule
from .layouts import PROJECTIONS, ExpertGroup, expert_groups, layout_features, non_expert_mlp

__all__ = ["ExpertFix", "complete_experts", "expert_notes", "pad_rank"]


@dataclass
class ExpertFix:
    """What :func:`complete_experts` did.

    Attributes:
        added: modules given zero factors (missing experts or projections).
        padded: ``{module: (old rank, new rank)}``.
        bytes: bytes the zero factors and the padding add.
        rank: the one rank of every per-expert module afterwards (0: the adapter has none).
        targets_added: projection names added to ``target_modules``.
        unresolved: projections whose shape could not be inferred (left missing).
    """

    added: list[str] = field(default_factory=list)
    padded: dict[str, tuple[int, int]] = field(default_factory=dict)
    bytes: int = 0
    rank: int = 0
    targets_added: list[str] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)


def pad_rank(mod: AdapterModule, rank: int) -> int:
    """Zero-pad ``mod`` to ``rank``: ``A`` gains zero rows, ``B`` zero columns. Returns the bytes added."""
    extra = rank - mod.rank
    zA = torch.zeros((extra, *mod.A.shape[1:]), dtype=mod.A.dtype, device=mod.A.device)  # meta stays meta
    zB = torch.zeros((mod.B.shape[0], extra, *mod.B.shape[2:]), dtype=mod.B.dtype, device=mod.B.device)
    mod.A = torch.cat([mod.A, zA], dim=0)  # (r + extra, in, ...)
    mod.B = torch.cat([mod.B, zB], dim=1)  # (out, r + extra, ...)
    return zA.numel() * zA.element_size() + zB.numel() * zB.element_size()


def complete_experts(adapter: Adapter) -> ExpertFix:
    """Give every MoE layer of ``adapter`` that has per-expert LoRA all its experts and projections, at one rank
    (in place; see the module docstring). An adapter without per-expert modules is left as it is."""
    fix = ExpertFix()
    groups = expert_groups(adapter.modules)
    if not groups:
        return fix
    fix.rank = max(adapter.modules[m].rank for g in groups.values() for m in g.modules.values())
    n = 1 + max(i for g in groups.values() for i in g.indices)
    seen = set().union(*(g.projections for g in groups.values()))
    triple = next((t for t in PROJECTIONS if seen <= set(t)), None)
    wanted = list(triple) if triple else sorted(seen)
    for block, group in groups.items():
        for index in range(n):
            for proj in wanted:
                if (index, proj) in group.modules:
                    continue
                name = f"{block}.{index}.{proj}"
                made = _zero_module(adapter, groups, name, proj, block, triple, fix.rank)
                if made is None:
                    fix.unresolved.append(name)
                    continue
                adapter.modules[name] = made
                fix.added.append(name)
                fix.bytes += sum(t.numel() * t.element_size() for t in made.tensors().values())
    for g in expert_groups(adapter.modules).values():
        for name in g.modules.values():
            mod = adapter.modules[name]
            if mod.rank < fix.rank:
                fix.padded[name] = (mod.rank, fix.rank)
                fix.bytes += pad_rank(mod, fix.rank)
    fix.targets_added = _target(adapter, fix.added)
    return fix


def _zero_module(adapter: Adapter, groups: dict[str, ExpertGroup], name: str, proj: str, block: str,
                 triple: Optional[tuple[str, str, str]], rank: int) -> Optional[AdapterModule]:
    """Zero factors for ``name`` at ``rank``, shaped like a sibling; None when no sibling gives the shape."""
    shape = _shape(adapter, groups, proj, block, triple)
    if shape is None:
        return None
    (out, inp), like = shape
    like_A, like_B = dict(dtype=like.A.dtype, device=like.A.device), dict(dtype=like.B.dtype, device=like.B.device)
    bias = torch.zeros(out, **like_B) if adapter.config.lora_bias else None
    return AdapterModule(name, torch.zeros(rank, inp, **like_A), torch.zeros(out, rank, **like_B), bias=bias)


def _shape(adapter: Adapter, groups: dict[str, ExpertGroup], proj: str, block: str,
           triple: Optional[tuple[str, str, str]]) -> Optional[tuple[tuple[int, int], AdapterModule]]:
    """``((out, in), a sibling module)`` for projection ``proj`` of layer ``block`` (``groups``: the adapter's
    per-expert modules before completion): the same projection in this layer, then in any layer; else from the
    other projections (gate and up are alike, down is their transpose)."""
    order = [groups[block]] + [g for b, g in groups.items() if b != block]
    for g in order:
        m = next((m for (_, p), m in g.modules.items() if p == proj), None)
        if m is not None:
            mod = adapter.modules[m]
            return (mod.B.shape[0], mod.A.shape[1]), mod
    if triple is None:
        return None
    gate, up, down = triple
    for g in order:
        for (_, p), m in g.modules.items():
            mod = adapter.modules[m]
            out, inp = mod.B.shape[0], mod.A.shape[1]
            if proj in (gate, up) and p in (gate, up):
                return (out, inp), mod
            if (proj == down) != (p == down):  # down from gate/up, or gate/up from down: transposed
                return (inp, out), mod
    return None


def _target(adapter: Adapter, added: list[str]) -> list[str]:
    """Add to a list ``target_modules`` the projection names of the added modules it does not select yet (an entry
    selects a module it equals or is a ``.``-suffix of, as PEFT matches list entries)."""
    target = adapter.config.target_modules
    if not added or not isinstance(target, (list, set, tuple, frozenset)):
        return []
    unselected = [n for n in added if not any(n == e or n.endswith("." + e) for e in target)]
    missing = sorted({n.rsplit(".", 1)[-1] for n in unselected})
    if missing:
        adapter.config.target_modules = set(target) | set(missing)
    return missing


def expert_notes(adapter: Adapter, fix: ExpertFix, energies: Mapping[str, float], total: float) -> list[str]:
    """Notes on an adapter with MoE expert LoRA (none without): ``lora_dropout`` written as 0 (in place: PEFT's
    ParamWrapper refuses dropout), missing experts that could not be shaped, and PEFT 0.21.2 dropping LoRA outside
    the routed experts (read by vLLM and llama.cpp), with its share of ``total`` (``energies``: per module)."""
    cfg = adapter.config
    features = layout_features(adapter)
    if not ({"moe_per_expert", "moe_target_parameters"} & set(features)):
        return []
    notes = []
    if cfg.lora_dropout:
        notes.append(f"lora_dropout={cfg.lora_dropout:g} is written as 0: PEFT 0.21.2 on transformers 5 loads MoE "
                     "expert LoRA into its ParamWrapper, which refuses dropout (inference has none)")
        cfg.lora_dropout = 0.0
    if fix.unresolved:
        notes.append(f"{len(fix.unresolved)} missing expert module(s) could not be shaped from their siblings and are "
                     f"still missing (e.g. {fix.unresolved[0]})")
    others = non_expert_mlp(adapter.modules, cfg.target_parameters) if "moe_per_expert" in features else []
    if others:
        share = sum(energies.get(m, 0.0) + energies.get(f"{m}.lora_B.bias", 0.0) for m in others)
        notes.append(
            f"PEFT 0.21.2 on transformers 5 drops the LoRA of {len(others)} gate/up/down module(s) outside the routed "
            f"experts ({others[0]}{' and more' if len(others) > 1 else ''}; "
            f"{100 * share / total if total > 0 else 0:.3f}% of the delta) unless target_parameters lists each as "
            "'<module>.weight'; vLLM and llama.cpp read them")
    return notes
