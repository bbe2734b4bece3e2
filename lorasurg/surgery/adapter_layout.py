"""Per-module LoRA factors of a checkpoint, laid out as the adapter PEFT loads on the model transformers builds.

Commands that compute factors from a checkpoint (extract, residualize) work in the checkpoint's names: one factor
pair per checkpoint module, experts included (``mlp.experts.3.gate_proj``), see
:class:`~lorasurg.io.architecture.ModelDescription`. :func:`peft_layout` turns them into the adapter's modules and
config fields, following PEFT 0.21.2 on transformers 5 (:mod:`lorasurg.consumers.experts`):

* plain modules are keyed by the model's names (Qwen2-VL's ``model.language_model.layers.0.mlp.up_proj``);
* experts take one of two forms (``form``):

  - ``per-expert`` (default where PEFT converts it: Mixtral, Qwen3-MoE, DeepSeek-V3, ...): one module per expert
    under the checkpoint's names. Every expert of every MoE layer of an adapted projection is present — an expert
    without factors gets zero factors, since PEFT adapts every layer's fused parameter and would otherwise miss
    keys —, every projection of such a layer is (gate and up adapted without down load with missing keys: a
    projection without factors is zero), and every expert is at the
    config's global ``r`` and ``lora_alpha``: lower ranks are zero-padded (exact), other scales folded into ``B``
    (exact to rounding). Plain layers whose leaf name PEFT's conversion would take for an expert projection
    (DeepSeek-V3's dense ``mlp.gate_proj``, a ``shared_experts.up_proj``) are listed in ``target_parameters`` as
    ``"<module>.weight"``, which PEFT adapts as it adapts a linear layer;
  - ``target-parameters`` (where PEFT does not convert, Qwen2-MoE, and where the checkpoint stores experts fused,
    gpt-oss): one LoRA per fused parameter in PEFT's ``ParamWrapper`` layout (:mod:`lorasurg.engine.experts`): the
    parts of a ``gate_up_proj`` stacked block-diagonally, every expert present (zero where it has no factors), one
    rank for the whole parameter (zero-padded), keyed by :func:`~lorasurg.io.adapter.wrapper_paths`.

Every change that costs bytes or rounding is said in ``notes``. What PEFT cannot load in the chosen form is
refused (:class:`~lorasurg.errors.UnsupportedError`): a ``target_parameters`` LoRA with ``lora_bias``, DoRA or
``fan_in_fan_out`` — per-expert experts included, which PEFT converts to ``target_parameters`` when it loads them
(:func:`parameter_targets` says, before any factor exists, which parameters an adapter of given modules needs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..consumers.experts import CONVERTED_NAMES, PEFT_MOE_SOURCE, peft_conversion_pattern, peft_converts_experts
from ..engine.experts import join_experts, stack_parts
from ..engine.factors import lora_scale
from ..errors import UnsupportedError
from ..io.adapter import AdapterModule, wrapper_paths
from ..io.architecture import ModelDescription
from ..io.keymap import ExpertSlot
from ..targeting import alpha_value, anchored_pattern_key, exact_target_modules, rank_alpha_fields
from .options import short_list

_short = functools.partial(short_list, limit=3)  # a, b, c and N more

__all__ = ["FORMS", "ExpertStack", "PeftLayout", "peft_layout", "expert_form", "parameter_targets",
           "model_tensor_name"]

FORMS = ("per-expert", "target-parameters")


@dataclass
class ExpertStack:
    """Factors of every expert of one fused parameter whose checkpoint stores it fused (gpt-oss).

    Attributes:
        A: ``(E, r, in)``; B: ``(E, out, r)`` (:func:`lorasurg.engine.experts.expert_deltas` gives the delta).
        rank, alpha: the LoRA rank per expert and its alpha.
    """

    A: Tensor
    B: Tensor
    rank: int
    alpha: float


@dataclass
class PeftLayout:
    """What :func:`peft_layout` gives: the adapter's modules, its saved extras and its config fields.

    Attributes:
        modules: ``{PEFT module path: AdapterModule}`` (the path is the adapter key's module part).
        extra: ``{model tensor name: tensor}`` (``modules_to_save`` copies, renamed).
        fields: ``target_modules``, ``target_parameters``, ``modules_to_save``, ``r``, ``lora_alpha``,
            ``rank_pattern``, ``alpha_pattern`` for :class:`~lorasurg.config.LoraConfig`.
        form: the experts' form (:data:`FORMS`), None without experts.
        notes: what was zero-filled, padded, rescaled or moved to ``target_parameters``, one line each.
        sources: ``{PEFT module path: [checkpoint modules]}`` for paths that are not one checkpoint module renamed
            (fused parameters; zero-filled experts have an empty list).
    """

    modules: dict[str, AdapterModule]
    extra: dict[str, Tensor]
    fields: dict
    form: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    sources: dict[str, list[str]] = field(default_factory=dict)


def expert_form(description: ModelDescription, model_type: Optional[str], stacks: Mapping[str, object] = ()) -> str:
    """The form PEFT 0.21.2 loads experts of this model in: ``per-expert`` where it converts such adapters and the
    checkpoint stores experts one by one, else ``target-parameters``."""
    if stacks or any(p.stored for p in description.parameters.values()):
        return "target-parameters"
    return "per-expert" if peft_converts_experts(model_type) else "target-parameters"


def form_for_consumers(description: ModelDescription, consumers: Sequence[str]) -> Optional[str]:
    """``per-expert`` when a consumer other than PEFT is named and the checkpoint stores experts one by one: the form
    vLLM and llama.cpp read, which PEFT reads too (in the converted config where it does not convert the config,
    :func:`_converted_form`); else None, PEFT's own choice (:func:`expert_form`)."""
    if any(c != "peft" for c in consumers) and description.experts and not any(
            p.stored for p in description.parameters.values()):
        return "per-expert"
    return None


def parameter_targets(description: ModelDescription, modules: Sequence[str], *, model_type: Optional[str],
                      form: Optional[str] = None) -> list[str]:
    """The model parameters PEFT 0.21.2 adapts through its ``ParamWrapper`` (``target_parameters``, given or made by
    its conversion of per-expert keys) in an adapter of ``modules`` (checkpoint modules, experts included, and keys of
    expert parameters the checkpoint stores fused), as :func:`peft_layout` would lay it out; empty when none."""
    stored = {p.stored: p.name for p in description.parameters.values() if p.stored}
    form = form or expert_form(description, model_type, [m for m in modules if m in stored])
    fused = {description.experts[m].parameter for m in modules if m in description.experts}
    fused |= {stored[m] for m in modules if m in stored}
    plain = [description.model_name(m) for m in modules if m not in description.experts and m not in stored]
    return sorted(fused) + sorted(f"{name}.weight" for name in plain if _moved_by_conversion(name, model_type))


def _moved_by_conversion(name: str, model_type: Optional[str]) -> bool:
    """Whether PEFT's MoE conversion takes the plain layer ``name`` (model name) for an expert projection, so that it
    must be listed in ``target_parameters`` to be adapted. PEFT converts every config of such a model type by leaf
    name, whatever form its experts (if any) take."""
    converted = CONVERTED_NAMES.get(peft_conversion_pattern(model_type) or "", frozenset())
    return name.rsplit(".", 1)[-1] in converted


def peft_layout(
    description: ModelDescription,
    factors: Mapping[str, AdapterModule],
    ranks: Mapping[str, tuple[int, float]],
    *,
    model_type: Optional[str],
    stacks: Optional[Mapping[str, ExpertStack]] = None,
    extra: Optional[Mapping[str, Tensor]] = None,
    modules_to_save: Sequence[str] = (),
    use_rslora: bool = False,
    refused: Sequence[str] = (),
    form: Optional[str] = None,
) -> PeftLayout:
    """Lay out ``factors`` (``{checkpoint module: AdapterModule}``, each at ``ranks[module] = (r, alpha)``) and
    ``stacks`` (``{fused parameter: ExpertStack}``) as the adapter PEFT loads (module docstring).

    Args:
        description: the base checkpoint's description.
        model_type: the checkpoint's ``model_type`` (which PEFT rule applies).
        extra: ``{checkpoint tensor key: tensor}`` saved whole; ``modules_to_save``: their checkpoint modules.
        use_rslora: scales are ``alpha / sqrt(r)``.
        refused: the config's features a ``target_parameters`` LoRA cannot have that this adapter uses
            (``lora_bias``, ``use_dora``, ...; :data:`~lorasurg.consumers.experts.PARAM_WRAPPER_REFUSES`).
        form: force the experts' form; default :func:`expert_form`.

    Raises:
        UnsupportedError: ``target_parameters`` are needed together with a ``refused`` feature.
    """
    stacks = dict(stacks or {})
    form = form or expert_form(description, model_type, stacks)
    experts = {m: description.experts[m] for m in factors if m in description.experts}
    plain = {m: f for m, f in factors.items() if m not in experts}
    layout = PeftLayout({}, {}, {}, form if (experts or stacks) else None)
    per_module: dict[str, tuple[int, float]] = {}
    parameters: list[str] = []
    for module, mod in plain.items():
        name = description.model_name(module)
        layout.modules[name] = _renamed(mod, name)
        if _moved_by_conversion(name, model_type):  # PEFT converts by name, experts or not
            parameters.append(f"{name}.weight")
            per_module[f"{name}.weight"] = ranks[module]  # PEFT looks a parameter's rank up by its own name
        else:
            per_module[name] = ranks[module]
    if parameters:
        layout.notes.append(
            f"{len(parameters)} linear layer(s) share a name PEFT's MoE conversion takes for an expert projection "
            f"({_short(parameters)}): listed in target_parameters, which PEFT adapts as the linear layer "
            f"({PEFT_MOE_SOURCE})")
    globals_: Optional[tuple[int, float]] = None
    if experts and form == "per-expert":
        globals_ = _per_expert(layout, description, experts, factors, ranks, per_module, use_rslora)
        if not peft_converts_experts(model_type):
            parameters += _converted_form(layout, description, globals_, per_module)
    elif experts or stacks:
        parameters += _fused(layout, description, experts, factors, ranks, stacks, per_module, use_rslora)
    wrapped = parameters + sorted({s.parameter for s in experts.values()} if form == "per-expert" else ())
    if wrapped and refused:
        raise UnsupportedError(
            f"this adapter needs target_parameters ({_short(wrapped)}; PEFT converts per-expert LoRA to them), which "
            f"PEFT cannot combine with "
            f"{', '.join(refused)} (its ParamWrapper refuses them); leave those out (e.g. --no-lora-bias) or "
            "exclude these modules")
    target_names = [n for n in layout.modules if (n not in layout.sources or n in description.experts)
                    and f"{n}.weight" not in parameters]
    fields = rank_alpha_fields(per_module, base=globals_) if per_module else {}
    fields["target_modules"] = exact_target_modules(target_names, description.all_module_names()) if target_names \
        else None
    fields["target_parameters"] = sorted(parameters) or None
    layout.extra = {model_tensor_name(description, k): v for k, v in (extra or {}).items()}
    fields["modules_to_save"] = sorted(description.model_name(m) for m in modules_to_save) or None
    layout.fields = fields
    return layout


def _renamed(mod: AdapterModule, name: str) -> AdapterModule:
    return AdapterModule(name, mod.A, mod.B, mod.bias, mod.magnitude, mod.embedding)


def model_tensor_name(description: ModelDescription, key: str) -> str:
    """The model's name of checkpoint tensor ``key`` (its module renamed): how a saved copy is keyed."""
    module, _, leaf = key.rpartition(".")
    return f"{description.model_name(module)}.{leaf}" if module else key


def _groups(description: ModelDescription, parameters: Sequence[str]) -> dict[tuple[str, int], dict[int, str]]:
    """``{(fused parameter, part): {expert: checkpoint module}}`` for every expert of the given parameters."""
    groups: dict[tuple[str, int], dict[int, str]] = {}
    for module, slot in description.experts.items():
        if slot.parameter in parameters:
            groups.setdefault((slot.parameter, slot.part), {})[slot.expert] = module
    return groups


def _expert_matrix_shape(description: ModelDescription, module: str) -> tuple[int, int]:
    out_f, in_f = description.modules[module].weight_shape
    return int(out_f), int(in_f)


def _padded(mod: Optional[AdapterModule], rank: int, shape: tuple[int, int], dtype: torch.dtype,
            factor: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(A (rank, in), B (out, rank))``: the module's factors, zero-padded to ``rank``, ``B`` times ``factor``; zero
    factors for a missing module (on the module's device: a probe on the meta device stays there)."""
    out_f, in_f = shape
    device = mod.A.device if mod is not None else None
    A = torch.zeros(rank, in_f, dtype=dtype, device=device)
    B = torch.zeros(out_f, rank, dtype=dtype, device=device)
    if mod is not None:
        r = mod.A.shape[0]
        A[:r] = mod.A.to(dtype)
        B[:, :r] = (mod.B.to(torch.float32) * factor).to(dtype) if factor != 1.0 else mod.B.to(dtype)
    return A, B


def _converted_form(layout: PeftLayout, description: ModelDescription, globals_: tuple[int, float],
                    per_module: dict[str, tuple[int, float]]) -> list[str]:
    """Per-expert LoRA on a model type PEFT 0.21.2 converts the keys of but not the config (Qwen2-MoE): the config in
    the form its conversion would give, so that PEFT loads the experts as vLLM and llama.cpp do (they read the keys
    and ignore ``target_parameters``): each fused parameter in ``target_parameters`` at ``parts * r`` and
    ``parts * lora_alpha`` (a fused ``gate_up_proj`` stacks two rank-``r`` LoRAs per expert, so its scale is the
    experts' ``lora_alpha / r``). Returns the parameters."""
    rank, alpha = globals_
    parts = {slot.parameter: slot.parts for module, slot in description.experts.items() if module in layout.modules}
    for parameter, n in sorted(parts.items()):
        per_module[parameter] = (n * rank, alpha_value(n * alpha))
    layout.notes.append(
        f"PEFT 0.21.2 converts the keys of per-expert LoRA for this model type but not its config: the config lists "
        f"the {len(parts)} fused expert parameter(s) in target_parameters as its conversion would "
        f"({_short(sorted(parts))}), so PEFT loads the experts too; vLLM counts their rank "
        f"{max(parts.values()) * rank} against --max-lora-rank ({PEFT_MOE_SOURCE})")
    return sorted(parts)


def _per_expert(layout: PeftLayout, description: ModelDescription, experts: Mapping[str, ExpertSlot],
                factors: Mapping[str, AdapterModule], ranks: Mapping[str, tuple[int, float]],
                per_module: dict[str, tuple[int, float]], use_rslora: bool) -> tuple[int, float]:
    """Every expert of every adapted projection at one global (r, alpha); returns it."""
    leaves = {module.rsplit(".", 1)[-1] for module in experts}
    adapted = {s.parameter for m, s in description.experts.items() if m.rsplit(".", 1)[-1] in leaves}
    holders = {p.rpartition(".")[0] for p in adapted}  # PEFT needs every projection of an adapted experts module
    adapted |= {s.parameter for s in description.experts.values() if s.parameter.rpartition(".")[0] in holders}
    groups = _groups(description, sorted(adapted))
    rank = max(ranks[m][0] for m in experts)
    scales = {m: lora_scale(*ranks[m], use_rslora) for m in experts}
    scale = max(scales.values(), key=lambda s: sum(1 for v in scales.values() if v == s))
    alpha = alpha_value(scale * (rank ** 0.5 if use_rslora else rank))
    dtype = next(iter(factors[m].A.dtype for m in experts))
    zero, padded, rescaled = [], [], []
    for (_, _), members in sorted(groups.items()):
        for expert, module in sorted(members.items()):
            mod = factors.get(module)
            if mod is None:
                zero.append(module)
            elif mod.A.shape[0] != rank:
                padded.append(module)
            factor = scales[module] / scale if mod is not None else 1.0
            if factor != 1.0:
                rescaled.append(module)
            A, B = _padded(mod, rank, _expert_matrix_shape(description, module), dtype, factor)
            layout.modules[module] = AdapterModule(module, A, B)
            per_module[module] = (rank, alpha)
            if mod is None:
                layout.sources[module] = []
    if zero:
        layout.notes.append(
            f"{len(zero)} expert matrix(es) without a delta get zero factors ({_short(zero)}): PEFT adapts every "
            "expert of every layer of an adapted projection and reports missing keys otherwise")
    if padded:
        layout.notes.append(f"{len(padded)} expert matrix(es) zero-padded to rank {rank} ({_short(padded)}): PEFT "
                            "reads every expert at the config's r")
    if rescaled:
        layout.notes.append(f"{len(rescaled)} expert matrix(es) rescaled to the common scale {scale:g} "
                            f"({_short(rescaled)}): PEFT reads every expert at the config's lora_alpha / r")
    return rank, alpha


def _fused(layout: PeftLayout, description: ModelDescription, experts: Mapping[str, ExpertSlot],
           factors: Mapping[str, AdapterModule], ranks: Mapping[str, tuple[int, float]],
           stacks: Mapping[str, ExpertStack], per_module: dict[str, tuple[int, float]],
           use_rslora: bool) -> list[str]:
    """One ``target_parameters`` LoRA per fused parameter with factors; returns the parameter names."""
    by_parameter: dict[str, tuple[Tensor, Tensor, int, float, list[str]]] = {}
    groups = _groups(description, sorted({s.parameter for s in experts.values()}))
    zero: list[str] = []
    for parameter in sorted({s.parameter for s in experts.values()}):
        parts = sorted(part for (p, part) in groups if p == parameter)
        members = [groups[(parameter, part)] for part in parts]
        present = [m for group in members for m in group.values() if m in factors]
        scales = {m: lora_scale(*ranks[m], use_rslora) for m in present}
        scale = max(scales.values(), key=lambda s: sum(1 for v in scales.values() if v == s))
        dtype = factors[present[0]].A.dtype
        stacked = []
        for group in members:
            rank = max((factors[m].A.shape[0] for m in group.values() if m in factors), default=1)
            pairs = []
            for expert in sorted(group):
                module = group[expert]
                mod = factors.get(module)
                if mod is None:
                    zero.append(module)
                pairs.append(_padded(mod, rank, _expert_matrix_shape(description, module), dtype,
                                     scales[module] / scale if mod is not None else 1.0))
            stacked.append((torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])))  # (E, r, in), (E, out, r)
        A, B = stack_parts(stacked) if len(stacked) > 1 else stacked[0]
        rank = A.shape[1]
        by_parameter[parameter] = (A, B, rank, alpha_value(scale * (rank ** 0.5 if use_rslora else rank)),
                                   [m for group in members for _, m in sorted(group.items())])
    for parameter, stack in stacks.items():
        by_parameter[parameter] = (stack.A, stack.B, stack.rank, stack.alpha, [])
    if zero:
        layout.notes.append(f"{len(zero)} expert matrix(es) without a delta get zero factors in their fused "
                            f"parameter's LoRA ({_short(zero)})")
    by_module: dict[str, list[str]] = {}
    for parameter in by_parameter:
        info = description.parameters[parameter]
        by_module.setdefault(info.module, []).append(parameter)
    for module, params in by_module.items():
        ordered = sorted(params, key=lambda p: description.parameters[p].position)
        paths = wrapper_paths(module, [p.rsplit(".", 1)[-1] for p in ordered])
        for parameter in ordered:
            A, B, rank, alpha, sources = by_parameter[parameter]
            path = paths[parameter.rsplit(".", 1)[-1]]
            lora_A, lora_B = join_experts(A, B)  # (r E, in), (out, r E)
            layout.modules[path] = AdapterModule(path, lora_A, lora_B)
            layout.sources[path] = sources
            per_module[parameter] = (rank, alpha)
    layout.notes.append(
        f"experts adapted through target_parameters on {len(by_parameter)} fused parameter(s) "
        f"({_short(sorted(by_parameter))}), PEFT's layout for them")
    return sorted(by_parameter)
