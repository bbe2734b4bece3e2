"""What ``fuse`` will write, decided and checked before any tensor is read or any file written.

An adapter is matched against BASE module by module, its names (PEFT's, the model's namespace) placed among BASE's
checkpoint keys by :mod:`.place` (renamed towers of multimodal models, per-expert keys, ``target_parameters`` on
fused 3-D experts):

* every LoRA module must have a place in BASE, be of the kind its tensors are shaped for, and its ``lora_A``/``lora_B``
  must have the shapes BASE's weight needs (else the adapter was trained for another base: every such module is
  named with both shapes). A ``target_parameters`` LoRA on a 3-D expert parameter is split per expert: each expert's
  delta goes to the checkpoint keys holding that expert (per-expert keys, each a row range of the expert's matrix),
  or to the expert's slice of the 3-D tensor BASE stores (gpt-oss, ``(E, in, out)``: the delta transposed);
* every other tensor of the adapter is a module's own tensor (``modules_to_save``: ``<module>.weight``,
  ``<module>.bias``; a targeted embedding's ``<module>.base_layer.weight``; the biases PEFT saves for
  ``bias="all"``/``"lora_only"``, ``<module>.base_layer.bias``) and replaces the BASE tensor holding it, of the same
  shape (a fused expert parameter BASE stores per expert: its slices); trainable-token rows are written into their
  rows (:mod:`.layout`, which also writes replicated layers out, one copy each);
* a ``lora_B.bias`` that is not zero on a layer without a bias in BASE needs a bias tensor: where the architecture's
  config has a flag that gives the layer one (:func:`lorasurg.io.meta_facts.bias_flags`, e.g. Llama's
  ``attention_bias``), the flag is set and every other layer it governs gets a zero bias; where none exists
  (Qwen2's o_proj and MLP) the fuse is refused, naming the modules and the norm of each bias, unless
  ``drop_unfusable_bias`` drops them (listed). A zero ``lora_B.bias`` needs nothing (``extract`` writes zeros on
  every target because ``lora_bias`` is one flag for all of them);
* tied weights (``lm_head`` sharing the input embedding's weight): BASE holds the tensor once. When both sides get
  the same change (no change, the same delta as in an extracted tied embedding, the same saved copy) it is applied
  once and the weights stay tied; otherwise the adapted model has two different matrices, so the output head is
  written as a tensor of its own and ``tie_word_embeddings`` set to false. (PEFT's ``merge_and_unload`` adds both
  deltas to the shared weight, or one delta to both layers.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from torch import Tensor

from ...config import LoraConfig
from ...consumers.experts import peft_converts_experts
from ...engine.experts import split_experts
from ...engine.factors import LoraFactors, factor_shapes, lora_scale
from ...engine.lowrank import lowrank_svd
from ...errors import InputError, ShapeMismatchError, UnsupportedError, option
from ...io.adapter import TOKENS_PART, Adapter
from ...io.architecture import ModelDescription
from ...io.meta_facts import bias_flags
from ...io.checkpoint import Checkpoint
from ...modules import ModuleInfo
from ...targeting import select_parameters
from ..options import short_list
from .layout import ReplicatedCheckpoint, plan_token_rows
from .place import ExpertTarget, Placement, place_adapter

__all__ = ["FusePlan", "DroppedBias", "ExpertFactors", "plan_fuse"]

_TIED_SAME_RTOL = 1e-5  # ||dE - dH||_F <= this * ||dE||_F: the two sides of a tie get the same delta


@dataclass(frozen=True)
class DroppedBias:
    """A lora_B bias that could not be fused (its layer has no bias and the config cannot give it one)."""

    module: str
    norm: float  # ||scale * lora_B.bias||


@dataclass(frozen=True)
class ExpertFactors:
    """Every expert's LoRA on a 3-D expert tensor BASE stores whole (gpt-oss's ``(E, in, out)``): expert ``e`` gains
    ``scale * B[e] @ A[e]`` (its transpose when ``transposed``, :func:`lorasurg.engine.experts.merged_experts`)."""

    A: Tensor  # (E, r, in)
    B: Tensor  # (E, out, r)
    scale: float
    transposed: bool

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])


@dataclass
class FusePlan:
    """Everything ``fuse`` writes, by BASE tensor name.

    Attributes:
        factors: ``{module: LoraFactors}`` of every LoRA module, by checkpoint module name (an expert's key
            included; scale applied from the config).
        stacked: ``{BASE tensor name: ExpertFactors}`` for 3-D expert tensors BASE stores whole.
        sources: ``{module or tensor name: adapter module path}`` where the adapter names it otherwise.
        bias_of: ``{"<module>.bias": module}`` for LoRA modules with a lora_B bias and a bias in BASE.
        new_bias: ``{"<module>.weight": module}`` whose lora_B bias becomes a new ``<module>.bias``.
        zero_bias: ``{"<module>.weight": module}`` that get a zero ``<module>.bias`` (a flag gave them one).
        replace: ``{BASE tensor name: adapter tensor}`` (modules_to_save copies, saved biases, ...).
        untie: ``{canonical tensor: alias tensor}`` written separately (the alias's module is in ``module_of``).
        module_of: ``{tensor name: module}`` for the weights of LoRA modules (aliases included), the biases in
            ``bias_of`` and the tensors in ``replace``.
        config_updates: keys set in config.json (bias flags, ``tie_word_embeddings``, ``vocab_size``).
        dropped: lora_B biases left out (``drop_unfusable_bias``).
        notes: what the report should say.
        rows: ``{weight: (indices, rows, row count)}`` of trainable tokens (:func:`.layout.with_rows`).
    """

    factors: dict[str, LoraFactors] = field(default_factory=dict)
    stacked: dict[str, ExpertFactors] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    bias_of: dict[str, str] = field(default_factory=dict)
    new_bias: dict[str, str] = field(default_factory=dict)
    zero_bias: dict[str, str] = field(default_factory=dict)
    replace: dict[str, Tensor] = field(default_factory=dict)
    untie: dict[str, str] = field(default_factory=dict)
    module_of: dict[str, str] = field(default_factory=dict)
    config_updates: dict[str, object] = field(default_factory=dict)
    dropped: list[DroppedBias] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows: dict[str, tuple[Tensor, Tensor, int]] = field(default_factory=dict)


def plan_fuse(base: Checkpoint, adapter: Adapter, *, drop_unfusable_bias: bool = False) -> FusePlan:
    """Check ``adapter`` against ``base`` and decide every tensor written (see the module docstring).

    Raises:
        ShapeMismatchError: modules (or experts) BASE has no place for, or factors whose shapes do not fit BASE (all
            listed).
        InputError: adapter tensors BASE has no place for; lora_B biases the architecture cannot express (without
            ``drop_unfusable_bias``).
        UnsupportedError: LoRA on a grouped convolution or an nn.MultiheadAttention; a lora_B bias that needs a new
            bias together with replicated layers.
    """
    plan = FusePlan()
    aliases = base.tied_weights()
    model_type = (base.config or {}).get("model_type")
    description = base.describe()
    _refuse_unmergeable(adapter, description.modules)
    lora = Adapter(adapter.config, adapter.modules,  # trainable-token rows are placed by .layout
                   {k: v for k, v in adapter.extra.items() if not k.endswith(f".{TOKENS_PART}")})
    placement = place_adapter(description, lora, set(base.names()) | set(aliases), model_type)
    _factors(base, adapter, description.modules, placement, plan)
    _notes(description, placement, model_type, adapter.config, plan)
    _extras(base, placement, aliases, plan)
    plan.rows, updates, notes = plan_token_rows(base, adapter, aliases, description.checkpoint_module)
    plan.config_updates.update(updates)
    plan.notes.extend(notes)
    _biases(base, description.modules, plan, drop_unfusable_bias)
    _ties(base, aliases, plan)
    return plan


# ------------------------------------------------------------------------------------------------ steps


def _factors(base: Checkpoint, adapter: Adapter, modules: Mapping[str, ModuleInfo], placement: Placement,
             plan: FusePlan) -> None:
    """The factors of every placed LoRA path, by checkpoint module (experts split per key) or stored expert tensor;
    every path without a place or with shapes that do not fit BASE is listed and refused."""
    wrong: list[str] = []
    cfg = adapter.config
    for target in placement.modules:
        mod = adapter.modules[target.path]
        info = modules[target.module]
        if target.linear:  # a ParamWrapper on the 2-D weight of a module with no LoRA layer kind (a router)
            info = ModuleInfo(info.type_name, "linear", False, info.weight_shape, f"{target.module}.bias" in base)
        shape = tuple(info.weight_shape)
        want_A, want_B, out = factor_shapes(info.kind, shape, mod.rank, info.fan_in_fan_out)
        if mod.kind != info.kind or tuple(mod.A.shape) != want_A or tuple(mod.B.shape) != want_B:
            wrong.append(f"{target.path}: adapter A {tuple(mod.A.shape)}, B {tuple(mod.B.shape)} ({mod.kind}); "
                         f"BASE's {info.kind} weight {shape} needs A {want_A}, B {want_B}")
            continue
        if mod.magnitude is not None and mod.magnitude.numel() != out:
            wrong.append(f"{target.path}: DoRA magnitude has {mod.magnitude.numel()} entries; BASE's weight {shape} "
                         f"has {out} outputs")
            continue
        r, alpha = adapter.rank_alpha(target.rank_key)
        _add(plan, target.module, target.path, wrong,
             LoraFactors(info.kind, mod.A, mod.B, lora_scale(r, alpha, cfg.use_rslora), bias=mod.bias,
                         magnitude=mod.magnitude, fan_in_fan_out=info.fan_in_fan_out))
    for target in placement.experts:
        _expert_factors(adapter, target, plan, wrong)
    problems = []
    if placement.unplaced_modules:
        problems.append(f"modules not in BASE ({len(placement.unplaced_modules)}): "
                        + short_list(placement.unplaced_modules))
    if wrong:
        problems.append(f"shapes that do not fit BASE ({len(wrong)}):\n    " + "\n    ".join(wrong[:20])
                        + (f"\n    ... and {len(wrong) - 20} more" if len(wrong) > 20 else ""))
    if problems:
        raise ShapeMismatchError(
            f"adapter does not fit BASE {base.source}:\n  - " + "\n  - ".join(problems)
            + "\nIt was trained for another base model (fuse it into the model it was trained on), or names modules "
            "otherwise than PEFT does (see each module)."
        )


def _add(plan: FusePlan, module: str, path: str, wrong: list[str], factors: LoraFactors) -> None:
    """Record ``module``'s factors (from adapter path ``path``); a module placed twice is a problem."""
    if module in plan.factors:
        wrong.append(f"{path}: BASE's {module} gets a LoRA from {plan.sources.get(module, module)} too; an adapter "
                     "holds one LoRA per module")
        return
    plan.factors[module] = factors
    plan.module_of[f"{module}.weight"] = module
    if path != module:
        plan.sources[module] = path


def _expert_factors(adapter: Adapter, target: ExpertTarget, plan: FusePlan, wrong: list[str]) -> None:
    """A ``target_parameters`` LoRA on a 3-D expert parameter: per expert ``(A_e, B_e)`` from PEFT's layout, each
    expert's delta to the per-expert keys holding it (rows ``slot.rows`` of ``B_e``), or to BASE's stored tensor."""
    mod, p = adapter.modules[target.path], target.parameter
    experts, in_f, out_f = p.experts, p.in_features, p.out_features
    rows = mod.A.shape[0]
    if mod.embedding or mod.A.dim() != 2 or mod.B.dim() != 2 or rows % experts or tuple(mod.A.shape) != (
            rows, in_f) or tuple(mod.B.shape) != (out_f, rows):
        wrong.append(f"{target.path}: adapter A {tuple(mod.A.shape)}, B {tuple(mod.B.shape)}; BASE's {p.name} "
                     f"{p.shape} ({experts} experts, in {in_f}, out {out_f}) needs A (r*{experts}, {in_f}), "
                     f"B ({out_f}, r*{experts})")
        return
    if mod.bias is not None or mod.magnitude is not None:
        wrong.append(f"{target.path}: a lora_B bias or DoRA magnitude on expert parameter {p.name} (PEFT's "
                     "ParamWrapper has neither)")
        return
    if p.transposed and p.stored is None:
        wrong.append(f"{target.path}: {p.name} is stored (experts, in, out) but held per expert in BASE; lorasurg "
                     "does not map that layout")
        return
    A, B = split_experts(mod.A, mod.B, experts)  # (E, r, in), (E, out, r)
    r, alpha = adapter.rank_alpha(p.name)  # PEFT looks a wrapper's rank up by the parameter's name
    scale = lora_scale(r, alpha, adapter.config.use_rslora)
    if p.stored is not None:
        plan.stacked[p.stored] = ExpertFactors(A, B, scale, p.transposed)
        plan.sources[p.stored] = target.path
        return
    for module, slot in target.slots:
        start, stop = slot.rows
        _add(plan, module, target.path, wrong, LoraFactors("linear", A[slot.expert], B[slot.expert, start:stop], scale))


def _notes(description: ModelDescription, placement: Placement, model_type: Optional[str], config: LoraConfig,
           plan: FusePlan) -> None:
    """Where PEFT 0.21.2 reads this adapter otherwise than it is written (measured; fuse follows the adapter)."""
    rslora = config.use_rslora
    if placement.renamed:
        plan.notes.append(f"{len(placement.renamed)} LoRA module(s) named as BASE's checkpoint names them, renamed as "
                          f"PEFT renames them on transformers 5: {short_list(placement.renamed)}")
    experts = [t for t in placement.modules if t.module in description.experts]
    listed = set(select_parameters(config, {description.experts[t.module].parameter for t in experts}))
    per_expert = [t.path for t in experts if description.experts[t.module].parameter not in listed]  # else converted
    if per_expert and not peft_converts_experts(model_type):
        plan.notes.append(
            f"{len(per_expert)} per-expert LoRA module(s) ({short_list(per_expert)}): PEFT 0.21.2 does not load "
            f"per-expert keys on {model_type} (it ignores them); fused as the adapter defines them")
    fused_parts = [t.path for t in placement.modules if t.module in description.experts
                   and description.experts[t.module].parts > 1]
    if fused_parts and rslora and peft_converts_experts(model_type):
        plan.notes.append(
            f"rsLoRA on {len(fused_parts)} per-expert gate/up module(s) ({short_list(fused_parts)}): PEFT 0.21.2's "
            "conversion reads them fused at rank 2r and alpha 2 lora_alpha, a scale sqrt(2) times the adapter's; "
            "fused at the adapter's own scale alpha / sqrt(r)")


def _refuse_unmergeable(adapter: Adapter, modules: Mapping[str, ModuleInfo]) -> None:
    """LoRA that no weight of BASE can hold: on a grouped convolution (a dense delta), on an nn.MultiheadAttention."""
    grouped = [n for n, m in adapter.modules.items() if m.groups > 1]
    attention = [n for n in adapter.modules if n.endswith(".base_layer.out_proj")
                 or getattr(modules.get(n), "type_name", None) == "MultiheadAttention"]
    if grouped:
        raise UnsupportedError(
            f"the adapter has LoRA on grouped convolutions ({short_list(grouped)}): its delta reaches every input "
            "channel, which a grouped weight cannot hold, so it cannot be fused (PEFT cannot merge it either). Keep "
            "the adapter unfused")
    if attention:
        raise UnsupportedError(
            f"the adapter has LoRA on nn.MultiheadAttention ({short_list(attention)}), which fuse does not write "
            "yet; merge it at runtime (lorasurg.merge_and_unload) and save that model")


def _extras(base: Checkpoint, placement: Placement, aliases: Mapping[str, str], plan: FusePlan) -> None:
    """Non-LoRA adapter tensors replace the BASE tensor holding them (see :mod:`.place`)."""
    wrong = []
    for name, (key, tensor) in placement.saved.items():
        stored = tuple(base.shape(aliases.get(name, name)))
        if tuple(tensor.shape) != stored:
            wrong.append(f"{key}: adapter {tuple(tensor.shape)}, BASE {stored}" + (f" ({name})" if name != key else ""))
            continue
        plan.replace[name] = tensor
        plan.module_of.setdefault(name, name.rsplit(".", 1)[0])
    unplaced = placement.unplaced_tensors
    if unplaced or wrong:
        parts = ([f"tensors BASE has no place for: {short_list(unplaced)}"] if unplaced else []) + (
            [f"shapes that differ from BASE: {short_list(wrong)}"] if wrong else [])
        raise InputError(
            f"adapter's saved tensors (modules_to_save, biases) do not fit BASE {base.source}: " + "; ".join(parts)
            + ". It was saved for another base model, or for a task head BASE lacks"
        )
    saved = sorted({plan.module_of[n] for n in plan.replace})
    if saved:
        plan.notes.append(f"{len(plan.replace)} tensor(s) replaced by the adapter's saved copies "
                          f"(modules_to_save / saved biases): {short_list(saved)}")


def _biases(base: Checkpoint, modules: Mapping[str, ModuleInfo], plan: FusePlan, drop: bool) -> None:
    """Place every lora_B bias: into BASE's bias, into a bias a config flag creates, or dropped (listed)."""
    needing: dict[str, float] = {}
    for name, f in plan.factors.items():
        if f.bias is None:
            continue
        if f"{name}.bias" in base:
            plan.bias_of[f"{name}.bias"] = name
            plan.module_of[f"{name}.bias"] = name
        elif bool(torch.any(f.bias != 0)):
            needing[name] = float(torch.linalg.vector_norm(f.bias.double())) * f.scale
    if not needing:
        return
    if isinstance(base, ReplicatedCheckpoint):
        raise UnsupportedError(
            f"the adapter has a lora_B bias on {len(needing)} layer(s) without a bias in BASE "
            f"({short_list(list(needing))}) and replicates layers; fusing that is not supported: keep the adapter "
            "unfused")
    flags = bias_flags(base.config, {n: base.shape(n) for n in base.names()})
    chosen: dict[str, frozenset[str]] = {}
    unfusable = []
    for name in needing:
        flag = next((k for k in sorted(flags) if name in flags[k]), None)
        if flag is None:
            unfusable.append(name)
        else:
            chosen[flag] = flags[flag]
    if unfusable and not drop:
        arch = (base.config or {}).get("model_type", "this architecture")
        listing = ", ".join(f"{m} (||scale * lora_B.bias|| = {needing[m]:.4g})" for m in unfusable)
        hint = f" (its config can add biases only through {', '.join(sorted(flags))})" if flags else ""
        raise InputError(
            f"the adapter has a lora_B bias on {len(unfusable)} layer(s) that have no bias in BASE, and {arch}"
            f"{hint} cannot give them one: {listing}. Nothing was written. Drop those biases with "
            f"{option('--drop-unfusable-bias', 'drop_unfusable_bias=True')} (the output then differs from the adapted "
            "model by them), or keep the adapter unfused and load it with PEFT"
        )
    for name in unfusable:
        plan.dropped.append(DroppedBias(name, needing[name]))
        plan.factors[name] = _without_bias(plan.factors[name])
    for name in needing:
        if name not in unfusable:
            plan.new_bias[f"{name}.weight"] = name
    for flag, governed in chosen.items():
        plan.config_updates[flag] = True
        for name in governed:
            weight = f"{name}.weight"
            if f"{name}.bias" not in base and weight not in plan.new_bias and weight in base:
                plan.zero_bias[weight] = name
        plan.notes.append(f"config.json: {flag} = true, so {len(governed)} layer(s) have a bias: "
                          f"{len([m for m in needing if m in governed])} get the adapter's lora_B bias, "
                          f"{len([w for w, m in plan.zero_bias.items() if m in governed])} a zero bias")
    if plan.dropped:
        plan.notes.append(f"dropped {len(plan.dropped)} lora_B bias(es) the architecture cannot express "
                          f"(--drop-unfusable-bias): " + ", ".join(f"{d.module} (norm {d.norm:.4g})" for d in plan.dropped))


def _without_bias(f: LoraFactors) -> LoraFactors:
    return LoraFactors(f.kind, f.A, f.B, f.scale, bias=None, magnitude=f.magnitude, fan_in_fan_out=f.fan_in_fan_out)


def _ties(base: Checkpoint, aliases: Mapping[str, str], plan: FusePlan) -> None:
    """Keep each tie when both sides change alike; else write the alias as its own tensor and untie."""
    for alias, canonical in aliases.items():
        a_mod, c_mod = alias.rsplit(".", 1)[0], canonical.rsplit(".", 1)[0]
        if canonical in plan.rows and alias not in plan.rows:
            plan.rows[alias] = plan.rows[canonical]  # PEFT ties the head's trainable tokens to the embedding's
        a_touched = alias in plan.module_of or alias in plan.replace or alias in plan.rows
        c_touched = canonical in plan.module_of or canonical in plan.replace or canonical in plan.rows
        if not (a_touched or c_touched):
            continue
        if _same_change(plan, alias, canonical, a_mod, c_mod):
            plan.notes.append(f"{alias} is tied to {canonical} and both get the same change: applied once, still tied")
            continue
        plan.config_updates["tie_word_embeddings"] = False
        if alias not in base:
            plan.untie[canonical] = alias
        plan.notes.append(
            f"{alias} is tied to {canonical} but the adapter changes them differently: written as separate tensors "
            "and tie_word_embeddings set to false (PEFT's merge_and_unload would change the shared weight for both)"
        )


def _same_change(plan: FusePlan, alias: str, canonical: str, a_mod: str, c_mod: str) -> bool:
    fa, fc = plan.factors.get(a_mod), plan.factors.get(c_mod)
    ra, rc = plan.replace.get(alias), plan.replace.get(canonical)
    if (ra is None) != (rc is None) or (ra is not None and not torch.equal(ra, rc)):
        return False
    ta, tc = plan.rows.get(alias), plan.rows.get(canonical)
    if (ta is None) != (tc is None) or (ta is not None and ta is not tc and not all(
            torch.equal(x, y) if isinstance(x, Tensor) else x == y for x, y in zip(ta, tc))):
        return False
    if fa is None or fc is None:
        return fa is None and fc is None
    if fa.magnitude is not None or fc.magnitude is not None or fa.bias is not None or fc.bias is not None:
        return False
    terms = [_weight_term(fc), _weight_term(fa, sign=-1.0)]
    if terms[0][1].shape[0] != terms[1][1].shape[0] or terms[0][2].shape[1] != terms[1][2].shape[1]:
        return False
    diff = float(torch.linalg.vector_norm(lowrank_svd(terms).S))
    ref = float(torch.linalg.vector_norm(lowrank_svd(terms[:1]).S))
    return diff <= _TIED_SAME_RTOL * max(ref, 1e-30)


def _weight_term(f: LoraFactors, sign: float = 1.0) -> tuple[float, Tensor, Tensor]:
    """``(scale, B, A)`` whose product is the delta in the *stored* weight layout ``(rows, cols)``: the matrix view
    of an embedding (or a fan_in_fan_out linear) is the transpose of its weight, so its term is ``(A.T, B.T)``."""
    if f.kind == "embedding" or f.fan_in_fan_out:
        return sign * f.scale, f.A.T, f.B.T  # (num, r), (r, dim): delta weight (num, dim)
    return sign * f.scale, f.B.reshape(f.B.shape[0], -1), f.A.reshape(f.A.shape[0], -1)  # (out, r), (r, in)
