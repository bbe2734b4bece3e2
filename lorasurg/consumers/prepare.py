"""Rewrite an adapter so that every named consumer computes PEFT's per-module delta.

For each module ``m`` with PEFT scale ``s_m`` and rank ``r_m`` the delta ``s_m * B_m @ A_m`` is kept; what
changes is how the scale is written and, where needed, the factors:

* ``peft`` (layout ``patterns``): the adapter as it is.
* ``vllm`` (``uniform-scale``): one scale ``s`` for every module (the most common ``s_m``); ``r`` = the
  largest rank, ``lora_alpha = s * r`` (``s * sqrt(r)`` with rsLoRA), and ``rank_pattern``/``alpha_pattern``
  (anchored keys) give other ranks ``alpha_m = s * r_m``. vLLM >= 0.32 reads the patterns, older vLLM the
  global ``lora_alpha / r``: both get ``s``.
* ``llama.cpp`` (``tensor-rank``): no ``alpha_pattern`` and no rsLoRA; ``lora_alpha`` = the most common
  ``s_m * r_m``, ``r`` the most common rank, ``rank_pattern`` for the others (PEFT needs it to load them).
  PEFT and llama.cpp then both use ``lora_alpha / r_m``.
* both (or ``all``): ``lora_alpha / r`` and ``lora_alpha / r_m`` agree only at one rank, so every module is
  zero-padded to the largest rank ``R`` (``A`` gains zero rows, ``B`` zero columns: ``B @ A`` is unchanged,
  exactly); ``lora_alpha = s * R``, no patterns, no rsLoRA. The report gives the padding's cost in bytes.

A module whose written scale ``s'`` differs from ``s_m`` has its product multiplied by ``c = s_m / s'``: ``A``
and ``B`` are each multiplied by ``sqrt(|c|)`` (``B`` also by the sign of ``c``), in float32 and cast back to
their dtype (exact to float32 rounding in float32; a bfloat16 factor rounds again, to about 0.4%), and a kept
``lora_B.bias`` by ``c``.

What a named consumer cannot carry (it refuses, drops or misreads it, or reads it only for some models) is
left out and listed with its share of the delta's energy (squared Frobenius norm of everything the adapter
adds under PEFT; a tensor saved whole in ``modules_to_save`` counts only when its delta energy is given).

MoE and multimodal adapters (:mod:`lorasurg.consumers.layouts`): per-expert LoRA is completed and zero-padded to
one rank (:func:`~lorasurg.consumers.complete.complete_experts`, lossless) and, in every layout, written with the
experts at the config's ``r`` and one scale, without rsLoRA (PEFT 0.21.2 on transformers 5 reads nothing else;
layout ``experts`` when PEFT is the only consumer and the experts were not there yet); with expert LoRA,
``lora_dropout`` is written as 0 and ``lora_bias``/DoRA are left out for PEFT (its ``ParamWrapper`` refuses them).
Fused (``target_parameters``) experts, vision towers and checkpoint-named towers are left out for the consumers
whose rules drop or refuse them.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from typing import Collection, Iterable, Mapping, Optional, Union

import torch

from ..errors import InputError
from ..io.adapter import TOKENS_PART, Adapter, AdapterModule
from ..targeting import anchored_pattern_key
from .complete import ExpertFix, complete_experts, expert_notes
from .complete import pad_rank as _pad
from .for_report import WHOLE_MODULE_FEATURES, ForReport, LeftOut
from .layouts import (
    PEFT_OPTIONS,
    expert_name,
    fused_expert_modules,
    layout_violations,
    treatment_for,
)
from .reading import (
    MODULE_FEATURES,
    adapter_features,
    bias_energy,
    consumer_findings,
    module_energy,
    peft_scale,
    tied_modules,
)
from .rules import CONSUMERS, FEATURES, Consumer, parse_consumers

__all__ = ["LeftOut", "ForReport", "prepare_for", "blocked_parts", "module_energies", "rescale_module"]

_MODULE_FEATURES = WHOLE_MODULE_FEATURES
#: Features that PEFT's ParamWrapper refuses (PEFT 0.21.2 turns per-expert LoRA into one): left out for PEFT when
#: the adapter has MoE expert LoRA (see :data:`~lorasurg.consumers.layouts.PEFT_OPTIONS`).
_PARAM_WRAPPER_REFUSES = ("lora_bias", "dora")
_SCALE_FEATURES = ("rank_pattern", "alpha_pattern", "rslora")
#: consumers whose output is not a PEFT adapter file (``export --to gguf``): PEFT's MoE layout is not applied for them.
_NOT_PEFT_FILES = ("llama.cpp-gguf",)


def prepare_for(
    adapter: Adapter,
    consumers: Union[str, Iterable[str], None] = "peft",
    *,
    tied: Optional[Collection[str]] = None,
    delta_energy: Optional[Mapping[str, float]] = None,
    total_energy: Optional[float] = None,
    energies: Optional[Mapping[str, float]] = None,
    model_type: Optional[str] = None,
) -> tuple[Adapter, ForReport]:
    """A copy of ``adapter`` that every named consumer reads as PEFT reads ``adapter`` (see the module docstring).

    Args:
        adapter: a PEFT adapter (not changed; unchanged tensors are shared with the copy).
        consumers: ``peft``, ``vllm``, ``llama.cpp``, ``all``, or several (``"vllm,llama.cpp"`` or a list).
        tied: names of output modules tied to the input embedding and of that embedding; None: recognised as
            ``extract`` writes them (:func:`~lorasurg.consumers.reading.tied_heads`).
        delta_energy: ``{tensor key in adapter.extra: ||tuned - base||_F**2}`` for whole saved modules, so their
            share can be given when they are left out (``extract`` knows them).
        total_energy: the denominator of the shares; default the adapter's own delta energy under PEFT
            (``extract`` gives the energy of every changed tensor, so shares match its report).
        energies: ``{module: ||scale * B @ A||_F**2, module + ".lora_B.bias": ||scale * bias||**2}`` (what
            :func:`module_energies` gives) when the caller computed them: the adapter's tensors are then not read,
            so they may be placeholders on the meta device (``export`` streams the factors afterwards).
        model_type: the base's ``model_type``, when known: vLLM then keeps fused (``target_parameters``) experts for
            the types it reads them for (:data:`~lorasurg.consumers.layouts.VLLM_FUSED_MOE_TYPES`); without it they
            are left out for vLLM.

    Returns:
        ``(adapter, report)``.

    Raises:
        ConfigError: an unknown consumer name.
        InputError: nothing the named consumers can carry is left.
    """
    names = parse_consumers(consumers)
    chosen = [CONSUMERS[n] for n in names]
    total, energies = _energies(adapter, delta_energy, energies)
    total = total if total_energy is None else float(total_energy)
    new = Adapter(copy.deepcopy(adapter.config), {n: copy.copy(m) for n, m in adapter.modules.items()},
                  dict(adapter.extra))
    report = ForReport(names, "patterns", 0, 0.0, False, total_energy=total)

    for feature, (items, blockers) in blocked_parts(adapter, names, tied, model_type).items():
        if feature == "init_weights":
            new.config.init_lora_weights = True
            report.notes.append(
                f"{adapter.config.init_lora_weights!r} init: init_lora_weights is written as true, which "
                f"{', '.join(c.title for c in blockers)} require(s); the adapter belongs on the base it was "
                "trained on (the residual base for PiSSA/OLoRA), and PEFT then loads it without re-initialising")
            continue
        if feature == "layer_replication":
            raise InputError(
                f"the adapter replicates layers ({items[0]}), which {', '.join(c.title for c in blockers)} do(es) not "
                "read: no file can make them compute PEFT's delta. Fuse it (lorasurg fuse writes the replicated "
                "layers out) and serve the fused model, or write it for --for peft")
        for item in items:
            energy = _leave_out(new, feature, item, energies)
            share = None if energy is None or total <= 0 else energy / total
            reasons = {c.name: f"{c.title}: {_says(c, feature)}" for c in blockers}
            report.left_out.append(LeftOut(item, feature, tuple(reasons), "; ".join(reasons.values()), energy, share,
                                           reasons))
    _clean_config(new, adapter, chosen, {x.feature for x in report.left_out})
    peft_file = not set(names) & set(_NOT_PEFT_FILES)
    if peft_file:
        report.experts = complete_experts(new)
        report.notes += expert_notes(new, report.experts, energies, total)
    if not new.modules:
        listed = "; ".join(FEATURES[f] for f in sorted({x.feature for x in report.left_out}))
        raise InputError(
            f"nothing of this adapter can be written for {', '.join(names)}: every LoRA module is of a kind they "
            f"cannot carry ({listed}). Write it for fewer consumers (--for peft keeps everything)."
        )
    _layout(new, adapter, {c.layout for c in chosen if c.layout != "patterns"} or {"patterns"}, report, peft_file)
    _check(new, names, tied, adapter, report.experts, model_type, peft_file)
    return new, report


def blocked_parts(adapter: Adapter, consumers: Union[str, Iterable[str], None],
                  tied: Optional[Collection[str]] = None,
                  model_type: Optional[str] = None) -> dict[str, tuple[list[str], list[Consumer]]]:
    """``{feature: (items, consumers)}``: the parts of ``adapter`` that some named consumers cannot carry (what
    :func:`prepare_for` leaves out, or for ``init_weights`` rewrites), and which of the consumers cannot.

    Reads only names, kinds, shapes and the config (no tensor values when ``tied`` is given), so a caller can ask
    before it computes any factor, with placeholder tensors on the meta device.
    """
    chosen = [CONSUMERS[n] for n in parse_consumers(consumers)]
    found = {}
    features = adapter_features(adapter, tied)
    experts = "moe_per_expert" in features or "moe_target_parameters" in features
    for feature, items in features.items():
        blockers = [c for c in chosen if treatment_for(c, feature, model_type) != "reads" and feature not in
                    _SCALE_FEATURES or (experts and c.name == "peft" and feature in _PARAM_WRAPPER_REFUSES)]
        if feature not in _SCALE_FEATURES and blockers:
            found[feature] = (items, blockers)
    return found


def _says(c: Consumer, feature: str) -> str:
    """What ``c`` does with ``feature``: its rule, or (PEFT with MoE expert LoRA) its ParamWrapper's condition."""
    rule = c.rules.get(feature)
    return rule.says if rule is not None else PEFT_OPTIONS.says


