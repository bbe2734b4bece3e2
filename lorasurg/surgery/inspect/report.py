"""What ``lorasurg inspect`` reports: per module, per layer type, and for the whole adapter."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..report import format_bytes, format_count, format_table

__all__ = ["ModuleSummary", "LayerTypeTotal", "ExpertGroupSummary", "InspectReport"]


@dataclass
class ModuleSummary:
    """One module of an adapter, as ``inspect`` reports it.

    ``delta_norm`` is ``||scale * B @ A||_F``; ``relative_norm`` divides it by the base weight's ``||W||_F``
    (None without a base, or when the base has no such weight). ``spectrum`` holds the singular values of the
    delta (exact, from the factors); ``effective_rank`` is ``exp`` of their entropy; ``rank_90``/``rank_99`` the
    smallest ranks keeping 90% / 99% of ``delta_norm ** 2``.
    """

    name: str
    layer_type: str
    kind: str
    rank: int
    alpha: float
    scale: float
    A_shape: list[int]
    B_shape: list[int]
    dtype: str
    parameters: int
    bias: bool
    dora: bool
    delta_norm: float = 0.0
    relative_norm: Optional[float] = None
    effective_rank: float = 0.0
    rank_90: int = 0
    rank_99: int = 0
    spectrum: list[float] = field(default_factory=list)


@dataclass
class LayerTypeTotal:
    """The modules of one layer type (the last part of their names, e.g. ``q_proj``) taken together.

    ``delta_norm`` is ``sqrt(sum ||dW||_F^2)`` over them; ``relative_norm`` the mean of their relative norms;
    ``rank``/``rank_99`` the sums of stored ranks and of the ranks keeping 99% of each module's energy.
    """

    layer_type: str
    modules: int
    parameters: int
    rank: int
    rank_99: int
    mean_effective_rank: float
    delta_norm: float
    relative_norm: Optional[float] = None


@dataclass
class ExpertGroupSummary:
    """The experts of one MoE layer's projection: per-expert modules (``group`` is
    ``<layer>.experts.*.<projection>``) or one ``target_parameters`` LoRA split per expert (``group`` is the
    parameter). ``ranks``: the distinct ranks of its experts; ``delta_norm``: ``sqrt(sum ||dW_e||_F^2)``;
    ``min_norm``/``max_norm``: the smallest and largest expert's; ``zero``: experts whose delta is zero;
    ``energy_share``: the group's share of the adapter's ``sum ||dW||_F^2``."""

    group: str
    layout: str
    experts: int
    ranks: list[int]
    delta_norm: float
    min_norm: float
    max_norm: float
    zero: int
    energy_share: float


@dataclass
class InspectReport:
    """Everything ``inspect`` found in an adapter."""

    source: str
    config: dict[str, Any]
    modules: list[ModuleSummary]
    extra: dict[str, list[int]]
    total_parameters: int
    total_bytes: int
    problems: list[str] = field(default_factory=list)
    base: Optional[str] = None
    layer_types: list[LayerTypeTotal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plot: Optional[str] = None
    consumers: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[dict[str, Any]] = field(default_factory=list)  # trainable-token rows per module
    replication: Optional[dict[str, Any]] = None  # layer_replication: the map and the layers it gives
    expert_groups: list[ExpertGroupSummary] = field(default_factory=list)
    saved_modules: Optional[int] = None  # LoRA modules in the file, when rows split target_parameters per expert

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "base": self.base,
            "config": self.config,
            "modules": [asdict(m) for m in self.modules],
            "layer_types": [asdict(t) for t in self.layer_types],
            "expert_groups": [asdict(g) for g in self.expert_groups],
            "extra": self.extra,
            "total_parameters": self.total_parameters,
            "total_bytes": self.total_bytes,
            "problems": self.problems,
            "notes": self.notes,
            "plot": self.plot,
            "consumers": self.consumers,
            "tokens": self.tokens,
            "replication": self.replication,
        }

    def render(self) -> str:
        cfg = self.config
        head = [
            f"adapter: {self.source}" + (f"  (base: {self.base})" if self.base else ""),
            f"r={cfg['r']} lora_alpha={cfg['lora_alpha']} use_rslora={cfg['use_rslora']} "
            f"use_dora={cfg['use_dora']} lora_bias={cfg['lora_bias']} init_lora_weights={cfg['init_lora_weights']}",
            f"target_modules: {cfg['target_modules']}",
        ]
        if cfg.get("modules_to_save"):
            head.append(f"modules_to_save: {cfg['modules_to_save']}")
        rows = [
            (m.name, m.kind, m.rank, f"{m.alpha:g}", f"{m.scale:.4g}", "x".join(map(str, m.A_shape)),
             "x".join(map(str, m.B_shape)), m.dtype, format_count(m.parameters))
            for m in self.modules
        ]
        parts = ["\n".join(head), format_table(rows, ["module", "kind", "r", "alpha", "scale", "A", "B", "dtype", "params"])]
        if self.modules:
            parts.append(self._render_spectra())
        if self.expert_groups:
            parts.append(self._render_experts())
        if self.tokens:
            rows = [(t["module"], t["rows"], _indices(t["indices"]), "x".join(map(str, t["shape"])), t["dtype"],
                     "-" if t.get("changed_norm") is None else f"{t['changed_norm']:.4g}") for t in self.tokens]
            parts.append("trainable tokens (rows that replace the layer's, trainable_token_indices):\n" + format_table(
                rows, ["module", "rows", "indices", "shape", "dtype", "||rows - base rows||"]))
        if self.replication:
            rep = self.replication
            parts.append(f"layer_replication {rep['map']}: {rep['stack'] or 'the layer stack'} of {rep['layers']} "
                         f"layers, copies of layers {_indices(rep['sources'], 32)}")
        extra = {k: v for k, v in self.extra.items() if not any(k.startswith(f"{t['module']}.") for t in self.tokens)}
        if extra:
            parts.append("other tensors:\n" + "\n".join(f"  {k}  {'x'.join(map(str, s))}" for k, s in extra.items()))
        split = self.saved_modules is not None and self.saved_modules != len(self.modules)
        parts.append(
            f"{self.saved_modules if split else len(self.modules)} LoRA modules"
            + (f" ({len(self.modules)} rows above: target_parameters LoRAs per expert)" if split else "")
            + f", {format_count(self.total_parameters)} parameters, {format_bytes(self.total_bytes)}"
        )
        if self.notes:
            parts.append("\n".join(f"note: {n}" for n in self.notes))
        if self.problems:
            parts.append("problems:\n" + "\n".join(f"  - {p}" for p in self.problems))
        else:
            parts.append("no problems found: the tensors match the config")
        if self.consumers:
            parts.append("read by:\n" + "\n".join(f"  {c['line']}" for c in self.consumers))
        if self.plot:
            parts.append(f"plot written to {self.plot}")
        return "\n\n".join(parts)

    def _render_spectra(self) -> str:
        rel = self.base is not None
        headers = ["module", "r", "||dW||_F"] + (["/||W||_F"] if rel else []) + ["eff. rank", "r@90%", "r@99%"]
        rows = [
            (m.name, m.rank, f"{m.delta_norm:.4g}") + ((_percent(m.relative_norm),) if rel else ())
            + (f"{m.effective_rank:.2f}", m.rank_90, m.rank_99)
            for m in self.modules
        ]
        type_headers = ["layer type", "modules", "params", "sum r", "sum r@99%", "mean eff. rank", "||dW||_F"]
        type_rows = [
            (t.layer_type, t.modules, format_count(t.parameters), t.rank, t.rank_99, f"{t.mean_effective_rank:.2f}",
             f"{t.delta_norm:.4g}") + ((_percent(t.relative_norm),) if rel else ())
            for t in self.layer_types
        ]
        stored = sum(t.rank for t in self.layer_types)
        used = sum(t.rank_99 for t in self.layer_types)
        waste = (f"rank stored {stored}, rank keeping 99% of each module's delta {used}: "
                 f"{stored - used} ({(stored - used) / stored:.0%}) of the rank adds under 1% of the energy"
                 if stored else "")
        return "\n\n".join([
            "spectra of the deltas scale * B @ A (exact, from the factors):\n" + format_table(rows, headers),
            "per layer type:\n" + format_table(type_rows, type_headers + (["mean /||W||_F"] if rel else [])),
            waste,
        ]).rstrip()


    def _render_experts(self) -> str:
        rows = [
            (g.group, g.layout, g.experts, "/".join(map(str, g.ranks)), f"{g.delta_norm:.4g}",
             f"{g.min_norm:.4g}..{g.max_norm:.4g}", g.zero, f"{100 * g.energy_share:.3g}%")
            for g in self.expert_groups
        ]
        headers = ["experts of", "layout", "experts", "r", "||dW||_F", "per expert", "zero", "energy"]
        return "experts per layer and projection:\n" + format_table(rows, headers)


def _indices(values: list[int], limit: int = 8) -> str:
    """``[16, 17, ..., 47]`` as ``16-47`` when consecutive, else the first ``limit`` and a count."""
    if values and values == list(range(values[0], values[0] + len(values))) and len(values) > 2:
        return f"{values[0]}-{values[-1]}"
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f", ... ({len(values)})" if len(values) > limit else "")


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.3g}%"
