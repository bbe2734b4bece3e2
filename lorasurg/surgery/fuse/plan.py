"""What ``fuse`` will write, decided and checked before any tensor is read or any file written.

An adapter is matched against BASE module by module:

* every LoRA module must be a module of BASE, of the kind its tensors are shaped for, and its ``lora_A``/``lora_B``
  must have the shapes BASE's weight needs (else the adapter was trained for another base: every such module is
  named with both shapes);
* every other tensor of the adapter is a module's own tensor (``modules_to_save``: ``<module>.weight``,
  ``<module>.bias``; a targeted embedding's ``<module>.base_layer.weight``; the biases PEFT saves for
  ``bias="all"``/``"lora_only"``, ``<module>.base_layer.bias``) and replaces BASE's tensor of that name and shape;
  trainable-token rows are written into their rows, and replicated layers written out one copy each
  (:mod:`.layout`);
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

import difflib
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from torch import Tensor

from ...engine.factors import LoraFactors, factor_shapes, lora_scale
from ...engine.lowrank import lowrank_svd
from ...errors import InputError, ShapeMismatchError, UnsupportedError
from ...io.adapter import TOKENS_PART, Adapter
from ...io.meta_facts import bias_flags
from ...io.checkpoint import Checkpoint
from ...modules import ModuleInfo
from ...layer_replication import LayerStack
from ..options import short_list
from .layout import plan_copies, plan_token_rows, replicated_stack

__all__ = ["FusePlan", "DroppedBias", "plan_fuse"]

_TIED_SAME_RTOL = 1e-5  # ||dE - dH||_F <= this * ||dE||_F: the two sides of a tie get the same delta


@dataclass(frozen=True)
class DroppedBias:
    """A lora_B bias that could not be fused (its layer has no bias and the config cannot give it one)."""

    module: str
    norm: float  # ||scale * lora_B.bias||


@dataclass
class FusePlan:
    """Everything ``fuse`` writes, by BASE tensor name.

    Attributes:
        factors: ``{module: LoraFactors}`` of every LoRA module (scale applied from the config).
        bias_of: ``{"<module>.bias": module}`` for LoRA modules with a lora_B bias and a bias in BASE.
        new_bias: ``{"<module>.weight": module}`` whose lora_B bias becomes a new ``<module>.bias``.
        zero_bias: ``{"<module>.weight": module}`` that get a zero ``<module>.bias`` (a flag gave them one).
        replace: ``{BASE tensor name: adapter tensor}`` (modules_to_save copies, saved biases, ...).
        untie: ``{canonical tensor: alias tensor}`` written separately (the alias's module is in ``module_of``).
        module_of: ``{tensor name: module}`` for the weights of LoRA modules (aliases included), the biases in
            ``bias_of`` and the tensors in ``replace``.
        config_updates: keys set in config.json (bias flags, ``tie_word_embeddings``, ``vocab_size``,
            ``num_hidden_layers``).
        dropped: lora_B biases left out (``drop_unfusable_bias``).
        notes: what the report should say.
        rows: ``{weight: (indices, rows, row count)}`` of trainable tokens (:func:`.layout.with_rows`).
        copies: ``{BASE tensor: output names}`` of the tensors of a replicated stack (``layer_replication``).
        stack: the replicated stack, or None.
    """

    factors: dict[str, LoraFactors] = field(default_factory=dict)
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
    copies: dict[str, list[str]] = field(default_factory=dict)
    stack: Optional[LayerStack] = None

    def base_name(self, name: str) -> str:
        """BASE's name of an adapter module or output tensor (a replicated layer: the layer it copies)."""
        return self.stack.source_of(name) if self.stack is not None else name

    def outputs(self, name: str) -> list[str]:
        """The tensors written for BASE tensor ``name``: itself, its copies in a replicated stack, or none."""
        return self.copies.get(name, [name])


def plan_fuse(base: Checkpoint, adapter: Adapter, *, drop_unfusable_bias: bool = False) -> FusePlan:
    """Check ``adapter`` against ``base`` and decide every tensor written (see the module docstring).

    Raises:
        ShapeMismatchError: modules missing from BASE, or factors whose shapes do not fit BASE (all listed).
        InputError: adapter tensors BASE has no place for; lora_B biases the architecture cannot express (without
            ``drop_unfusable_bias``).
        UnsupportedError: a lora_B bias that needs a new bias together with replicated layers.
    """
    plan = FusePlan(stack=replicated_stack(base, adapter))
    modules = base.module_infos()
    aliases = base.tied_weights()
    if plan.stack is not None:
        plan.copies, updates = plan_copies(base, plan.stack)
        plan.config_updates.update(updates)
        plan.notes.append(f"layer_replication={adapter.config.layer_replication}: {plan.stack.prefix} written as "
                          f"{len(plan.stack.sources)} layers (from {plan.stack.count}), each copy with its own merge")
    _factors(base, adapter, modules, aliases, plan)
    _extras(base, adapter, aliases, plan)
    plan.rows, updates, notes = plan_token_rows(base, adapter, aliases, plan.base_name)
    plan.config_updates.update(updates)
    plan.notes.extend(notes)
    _biases(base, modules, plan, drop_unfusable_bias)
    _ties(base, aliases, plan)
    return plan


# ------------------------------------------------------------------------------------------------ steps


def _factors(base: Checkpoint, adapter: Adapter, modules: Mapping[str, ModuleInfo], aliases: Mapping[str, str],
             plan: FusePlan) -> None:
    missing, wrong = [], []
    cfg = adapter.config
    _refuse_unmergeable(adapter, modules, plan)
    for name, mod in adapter.modules.items():
        info = modules.get(plan.base_name(name))
        weight = f"{name}.weight"
        stored = plan.base_name(weight)
        if info is None or info.kind is None or (stored not in base and stored not in aliases):
            near = difflib.get_close_matches(name, list(modules), n=2, cutoff=0.6)
            missing.append(f"{name}" + (f" (nearest in BASE: {', '.join(near)})" if near else ""))
            continue
        r, alpha = adapter.rank_alpha(name)
        shape = tuple(info.weight_shape)
        want_A, want_B, out = factor_shapes(info.kind, shape, mod.rank, info.fan_in_fan_out)
        got_kind = mod.kind
        if got_kind != info.kind or tuple(mod.A.shape) != want_A or tuple(mod.B.shape) != want_B:
            wrong.append(f"{name}: adapter A {tuple(mod.A.shape)}, B {tuple(mod.B.shape)} ({got_kind}); BASE's "
                         f"{info.kind} weight {shape} needs A {want_A}, B {want_B}")
            continue
        if mod.magnitude is not None and mod.magnitude.numel() != out:
            wrong.append(f"{name}: DoRA magnitude has {mod.magnitude.numel()} entries; BASE's weight {shape} has "
                         f"{out} outputs")
            continue
        plan.factors[name] = LoraFactors(info.kind, mod.A, mod.B, lora_scale(r, alpha, cfg.use_rslora), bias=mod.bias,
                                         magnitude=mod.magnitude, fan_in_fan_out=info.fan_in_fan_out)
        plan.module_of[weight] = name
    problems = []
    if missing:
        problems.append(f"modules not in BASE ({len(missing)}): {short_list(missing)}")
    if wrong:
        problems.append(f"shapes that do not fit BASE ({len(wrong)}):\n    " + "\n    ".join(wrong[:20])
                        + (f"\n    ... and {len(wrong) - 20} more" if len(wrong) > 20 else ""))
    if problems:
        raise ShapeMismatchError(
            f"adapter does not fit BASE {base.source}:\n  - " + "\n  - ".join(problems)
            + "\nIt was trained for another base model: fuse it into the model it was trained on."
        )


def _refuse_unmergeable(adapter: Adapter, modules: Mapping[str, ModuleInfo], plan: FusePlan) -> None:
    """LoRA that no weight of BASE can hold: on a grouped convolution (a dense delta), on an nn.MultiheadAttention."""
    grouped = [n for n, m in adapter.modules.items() if m.groups > 1]
    attention = [n for n in adapter.modules if n.endswith(".base_layer.out_proj") or getattr(
        modules.get(plan.base_name(n)), "type_name", None) == "MultiheadAttention"]
    if grouped:
        raise UnsupportedError(
            f"the adapter has LoRA on grouped convolutions ({short_list(grouped)}): its delta reaches every input "
            "channel, which a grouped weight cannot hold, so it cannot be fused (PEFT cannot merge it either). Keep "
            "the adapter unfused")
    if attention:
        raise UnsupportedError(
            f"the adapter has LoRA on nn.MultiheadAttention ({short_list(attention)}), which fuse does not write yet; "
            "merge it at runtime (lorasurg.merge_and_unload) and save that model")


def _extras(base: Checkpoint, adapter: Adapter, aliases: Mapping[str, str], plan: FusePlan) -> None:
    """Non-LoRA adapter tensors replace BASE's tensor of the same name (``.base_layer`` removed); trainable-token
    rows are :func:`.layout.plan_token_rows`'s."""
    unplaced, wrong = [], []
    for key, tensor in adapter.extra.items():
        if key.endswith(f".{TOKENS_PART}"):
            continue
        name = key.replace(".base_layer.", ".")
        source = plan.base_name(name)
        if source not in base and source not in aliases:
            unplaced.append(key)
            continue
        stored = tuple(base.shape(aliases.get(source, source)))
        if tuple(tensor.shape) != stored:
            wrong.append(f"{key}: adapter {tuple(tensor.shape)}, BASE {stored}")
            continue
        plan.replace[name] = tensor
        plan.module_of.setdefault(name, name.rsplit(".", 1)[0])
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
        if plan.base_name(f"{name}.bias") in base:
            plan.bias_of[f"{name}.bias"] = name
            plan.module_of[f"{name}.bias"] = name
        elif bool(torch.any(f.bias != 0)):
            needing[name] = float(torch.linalg.vector_norm(f.bias.double())) * f.scale
    if not needing:
        return
    if plan.stack is not None:
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
            "--drop-unfusable-bias (drop_unfusable_bias=True; the output then differs from the adapted model by "
            "them), or keep the adapter unfused and load it with PEFT"
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
    if (ta is None) != (tc is None) or (ta is not None and (ta is not tc and not all(
            torch.equal(x, y) if isinstance(x, Tensor) else x == y for x, y in zip(ta, tc)))):
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
