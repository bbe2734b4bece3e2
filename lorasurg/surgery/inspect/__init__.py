"""``lorasurg inspect``: what is in an adapter, and how much of its rank it uses.

For each module: layer kind, rank r, lora_alpha and the scale ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)
the config gives it, tensor shapes, dtype and parameter count; the norm of its delta ``||scale * B @ A||_F``
(relative to the base weight with a base model), the delta's singular values computed exactly from the factors
(:mod:`.spectra`), its effective rank and the ranks keeping 90% / 99% of its energy. Then totals per layer
type, the non-LoRA tensors, totals, every way the tensors contradict the config
(:meth:`lorasurg.io.adapter.Adapter.problems`), per consumer (PEFT, vLLM, llama.cpp) whether it reads the
adapter as PEFT does (:func:`lorasurg.consumers.consumer_verdicts`), and optionally a PNG of the spectra and norms (:mod:`.plot`).

Mixtures of experts (:mod:`lorasurg.surgery.expert_groups`): per-expert modules are grouped per layer and
projection (``model.layers.0.mlp.experts.*.gate_proj``: the experts, their ranks and the group's share of the
adapter's delta energy); a ``target_parameters`` LoRA on fused experts (``lora_A (r E, in)``) is split per expert
(:func:`lorasurg.engine.experts.split_experts`) and each expert reported as a module of its own,
``<parameter>[e]`` at rank ``r``, with its own spectrum.

A llama.cpp GGUF LoRA file is summarised as llama.cpp reads it (:mod:`.gguf`).
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from typing import Optional, Union

import torch

from ...consumers import consumer_verdicts
from ...engine.experts import split_experts
from ...engine.factors import lora_scale
from ...errors import InputError
from ...io.adapter import Adapter, AdapterModule
from ...io.checkpoint import Checkpoint
from ...io.gguf import is_gguf
from ...io.values import all_finite
from ...layer_replication import find_layer_stack, source_name
from ..expert_groups import ParameterLora, expert_groups, parameter_loras
from .gguf import GgufInspectReport, inspect_gguf
from .plot import check_plot_path, write_plot
from .report import ExpertGroupSummary, InspectReport, LayerTypeTotal, ModuleSummary
from .spectra import BaseNorms, module_spectrum

__all__ = ["ModuleSummary", "LayerTypeTotal", "ExpertGroupSummary", "InspectReport", "GgufInspectReport",
           "inspect_adapter"]

PathLike = Union[str, "os.PathLike[str]"]


def inspect_adapter(
    path_or_repo: PathLike, base: Optional[PathLike] = None, *, plot: Optional[PathLike] = None, force: bool = False
) -> Union[InspectReport, GgufInspectReport]:
    """Summarise the adapter at ``path_or_repo``; inconsistencies are reported, not raised. A GGUF LoRA file gives a
    :class:`GgufInspectReport` (:func:`.gguf.inspect_gguf`).

    Args:
        path_or_repo: an adapter directory or hub repo id.
        base: the base model; each delta's norm is then also given relative to its base weight's norm (one base
            tensor read at a time).
        plot: write a PNG of the spectra and the delta norms here (needs matplotlib: ``pip install
            lorasurg[plot]``).
        force: replace an existing ``plot`` file.

    Raises:
        InputError: the adapter or the base cannot be read.
        UnsupportedError: ``plot`` is given and matplotlib is not installed (checked before any work).
        OutputExistsError: ``plot`` exists and ``force`` is false (checked before any work).
    """
    if is_gguf(path_or_repo):
        if plot is not None or base is not None:
            raise InputError(f"{path_or_repo} is a GGUF LoRA file: inspect shows it without --base or --plot (lorasurg "
                             "validate FILE.gguf --base BASE checks it against its base model)")
        return inspect_gguf(path_or_repo)
    if plot is not None:
        check_plot_path(plot, force)
    adapter = Adapter.load(path_or_repo, strict=False)
    cfg = adapter.config
    with ExitStack() as stack:
        checkpoint = stack.enter_context(Checkpoint.open(base)) if base is not None else None
        replication = _replication(adapter, checkpoint)
        to_base = (lambda n: n) if not replication or not replication["stack"] else \
            (lambda n: source_name(n, replication["stack"], replication["sources"]))
        norms = BaseNorms(checkpoint) if checkpoint is not None else None
        loras = parameter_loras(adapter, norms.positions() if norms is not None else None)
        modules, missing, groups = [], [], []
        for name, mod in adapter.modules.items():
            lora = loras.get(name)
            if lora is not None and lora.experts > 1:
                rows = _expert_summaries(adapter, lora, mod)
                groups.append((lora.parameter, "target_parameters", rows))
            else:
                rows = [_summary(adapter, name, lora)]
            for summary in rows:
                if norms is not None:
                    weight_norm = norms.norm(to_base(summary.name))
                    if weight_norm is None:
                        missing.append(summary.name)
                    elif weight_norm > 0:
                        summary.relative_norm = summary.delta_norm / weight_norm
            modules.extend(rows)
        tokens = _tokens(adapter, checkpoint)
    by_name = {m.name: m for m in modules}
    for group, members in expert_groups(adapter.modules).items():
        groups.append((group, "per expert", [by_name[m] for m in members.values()]))
    state = adapter.to_state_dict()
    report = InspectReport(
        source=os.fspath(path_or_repo),
        config=json.loads(cfg.to_json_string()),
        modules=modules,
        extra={k: list(v.shape) for k, v in adapter.extra.items()},
        total_parameters=sum(t.numel() for t in state.values()),
        total_bytes=sum(t.numel() * t.element_size() for t in state.values()),
        problems=adapter.problems(),
        base=None if base is None else os.fspath(base),
        layer_types=_layer_types(modules),
        consumers=[v.to_dict() for v in consumer_verdicts(adapter)],
        tokens=tokens,
        replication=replication,
        expert_groups=_expert_groups(groups, modules),
        saved_modules=len(adapter.modules),
    )
    unmeasured = [m for m, mod in adapter.modules.items() if not _has_spectrum(mod)]
    if unmeasured:
        report.notes.append(f"{len(unmeasured)} module(s) have no spectrum (their factors do not chain or hold NaN/inf, "
                            f"see the problems): {unmeasured[:5]}")
    if missing:
        report.notes.append(f"{len(missing)} module(s) have no weight in the base, so no relative norm: {missing[:5]}")
    if plot is not None:
        write_plot(report, plot)
        report.plot = os.fspath(plot)
    return report


def _tokens(adapter: Adapter, checkpoint: Optional[Checkpoint]) -> list[dict]:
    """Per module with trainable tokens: its rows, their indices, and with a base ``||rows - base rows||_F``."""
    out = []
    indices = adapter.token_indices()
    for module, rows in adapter.token_rows().items():
        item = dict(module=module, rows=int(rows.shape[0]), indices=indices[module], shape=list(rows.shape),
                    dtype=str(rows.dtype).removeprefix("torch."), changed_norm=None)
        weight = f"{module}.weight"
        if checkpoint is not None and weight not in checkpoint:  # a renamed tower's: the checkpoint's name
            weight = f"{checkpoint.describe().checkpoint_module(module) or module}.weight"
        if checkpoint is not None and weight in checkpoint and len(indices[module]) == rows.shape[0]:
            stored = checkpoint.get(weight, dtype=torch.float64)
            inside = [k for k, i in enumerate(indices[module]) if i < stored.shape[0]]
            base_rows = stored[[indices[module][k] for k in inside]]  # (k, dim); added rows count whole
            diff = rows.double().clone()
            diff[inside] -= base_rows
            item["changed_norm"] = float(torch.linalg.vector_norm(diff))
        out.append(item)
    return out


def _replication(adapter: Adapter, checkpoint: Optional[Checkpoint]) -> Optional[dict]:
    """The layer map and, with a base, the stack it replicates and which layer each copy is (else the map alone)."""
    layer_map = adapter.config.layer_replication
    if not layer_map:
        return None
    stack, sources = None, [i for start, end in layer_map for i in range(start, end)]
    if checkpoint is not None:
        infos = checkpoint.module_infos()
        stack = find_layer_stack({n: i.type_name for n, i in infos.items()})
    return dict(map=[list(p) for p in layer_map], stack=stack, layers=len(sources), sources=sources)


def _summary(adapter: Adapter, name: str, lora: Optional[ParameterLora] = None, mod: Optional[AdapterModule] = None,
             layer_type: Optional[str] = None) -> ModuleSummary:
    """One row; a target_parameters LoRA's rank and alpha are the config's for its parameter's name."""
    mod = adapter.modules[name] if mod is None else mod
    r, alpha = (lora.rank, lora.alpha) if lora is not None else adapter.rank_alpha(name)
    scale = lora_scale(r, alpha, adapter.config.use_rslora)
    spectrum = module_spectrum(mod, scale) if _has_spectrum(mod) else None
    return ModuleSummary(
        name=name,
        layer_type=layer_type or name.rsplit(".", 1)[-1],
        kind=mod.kind,
        rank=mod.rank,
        alpha=alpha,
        scale=scale,
        A_shape=list(mod.A.shape),
        B_shape=list(mod.B.shape),
        dtype=str(mod.A.dtype).removeprefix("torch."),
        parameters=sum(t.numel() for t in mod.tensors().values()),
        bias=mod.bias is not None,
        dora=mod.magnitude is not None,
        **({} if spectrum is None else dict(
            delta_norm=spectrum.norm, effective_rank=spectrum.effective_rank, rank_90=spectrum.rank_90,
            rank_99=spectrum.rank_99, spectrum=spectrum.singular_values,
        )),
    )