# ------------------------------------------------------------------------------------------------ leaving out


def module_energies(adapter: Adapter, name: str) -> dict[str, float]:
    """``{name: ||scale * B @ A||_F**2, name + ".lora_B.bias": ||scale * bias||**2}`` of one module under PEFT."""
    return {name: module_energy(adapter, name), f"{name}.lora_B.bias": bias_energy(adapter, name)}


def _energies(adapter: Adapter, delta_energy: Optional[Mapping[str, float]],
              given: Optional[Mapping[str, float]] = None) -> tuple[float, dict[str, float]]:
    """Total delta energy and the energy of each module (``m``), bias (``m.bias``) and known extra tensor."""
    energies: dict[str, float] = {}
    for name in adapter.modules:
        energies.update(module_energies(adapter, name) if given is None else
                        {name: given[name], f"{name}.lora_B.bias": given.get(f"{name}.lora_B.bias", 0.0)})
    for key, value in (delta_energy or {}).items():
        if key in adapter.extra:
            energies[f"extra:{key}"] = float(value)
    return sum(energies.values()), energies


def _leave_out(new: Adapter, feature: str, item: str, energies: dict[str, float]) -> Optional[float]:
    """Remove ``item`` (a module, a bias, a magnitude or an extra tensor) from ``new``; its energy or None."""
    if feature == "lora_bias":
        new.modules[item].bias = None
        return energies[f"{item}.lora_B.bias"]
    if feature == "dora":
        if item in new.modules:
            new.modules[item].magnitude = None
        return None
    if feature in ("modules_to_save", "saved_norms", "trainable_tokens"):
        new.extra.pop(item, None)
        return energies.get(f"extra:{item}")
    if feature in _MODULE_FEATURES:
        if item not in new.modules:
            return 0.0
        del new.modules[item]
        new.extra.pop(f"{item}.base_layer.weight", None)
        return energies[item] + energies[f"{item}.lora_B.bias"]
    raise AssertionError(f"no way to leave out {feature!r}")


