"""Per-module operations (rerank, merge) on adapters for mixtures of experts, kept loadable in PEFT 0.21.2 on
transformers 5 (:mod:`lorasurg.consumers.experts`, found by :mod:`lorasurg.surgery.expert_groups`).

* A ``target_parameters`` LoRA on ``E`` fused experts is one LoRA per expert: :func:`split_parameter_loras` turns
  each into ``E`` modules of their own, ``<parameter>[e]`` (:func:`lorasurg.engine.experts.split_experts`), at the
  config's rank and alpha for the parameter, so the operation treats every expert as a module; :func:`peft_experts`
  joins them back (:func:`~lorasurg.engine.experts.join_experts`) at one rank, the largest any expert got, the others
  zero-padded (exact) and an expert left without factors given zeros, as PEFT needs every expert at the one rank
  ``lora_A``'s ``r E`` rows say. Its rank and alpha are keyed by the parameter's name (PEFT looks a wrapper's rank
  up by it), and so are those of a 2-D weight's LoRA.
* Per-expert modules (``mlp.experts.3.gate_proj``) are read by PEFT's conversion at the config's global ``r`` and
  ``lora_alpha``, every expert of an adapted layer present: :func:`peft_experts` gives every per-expert module one
  rank (the largest among them, others zero-padded) and one scale (the most common; an expert at another scale gets
  its ``lora_B`` multiplied by the ratio, exact to rounding), zero factors for an expert of a group that has none,
  and returns that ``(rank, scale)`` as the config's global values.

Every zero-fill, padding and rescaling is listed in the result's notes.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from ..engine.experts import join_experts, split_experts
from ..engine.factors import pad_factors
from ..errors import UnsupportedError
from ..io.adapter import Adapter, AdapterModule
from ..targeting import anchored_pattern_key
from .expert_groups import ParameterLora, expert_groups, parameter_loras
from .options import short_list
from .patterns import derive_config

_short = functools.partial(short_list, limit=3)  # a, b, c and N more

__all__ = ["SplitAdapter", "split_parameter_loras", "ExpertLayout", "peft_experts", "refuse_consumers"]


@dataclass
class SplitAdapter:
    """An adapter with each target_parameters LoRA on several experts split into per-expert modules.

    Attributes:
        adapter: the split adapter (its config gives each ``<parameter>[e]`` the parameter's rank and alpha).
        loras: ``{saved path: ParameterLora}`` of every target_parameters LoRA of the original (2-D ones too).
    """

    adapter: Adapter
    loras: dict[str, ParameterLora]

    def expert_names(self, lora: ParameterLora) -> list[str]:
        return [f"{lora.parameter}[{e}]" for e in range(lora.experts)] if lora.experts > 1 else [lora.path]


def split_parameter_loras(adapter: Adapter) -> SplitAdapter:
    """The adapter with every target_parameters LoRA on ``E > 1`` experts as ``E`` modules (module docstring); the
    config gives each of them, and a 2-D weight's LoRA under its path, the parameter's rank and alpha."""
    loras = parameter_loras(adapter)
    if not loras:
        return SplitAdapter(adapter, loras)
    modules: dict[str, AdapterModule] = {}
    ranks, alphas = {}, {}
    for name, mod in adapter.modules.items():
        lora = loras.get(name)
        if lora is None:
            modules[name] = mod
            continue
        if lora.experts == 1:
            experts = [(name, mod.A, mod.B)]
        else:
            A, B = split_experts(mod.A, mod.B, lora.experts)  # (E, r, in), (E, out, r)
            experts = [(f"{lora.parameter}[{e}]", A[e].contiguous(), B[e].contiguous()) for e in range(lora.experts)]
        for expert, a, b in experts:
            modules[expert] = AdapterModule(expert, a, b)
            ranks[anchored_pattern_key(expert)] = lora.rank  # the parameter's rank and alpha, by the new name
            alphas[anchored_pattern_key(expert)] = lora.alpha
    cfg = adapter.config
    config = derive_config(cfg, rank_pattern={**ranks, **(cfg.rank_pattern or {})},
                           alpha_pattern={**alphas, **(cfg.alpha_pattern or {})})
    return SplitAdapter(Adapter(config, modules, dict(adapter.extra)), loras)


def refuse_consumers(split: SplitAdapter, consumers: tuple[str, ...], name: str) -> None:
    """Refuse ``--for`` other consumers than PEFT for an adapter with target_parameters LoRAs: the rewriting for
    consumers (:func:`lorasurg.consumers.prepare_for`) reads every saved path as one module and would break PEFT's
    ``r * E`` layout.

    Raises:
        UnsupportedError: naming the parameters.
    """
    if tuple(consumers) == ("peft",) or not split.loras:
        return
    params = sorted(lora.parameter for lora in split.loras.values())
    raise UnsupportedError(
        f"{name} has target_parameters LoRAs ({', '.join(params[:3])}{' ...' if len(params) > 3 else ''}), which "
        f"--for {','.join(consumers)} cannot rewrite yet (it reads each saved path as one module, not r per expert); "
        "write it for peft (the default) instead")


@dataclass
class ExpertLayout:
    """What :func:`peft_experts` gives.

    Attributes:
        modules: ``{saved path: AdapterModule}``: per-expert splits joined back.
        ranks: ``{config key: (rank, scale)}``: module names, and parameter names for target_parameters LoRAs.
        base: the config's global ``(r, scale)`` per-expert modules need, or None without them.
        parameters: the target_parameters entries (parameter names) of the LoRAs kept; paths: their saved paths.
        zero_filled: experts (or per-expert modules) given zero factors.
        notes: what was padded, zero-filled or rescaled, one line each.
    """

    modules: dict[str, AdapterModule]
    ranks: dict[str, tuple[int, float]]
    base: Optional[tuple[int, float]] = None
    parameters: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    zero_filled: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)

    def rank_of(self, name: str) -> int:
        """The rank the operation's module ``name`` (an expert ``<parameter>[e]`` too) ends up at."""
        return self.ranks[self.keys.get(name, name)][0]


def peft_experts(modules: Mapping[str, AdapterModule], ranks: Mapping[str, tuple[int, float]], split: SplitAdapter,
                 source: Mapping[str, AdapterModule]) -> ExpertLayout:
    """Lay the operation's result (``modules`` with their ``(rank, scale)``, in the split adapter's names) out as PEFT
    loads it (module docstring). ``source``: the original modules (to zero-fill a per-expert module left out)."""
    layout = ExpertLayout({}, {})
    joined: dict[str, ParameterLora] = {}
    for lora in split.loras.values():
        for name in split.expert_names(lora):
            joined[name] = lora
    done = set()
    for name, mod in modules.items():
        lora = joined.get(name)
        if lora is None:
            layout.modules[name] = mod
            layout.ranks[name] = ranks[name]
        elif lora.path not in done:
            done.add(lora.path)
            _join(layout, lora, split.expert_names(lora), modules, ranks)
    _per_expert(layout, source)
    return layout


def _join(layout: ExpertLayout, lora: ParameterLora, names: list[str], modules: Mapping[str, AdapterModule],
          ranks: Mapping[str, tuple[int, float]]) -> None:
    """One target_parameters LoRA from its experts' modules, at one rank and scale."""
    present = [modules[n] for n in names if n in modules]
    if not present:  # every expert left out (a rank policy): so is the parameter
        return
    rank = max(m.rank for m in present)
    scale = _most_common(ranks[n][1] for n in names if n in modules)
    if lora.experts == 1:
        mod = present[0]
        A, B = pad_factors(mod.A, mod.B, rank)
        layout.modules[lora.path] = AdapterModule(lora.path, A, B)
    else:
        first = present[0]
        A = torch.zeros(lora.experts, rank, first.A.shape[1], dtype=first.A.dtype)  # (E, r, in)
        B = torch.zeros(lora.experts, first.B.shape[0], rank, dtype=first.B.dtype)  # (E, out, r)
        for e, name in enumerate(names):
            mod = modules.get(name)
            if mod is None:
                layout.zero_filled.append(name)
                continue
            A[e, :mod.rank] = mod.A
            B[e, :, :mod.rank] = _rescaled(mod.B, ranks[name][1], scale)
        lora_A, lora_B = join_experts(A, B)  # (r E, in), (out, r E)
        layout.modules[lora.path] = AdapterModule(lora.path, lora_A, lora_B)
    layout.ranks[lora.parameter] = (rank, scale)
    layout.parameters.append(lora.parameter)
    layout.paths.append(lora.path)
    layout.keys.update(dict.fromkeys(names, lora.parameter))


def _per_expert(layout: ExpertLayout, source: Mapping[str, AdapterModule]) -> None:
    """Every per-expert module at one rank and scale, every expert of a group present."""
    groups = expert_groups(source)
    members = [m for group in groups.values() for m in group.values()]
    present = [m for m in members if m in layout.modules]
    if not present:
        return
    rank = max(layout.modules[m].rank for m in present)
    scale = _most_common(layout.ranks[m][1] for m in present)
    padded, rescaled, zero = [], [], []
    for name in members:
        mod = layout.modules.get(name)
        if mod is None:
            original = source[name]
            mod = AdapterModule(name, original.A.new_zeros(rank, *original.A.shape[1:]),
                                original.B.new_zeros(original.B.shape[0], rank))
            zero.append(name)
        else:
            if layout.ranks[name][1] != scale:
                mod = AdapterModule(name, mod.A, _rescaled(mod.B, layout.ranks[name][1], scale))
                rescaled.append(name)
            if mod.rank < rank:
                padded.append(name)
                mod = AdapterModule(name, *pad_factors(mod.A, mod.B, rank))
        layout.modules[name] = mod
        layout.ranks[name] = (rank, scale)
    layout.base = (rank, scale)
    layout.zero_filled += zero
    if zero:
        layout.notes.append(f"{len(zero)} per-expert module(s) got zero factors ({_short(zero)}): PEFT needs every "
                            "expert of an adapted layer")
    if padded:
        layout.notes.append(f"{len(padded)} per-expert module(s) zero-padded to rank {rank} ({_short(padded)}): PEFT "
                            "reads every expert at the config's r")
    if rescaled:
        layout.notes.append(f"{len(rescaled)} per-expert module(s) rescaled to the common scale {scale:g} "
                            f"({_short(rescaled)}): PEFT reads every expert at the config's lora_alpha")


def _rescaled(B: torch.Tensor, scale: float, common: float) -> torch.Tensor:
    """``B`` carrying ``scale`` when read at ``common``: ``B * scale / common`` (float32 math, same dtype)."""
    return B if scale == common else (B.to(torch.float32) * (scale / common)).to(B.dtype)


def _most_common(values) -> float:
    return Counter(values).most_common(1)[0][0]
