"""``lorasurg inspect``: what is in an adapter.

For each module: layer kind, rank r, lora_alpha and the scale ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)
the config gives it, tensor shapes, dtype and parameter count; the non-LoRA tensors; totals; and every way
the tensors contradict the config (:meth:`lorasurg.io.adapter.Adapter.problems`); and, per consumer (PEFT, vLLM,
llama.cpp), whether it reads the adapter as PEFT does (:func:`lorasurg.consumers.consumer_verdicts`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Union

from ..consumers import consumer_verdicts
from ..engine.factors import lora_scale
from ..io.adapter import Adapter
from .report import format_bytes, format_count, format_table

__all__ = ["ModuleSummary", "InspectReport", "inspect_adapter"]


@dataclass
class ModuleSummary:
    """One module of an adapter, as ``inspect`` reports it."""

    name: str
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
    consumers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "config": self.config,
            "modules": [asdict(m) for m in self.modules],
            "extra": self.extra,
            "total_parameters": self.total_parameters,
            "total_bytes": self.total_bytes,
            "problems": self.problems,
            "consumers": self.consumers,
        }

    def render(self) -> str:
        cfg = self.config
        head = [
            f"adapter: {self.source}",
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
        if self.extra:
            parts.append("other tensors:\n" + "\n".join(f"  {k}  {'x'.join(map(str, s))}" for k, s in self.extra.items()))
        parts.append(
            f"{len(self.modules)} LoRA modules, {format_count(self.total_parameters)} parameters, "
            f"{format_bytes(self.total_bytes)}"
        )
        if self.problems:
            parts.append("problems:\n" + "\n".join(f"  - {p}" for p in self.problems))
        else:
            parts.append("no problems found: the tensors match the config")
        if self.consumers:
            parts.append("read by:\n" + "\n".join(f"  {c['line']}" for c in self.consumers))
        return "\n\n".join(parts)


def inspect_adapter(path_or_repo: Union[str, os.PathLike]) -> InspectReport:
    """Summarise the adapter at ``path_or_repo``; inconsistencies are reported, not raised."""
    adapter = Adapter.load(path_or_repo, strict=False)
    cfg = adapter.config
    modules = []
    for name, mod in adapter.modules.items():
        r, alpha = adapter.rank_alpha(name)
        tensors = mod.tensors().values()
        modules.append(
            ModuleSummary(
                name=name,
                kind=mod.kind,
                rank=mod.rank,
                alpha=alpha,
                scale=lora_scale(r, alpha, cfg.use_rslora),
                A_shape=list(mod.A.shape),
                B_shape=list(mod.B.shape),
                dtype=str(mod.A.dtype).removeprefix("torch."),
                parameters=sum(t.numel() for t in tensors),
                bias=mod.bias is not None,
                dora=mod.magnitude is not None,
            )
        )
    state = adapter.to_state_dict()
    return InspectReport(
        source=os.fspath(path_or_repo),
        config=json.loads(cfg.to_json_string()),
        modules=modules,
        extra={k: list(v.shape) for k, v in adapter.extra.items()},
        total_parameters=sum(t.numel() for t in state.values()),
        total_bytes=sum(t.numel() * t.element_size() for t in state.values()),
        problems=adapter.problems(),
        consumers=[v.to_dict() for v in consumer_verdicts(adapter)],
    )
