"""Which weights ``residualize`` factors, at which rank, and the initial adapter laid out as PEFT loads it.

Selection is PEFT's ``target_modules`` matching (:func:`lorasurg.targeting.select_modules`) on the model's module names
(Qwen2-VL's ``model.language_model.layers.0.mlp.up_proj``; per-expert modules by the checkpoint's names,
``model.layers.0.mlp.experts.3.gate_proj``: :class:`~lorasurg.io.architecture.ModelDescription`), and each selected
module is factored under its checkpoint name. A 3-D expert tensor the checkpoint stores whole (gpt-oss's
``model.layers.0.mlp.experts.gate_up_proj``, ``(E, in, out)``) is selected like a linear layer of that name
(``all-linear``, ``gate_up_proj``, a regex) and factored per expert: each expert's ``(out, in)`` matrix is a target of
its own (:attr:`Target.parameter`), so every expert of every selected projection is factored.

Each target's rank is ``r`` clamped to ``min(out, in)`` of its matrix (an expert's, for experts), with the alpha that
keeps the common scale ``s``.

The initial adapter is written through :func:`lorasurg.surgery.adapter_layout.peft_layout`, the layout PEFT 0.21.2
loads on transformers 5: plain modules under the model's names, experts per expert where PEFT converts them and as
``target_parameters`` otherwise (Qwen2-MoE, gpt-oss's stored tensors), one rank for all experts (zero-padded).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from ...config import LoraConfig
from ...engine.factors import factor_shapes, lora_alpha_for, lora_scale
from ...errors import InputError
from ...io.adapter import Adapter, AdapterModule
from ...io.checkpoint import Checkpoint
from ...io.model_layout import ExpertParameter
from ...modules import ModuleInfo
from ...targeting import ALL_LINEAR, select_modules
from ..adapter_layout import ExpertStack, peft_layout
from ..options import short_list, task_type_of
from .report import ResidualizeReport

__all__ = ["Target", "plan_targets", "initial_adapter"]


@dataclass(frozen=True)
class Target:
    """One target: a checkpoint module (its ``.weight``), or a 3-D expert tensor BASE stores whole, per expert.

    Attributes:
        module: the checkpoint module, or the expert parameter's name.
        info: the module; for an expert parameter a ``linear`` with one expert's ``(out, in)``.
        rank: ``asked`` clamped to what the matrix allows; ``alpha`` keeps ``scale`` at that rank.
        parameter: the expert parameter, for a stored 3-D tensor.
        order: the checkpoint module whose place in the model's module order the target takes (PEFT's init order).
    """

    module: str
    info: ModuleInfo
    rank: int
    alpha: float
    scale: float
    asked: int
    parameter: Optional[ExpertParameter] = None
    order: str = ""

    @property
    def key(self) -> str:
        """The BASE tensor factored."""
        return self.parameter.stored if self.parameter is not None else f"{self.module}.weight"

    @property
    def clamped(self) -> bool:
        return self.rank < self.asked


def plan_targets(ckpt: Checkpoint, r: int, alpha: float, use_rslora: bool, target_modules, exclude_modules,
                 report: ResidualizeReport) -> dict[str, Target]:
    """The targets (see the module docstring), each with its (clamped) rank and the alpha that keeps the scale."""
    description = ckpt.describe()
    stored = {p.name: p for p in description.parameters.values() if p.stored is not None}
    candidates = {description.model_name(m): info for m, info in description.modules.items()}
    candidates.update({name: ModuleInfo(f"{p.type_name} parameter", "linear", False, p.shape)
                       for name, p in stored.items()})
    outputs = {description.model_name(m) for m in ckpt.output_layer_names()}
    selection = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules or ALL_LINEAR,
                           exclude_modules=exclude_modules)
    chosen = select_modules(selection, candidates, outputs)
    selected = [n if n in stored else description.checkpoint_module(n) or n for n in chosen]
    tied = {alias.rsplit(".", 1)[0]: canonical for alias, canonical in ckpt.tied_weights().items()}
    shared = [f"{m} (its weight is {tied[m]})" for m in selected if m in tied]
    if shared:
        raise InputError(
            f"target(s) {', '.join(shared)} share their weight with another module: replacing it by a residual "
            "would change both layers. Leave them out with --exclude-modules (or untie the weights first)"
        )
    absent = [m for m in selected if m not in stored and f"{m}.weight" not in ckpt]
    if absent:  # the architecture has them (e.g. BERT's pooler) but this checkpoint was saved without them
        report.notes.append(f"{len(absent)} selected module(s) of the architecture have no weight in BASE and are not "
                            f"targets: {short_list(absent)}")
    scale = lora_scale(r, alpha, use_rslora)
    targets: dict[str, Target] = {}
    for name in (m for m in selected if m not in absent):
        parameter = stored.get(name)
        if parameter is not None:
            info, order = ModuleInfo("expert", "linear", False, (parameter.out_features, parameter.in_features)), \
                parameter.module
        else:
            slot = description.experts.get(name)
            info, order = description.modules[name], slot.parameter.rpartition(".")[0] if slot else name
        _, _, out = factor_shapes(info.kind, info.weight_shape, 1, info.fan_in_fan_out)
        limit = min(out, math.prod(info.weight_shape) // out)
        rank = r if info.kind == "embedding" else min(r, limit)
        targets[name] = Target(name, info, rank, lora_alpha_for(scale, rank, use_rslora), scale, r, parameter, order)
    clamped = [f"{t.module} (r={t.rank})" for t in targets.values() if t.clamped]
    if clamped:
        report.notes.append(f"r={r} exceeds min(out, in) of {len(clamped)} module(s); their rank was clamped to it "
                            f"(same scale): {short_list(clamped)}")
    return targets


def initial_adapter(ckpt: Checkpoint, targets: Mapping[str, Target], factors: Mapping[str, AdapterModule],
                    stacks: Mapping[str, ExpertStack], use_rslora: bool, model_path: Path,
                    notes: Optional[list[str]] = None, form: Optional[str] = None) -> Adapter:
    """The initial adapter: exactly the targets, each at its rank with the common scale, laid out by
    :func:`~lorasurg.surgery.adapter_layout.peft_layout` (experts in ``form``, default PEFT's own); ``init_lora_weights:
    true``. The layout's notes (experts zero-padded to one rank, moved to ``target_parameters``) go to ``notes``."""
    description = ckpt.describe()
    fan_in_fan_out = any(t.info.fan_in_fan_out for t in targets.values())
    modules = {m: factors[m] for m in targets if m in factors}
    layout = peft_layout(description, modules, {m: (targets[m].rank, targets[m].alpha) for m in modules},
                         model_type=(ckpt.config or {}).get("model_type"), stacks=stacks, use_rslora=use_rslora,
                         refused=["fan_in_fan_out"] if fan_in_fan_out else (), form=form)
    config = LoraConfig(
        **layout.fields,
        use_rslora=use_rslora,
        fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=True,
        task_type=task_type_of(ckpt.config),
        base_model_name_or_path=os.fspath(model_path),
    )
    adapter = Adapter(config, layout.modules, layout.extra)
    problems = adapter.problems()
    if problems:  # a bug here, not in the user's input
        raise AssertionError("residualize built an inconsistent adapter: " + "; ".join(problems))
    if notes is not None:
        notes.extend(layout.notes)
    return adapter