def _clean_config(new: Adapter, old: Adapter, chosen, left_out: Collection[str] = ()) -> None:
    """Config flags and target_modules that match what was left out (``left_out``: the features left out)."""
    cfg = new.config
    if cfg.lora_bias and (any(not c.carries("lora_bias") for c in chosen) or "lora_bias" in left_out):
        cfg.lora_bias = False
        for mod in new.modules.values():
            mod.bias = None
    if cfg.use_dora and (any(not c.carries("dora") for c in chosen) or "dora" in left_out):
        cfg.use_dora = False
        for mod in new.modules.values():
            mod.magnitude = None
    tokens = {f"{m}.{TOKENS_PART}" for m in new.token_rows()}
    if cfg.modules_to_save and not any(not k.endswith(".base_layer.weight") and k not in tokens for k in new.extra):
        cfg.modules_to_save = None
    if cfg.trainable_token_indices is not None and not tokens:
        cfg.trainable_token_indices = None
    removed = [m for m in old.modules if m not in new.modules]
    if removed:
        _untarget(cfg, removed, list(new.modules))
    if cfg.target_parameters and fused_expert_modules(old) and not fused_expert_modules(new):
        # entries naming a parameter of the fused experts (gate_up_proj, mlp.experts.down_proj): theirs are gone
        cfg.target_parameters = [p for p in cfg.target_parameters if p.rsplit(".", 1)[-1] in ("weight", "bias")] or None


