"""The report ``fuse`` returns: which modules were merged, what replaced what, and what changed in config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ...io.rewrite import RewriteResult
from ..report import format_list, format_table, model_summary
from ..rewrite_memory import MemoryUse

__all__ = ["FusedModule", "FuseReport"]


@dataclass
class FusedModule:
    """One LoRA module merged into BASE: ``W' = W + scale * B @ A`` (DoRA: row-rescaled), bias ``b + scale * b_B``.

    ``module`` is BASE's name (a checkpoint module, or for kind ``experts`` a 3-D tensor BASE stores, each expert
    merged with its own factors of rank ``rank``); ``source`` the adapter's module path where it differs (a renamed
    tower, a ``target_parameters`` LoRA split per expert key).
    """

    module: str
    kind: str
    rank: int
    scale: float
    dora: bool
    bias: str  # "none", "added to BASE's bias", "new bias", "dropped"
    source: Optional[str] = None


@dataclass
class FuseReport:
    """Everything ``fuse`` did; ``render()`` for people, ``to_dict()`` for ``--json``."""

    base: str
    adapter: str
    device: str
    dtype: str
    output: Optional[str] = None
    modules: list[FusedModule] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    dropped_biases: dict[str, float] = field(default_factory=dict)
    config_updates: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    model: Optional[RewriteResult] = None  # what was written to the output
    memory: Optional[MemoryUse] = None  # the memory budget, and the tensors processed in row blocks under it

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "adapter": self.adapter,
            "output": self.output,
            "settings": {"device": self.device, "dtype": self.dtype},
            "modules": [asdict(m) for m in self.modules],
            "replaced": list(self.replaced),
            "dropped_biases": dict(self.dropped_biases),
            "config_updates": dict(self.config_updates),
            "notes": list(self.notes),
            "model": asdict(self.model) if self.model is not None else None,
            "memory": self.memory.to_dict() if self.memory is not None else None,
        }

    def render(self) -> str:
        parts = [f"fuse: {self.adapter} into {self.base}\ndevice={self.device} dtype={self.dtype}"]
        if self.modules:
            rows = [(m.module, m.kind, m.rank, f"{m.scale:.4g}", "yes" if m.dora else "", m.bias) for m in self.modules]
            header = ["module", "kind", "r", "scale", "DoRA", "lora_B bias"]
            if any(m.source for m in self.modules):
                rows = [row + (m.source or "",) for row, m in zip(rows, self.modules)]
                header.append("adapter module")
            parts.append(format_table(rows, header))
        if self.config_updates:
            parts.append("config.json: " + ", ".join(f"{k} = {v!r}" for k, v in self.config_updates.items()))
        parts.append(format_list("notes", self.notes))
        if self.memory is not None:
            parts.append(self.memory.render())
        if self.model is not None:
            parts.append(format_list("not copied from BASE's directory", self.model.left_out))
            parts.append(f"{len(self.modules)} LoRA modules merged, {len(self.replaced)} tensors replaced by saved "
                         f"copies; {model_summary(self.model)}")
        if self.output:
            parts.append(f"wrote {self.output}")
        return "\n\n".join(p for p in parts if p)
