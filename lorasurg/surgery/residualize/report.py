"""The report ``residualize`` returns: per module the rank, what the adapter took, and what the residual kept.

For a target weight ``W`` (matrix view) with initial adapter ``scale * B0 @ A0`` and residual
``W_res = W - scale * B0 @ A0``:

* *energy taken* ``||scale * B0 @ A0||_F**2 / ||W||_F**2``; for PiSSA that is ``sum(S[:r]**2) / sum(S**2)``, the
  share of the weight's energy in its ``r`` principal directions;
* *residual norm* ``||W_res||_F`` as stored (in the model's dtype), and relative to ``||W||_F``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ...consumers.prepare import ForReport
from ...io.rewrite import RewriteResult
from ..report import (
    CLAMPED_FOOTNOTE, for_dict, format_bytes, format_count, format_for, format_list, format_table, model_summary,
)
from ..rewrite_memory import MemoryUse

__all__ = ["ResidualModule", "ResidualizeReport"]


@dataclass
class ResidualModule:
    """One residualized module."""

    module: str
    kind: str
    shape: list[int]
    rank: int
    clamped: bool
    energy_taken: float
    residual_norm: float
    relative_residual: float


@dataclass
class ResidualizeReport:
    """Everything ``residualize`` did; ``render()`` for people, ``to_dict()`` for ``--json``."""

    base: str
    init: str
    r: int
    alpha: float
    use_rslora: bool
    device: str
    dtype: str
    output: Optional[str] = None
    modules: list[ResidualModule] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    model: Optional[RewriteResult] = None  # what was written to OUT/model
    adapter_parameters: int = 0
    adapter_bytes: int = 0
    consumers: list[str] = field(default_factory=lambda: ["peft"])
    for_report: Optional[ForReport] = None  # how OUT/adapter was written for the consumers
    memory: Optional[MemoryUse] = None  # the memory budget, and the tensors copied in row blocks under it

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "output": self.output,
            "settings": {"init": self.init, "r": self.r, "alpha": self.alpha, "use_rslora": self.use_rslora,
                         "device": self.device, "dtype": self.dtype, "for": list(self.consumers)},
            **for_dict(self.for_report),
            "modules": [asdict(m) for m in self.modules],
            "notes": list(self.notes),
            "model": asdict(self.model) if self.model is not None else None,
            "adapter": {"parameters": self.adapter_parameters, "bytes": self.adapter_bytes},
            "memory": self.memory.to_dict() if self.memory is not None else None,
        }

    def render(self) -> str:
        head = (f"residualize: {self.base}\ninit={self.init} r={self.r} alpha={self.alpha:g}"
                f"{' rslora' if self.use_rslora else ''} device={self.device} dtype={self.dtype} "
                f"for={','.join(self.consumers)}")
        parts = [head]
        if self.modules:
            rows = [(m.module, m.kind, "x".join(map(str, m.shape)), f"{m.rank}" + ("*" if m.clamped else ""),
                     f"{100 * m.energy_taken:.2f}%", f"{m.residual_norm:.4g}", f"{100 * m.relative_residual:.2f}%")
                    for m in self.modules]
            table = format_table(rows, ["module", "kind", "shape", "r", "energy taken", "||W_res||", "of ||W||"])
            if any(m.clamped for m in self.modules):
                table += "\n" + CLAMPED_FOOTNOTE
            parts.append(table)
        parts.append(format_list("notes", self.notes))
        if self.consumers != ["peft"]:
            parts.append("initial adapter " + format_for(self.for_report))
        if self.memory is not None:
            parts.append(self.memory.render())
        if self.model is not None:
            parts.append(format_list("not copied from BASE's directory", self.model.left_out))
            parts.append(f"{len(self.modules)} weights residualized; {model_summary(self.model)}; adapter: "
                         f"{format_count(self.adapter_parameters)} parameters, {format_bytes(self.adapter_bytes)}")
        if self.output:
            parts.append(f"wrote {self.output}/model (residual base) and {self.output}/adapter (initial adapter)")
        return "\n\n".join(p for p in parts if p)