def _untarget(cfg, removed: list[str], kept: list[str]) -> None:
    """Stop target_modules from selecting ``removed``: drop list entries that select only removed modules, and
    add the rest to exclude_modules (PEFT would otherwise give them a fresh, zero LoRA and warn of missing keys)."""

    def hits(entry: str, name: str) -> bool:
        return name == entry or name.endswith("." + entry)

    still = list(removed)
    target = cfg.target_modules
    if isinstance(target, (list, set, tuple, frozenset)):
        entries = [e for e in target if not (any(hits(e, m) for m in removed) and not any(hits(e, k) for k in kept))]
        cfg.target_modules = set(entries)
        still = [m for m in removed if any(hits(e, m) for e in entries)]
    if not still:
        return
    excl = cfg.exclude_modules
    if excl is None:
        cfg.exclude_modules = set(still)
    elif isinstance(excl, str):
        cfg.exclude_modules = f"(?:{excl})|" + "|".join(re.escape(m) for m in still)
    else:
        cfg.exclude_modules = set(excl) | set(still)


# ------------------------------------------------------------------------------------------------ layout


def _layout(new: Adapter, old: Adapter, layouts: set[str], report: ForReport, peft_file: bool = True) -> None:
    """Write the scale as the consumers read it: set r, lora_alpha, patterns; rescale or pad the factors.

    With per-expert MoE LoRA (already at one rank ``R`` by :func:`~lorasurg.consumers.complete.complete_experts`),
    every layout puts the experts at the config's own ``r = R`` and one scale ``s`` (the experts' most common), with
    no rsLoRA: PEFT 0.21.2 on transformers 5 reads the fused experts' rank and alpha from ``r`` and ``lora_alpha``
    only, and doubles both for ``gate_up_proj`` (so rsLoRA would be off by sqrt(2)). Not for a file other than
    a PEFT adapter (``peft_file`` false: a GGUF file keeps each tensor's rank).
    """
    cfg = new.config
    wrapped = new.parameter_wrapped()  # target_parameters LoRAs: looked up by their parameters' names, kept as they are
    kept = {p: old.rank_alpha(p) for p in (old.config.target_parameters or [])}
    mods = [m for m in new.modules if m not in wrapped]
    if not mods:
        report.layout, report.r, report.lora_alpha, report.use_rslora = "patterns", cfg.r, cfg.lora_alpha, cfg.use_rslora
        return
    scales = {m: peft_scale(old, m) for m in mods if m in old.modules}
    ranks = {m: new.modules[m].rank for m in mods}
    experts = {m for m in mods if expert_name(m) is not None} if peft_file else set()
    if layouts == {"patterns"} and (not experts or _experts_at_globals(new, experts)):
        report.layout, report.r, report.lora_alpha = "patterns", cfg.r, cfg.lora_alpha
        report.use_rslora = cfg.use_rslora
        return
    s = _most_common(scales[m] for m in mods if m in scales and (m in experts or not experts))
    for m in mods:  # zero factors complete_experts added: any scale is exact, so the experts' own
        scales.setdefault(m, s)
    if experts:
        cfg.use_rslora = False
    if layouts == {"patterns"}:  # per-expert LoRA for PEFT: experts at the globals, the rest keeps its own scale
        r = ranks[next(iter(experts))]
        cfg.r, cfg.lora_alpha = r, _number(s * r)
        written = {m: s if m in experts else scales[m] for m in mods}
        cfg.rank_pattern = {anchored_pattern_key(m): ranks[m] for m in mods if ranks[m] != r}
        cfg.alpha_pattern = {anchored_pattern_key(m): _number(written[m] * ranks[m]) for m in mods
                             if not math.isclose(written[m] * ranks[m], s * r, rel_tol=1e-12)}
        layout = "experts"
    elif layouts == {"tensor-rank"}:
        cfg.use_rslora = False
        r = ranks[next(iter(experts))] if experts else _most_common(ranks[m] for m in mods)
        alpha = s * r if experts else (_most_common(scales[m] * ranks[m] for m in mods) or 1.0)
        written = {m: alpha / ranks[m] for m in mods}
        cfg.r, cfg.lora_alpha = r, _number(alpha)
        cfg.rank_pattern = {anchored_pattern_key(m): ranks[m] for m in mods if ranks[m] != r}
        cfg.alpha_pattern = {}
        layout = "tensor-rank"
    elif layouts == {"uniform-scale"}:
        r = ranks[next(iter(experts))] if experts else max(ranks.values())
        root = math.sqrt if cfg.use_rslora else float
        written = {m: s for m in mods}
        cfg.r, cfg.lora_alpha = r, _number(s * root(r))
        cfg.rank_pattern = {anchored_pattern_key(m): ranks[m] for m in mods if ranks[m] != r}
        cfg.alpha_pattern = {anchored_pattern_key(m): _number(s * root(ranks[m])) for m in mods if ranks[m] != r}
        layout = "uniform-scale"
    else:  # uniform scale and tensor rank together: one rank
        r = max(ranks.values())
        cfg.use_rslora = False
        written = {m: s for m in mods}
        cfg.r, cfg.lora_alpha, cfg.rank_pattern, cfg.alpha_pattern = r, _number(s * r), {}, {}
        for m in mods:
            if ranks[m] < r:
                report.padding_bytes += _pad(new.modules[m], r)
                report.padded[m] = (ranks[m], r)
        layout = "padded"
    for m in mods:
        c = scales[m] / written[m]
        if not math.isclose(c, 1.0, rel_tol=1e-12):
            rescale_module(new.modules[m], c)
            report.rescaled[m] = c
    _keep_parameters(cfg, kept)
    cfg.validate()
    report.layout, report.r, report.lora_alpha, report.use_rslora = layout, cfg.r, cfg.lora_alpha, cfg.use_rslora