def _expert_summaries(adapter: Adapter, lora: ParameterLora, mod: AdapterModule) -> list[ModuleSummary]:
    """One row per expert of a target_parameters LoRA, named ``<parameter>[e]``."""
    A, B = split_experts(mod.A, mod.B, lora.experts)  # (E, r, in), (E, out, r)
    return [
        _summary(adapter, f"{lora.parameter}[{e}]", lora, AdapterModule(f"{lora.parameter}[{e}]", A[e], B[e]),
                 lora.leaf)
        for e in range(lora.experts)
    ]


def _expert_groups(groups: list[tuple[str, str, list[ModuleSummary]]],
                   modules: list[ModuleSummary]) -> list[ExpertGroupSummary]:
    total = sum(m.delta_norm ** 2 for m in modules)
    found = []
    for name, layout, rows in groups:
        energy = sum(m.delta_norm ** 2 for m in rows)
        norms = [m.delta_norm for m in rows]
        found.append(ExpertGroupSummary(
            group=name, layout=layout, experts=len(rows), ranks=sorted({m.rank for m in rows}),
            delta_norm=energy ** 0.5, min_norm=min(norms), max_norm=max(norms),
            zero=sum(1 for n in norms if n == 0), energy_share=energy / total if total > 0 else 0.0,
        ))
    return found


def _has_spectrum(mod) -> bool:
    """Factors that chain and hold finite values (the problems list says what is wrong with the others)."""
    return mod.A.shape[0] == mod.B.shape[1] and all_finite(mod.A) and all_finite(mod.B)


def _layer_types(modules: list[ModuleSummary]) -> list[LayerTypeTotal]:
    groups: dict[str, list[ModuleSummary]] = {}
    for m in modules:
        groups.setdefault(m.layer_type, []).append(m)
    totals = []
    for layer_type, group in groups.items():
        relative = [m.relative_norm for m in group if m.relative_norm is not None]
        totals.append(LayerTypeTotal(
            layer_type=layer_type,
            modules=len(group),
            parameters=sum(m.parameters for m in group),
            rank=sum(m.rank for m in group),
            rank_99=sum(m.rank_99 for m in group),
            mean_effective_rank=sum(m.effective_rank for m in group) / len(group),
            delta_norm=sum(m.delta_norm ** 2 for m in group) ** 0.5,
            relative_norm=sum(relative) / len(relative) if relative else None,
        ))
    return totals