def _keep_parameters(cfg, kept: Mapping[str, tuple[int, float]]) -> None:
    """Pin each ``target_parameters`` entry to the ``(r, alpha)`` it had (anchored keys of the parameter's name, which
    PEFT looks a ParamWrapper's rank up by) where the rewritten globals would change it."""
    for parameter, (r, alpha) in kept.items():
        key = anchored_pattern_key(parameter)
        if r != cfg.r:
            cfg.rank_pattern = {**(cfg.rank_pattern or {}), key: r}
        if not math.isclose(alpha, cfg.lora_alpha, rel_tol=1e-12):
            cfg.alpha_pattern = {**(cfg.alpha_pattern or {}), key: _number(alpha)}


def _experts_at_globals(new: Adapter, experts: Collection[str]) -> bool:
    """Whether every per-expert module already has the config's r and lora_alpha, without rsLoRA (PEFT's layout)."""
    cfg = new.config
    return not cfg.use_rslora and all(new.rank_alpha(m) == (cfg.r, cfg.lora_alpha) and new.modules[m].rank == cfg.r
                                      for m in experts)


def rescale_module(mod: AdapterModule, c: float) -> None:
    """Multiply ``B @ A`` by ``c``: ``A`` and ``B`` each by ``sqrt(|c|)`` (``B`` by the sign too); bias by ``c``.

    In float32 (float64 for float64 tensors), cast back to each tensor's dtype; ``mod`` is changed in place."""
    root = math.sqrt(abs(c))
    mod.A = (mod.A.to(_work(mod.A)) * root).to(mod.A.dtype)
    mod.B = (mod.B.to(_work(mod.B)) * (root if c > 0 else -root)).to(mod.B.dtype)
    if mod.bias is not None:
        mod.bias = (mod.bias.to(_work(mod.bias)) * c).to(mod.bias.dtype)


def _check(new: Adapter, names: tuple[str, ...], tied, old: Adapter, experts: ExpertFix,
           model_type: Optional[str] = None, peft_file: bool = True) -> None:
    """The rewritten adapter must be read by every named consumer as PEFT reads it (a bug otherwise)."""
    kept_tied = None if tied is None else [t for t in tied if t in new.modules]
    if kept_tied is None:
        kept_tied = [t for t in tied_modules(old) if t in new.modules]
    wrong = [f for f in consumer_findings(new, names, kept_tied, model_type)
             if f.severity == "error" or f.code == "legacy-scale"]
    problems = new.problems()
    if peft_file and not experts.unresolved:
        wrong += [f"PEFT: {v.condition.says} ({v.detail})" for v in layout_violations(new, "peft")
                  if v.condition.code != "non-expert-mlp"]
    if wrong or problems:
        raise AssertionError("prepare_for wrote an adapter its consumers misread: "
                             + "; ".join([getattr(f, "message", f) for f in wrong] + problems))


def _most_common(values: Iterable[float]) -> float:
    """The most common value (rounded to 12 significant digits to group equal floats); the first on ties."""
    counts: Counter = Counter()
    first: dict[float, float] = {}
    for v in values:
        key = float(f"{v:.12g}")
        counts[key] += 1
        first.setdefault(key, v)
    best = max(counts.values())
    return next(first[k] for k in first if counts[k] == best)


def _work(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _number(x: float):
    """An int when ``x`` is integral (PEFT writes lora_alpha as an int by default)."""
    return int(round(x)) if math.isclose(x, round(x), rel_tol=0, abs_tol=1e-9) else float(x)
