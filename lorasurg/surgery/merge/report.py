"""The report ``merge`` returns: the inputs, each merged module, and how far it is from the exact weighted sum.

For a module with input deltas ``D_i`` and weights ``w_i`` the *exact weighted sum* is ``E = sum_i w_i D_i``; the
merged delta is ``D``. Reported per module:

* ``energy_kept`` (svd methods): the share of the merged matrix's energy the rank-k truncation keeps (``M = E`` for
  ``svd``; the trimmed/dropped sum for the ``*_svd`` methods);
* ``rel_diff``: ``||D - E||_F / ||E||_F``: for ``svd`` ``sqrt(1 - energy_kept)`` (Eckart-Young, from the exact
  spectrum), 0 for ``cat`` (exact by construction); for the other methods computed from the factors in float64
  (for ``linear`` it is the size of PEFT's cross terms; for ties/dare what trimming or dropping changed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ...consumers.prepare import ForReport
from ..report import (
    CLAMPED_FOOTNOTE, for_dict, format_bytes, format_count, format_for, format_list, format_table, left_out_mark,
    written_modules,
)

__all__ = ["InputSummary", "ModuleMerge", "MergeReport"]


@dataclass
class InputSummary:
    """One input adapter."""

    source: str
    weight: float
    r: int
    lora_alpha: float
    use_rslora: bool
    lora_bias: bool
    modules: int


@dataclass
class ModuleMerge:
    """One merged module.

    Attributes:
        ranks: the input ranks, None where an adapter lacks the module (it counts as zero).
        rank: the new rank (svd methods: including zero padding, see ``padded``).
        padded: columns of zero padding (the merged matrix has a lower rank than asked for).
        clamped: the requested rank exceeded ``min(out, in)``.
    """

    module: str
    kind: str
    shape: list[int]
    ranks: list[Optional[int]]
    rank: int
    energy_kept: float
    rel_diff: float
    padded: int = 0
    clamped: bool = False


@dataclass
class MergeReport:
    """What ``merge`` did; ``render()`` for people, ``to_dict()`` for ``--json``."""

    method: str
    formula: str
    weights: list[float]
    r: Optional[int]
    density: Optional[float]
    majority_sign: Optional[str]
    seed: Optional[int]
    inputs: list[InputSummary] = field(default_factory=list)
    modules: list[ModuleMerge] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    adapter_parameters: int = 0
    adapter_bytes: int = 0
    output: Optional[str] = None
    consumers: list[str] = field(default_factory=lambda: ["peft"])
    for_report: Optional[ForReport] = None

    @property
    def written(self) -> list[str]:
        """The merged modules the written adapter holds (``--for`` may leave some out)."""
        left = self.for_report.left_out_modules if self.for_report is not None else set()
        return [m.module for m in self.modules if m.module not in left]

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "settings": {
                "method": self.method, "formula": self.formula, "weights": self.weights, "r": self.r,
                "density": self.density, "majority_sign": self.majority_sign, "seed": self.seed,
                "for": list(self.consumers),
            },
            **for_dict(self.for_report),
            "inputs": [asdict(i) for i in self.inputs],
            "modules": [asdict(m) for m in self.modules],
            "notes": list(self.notes),
            "totals": {
                "modules": len(self.written),
                "adapter_parameters": self.adapter_parameters,
                "adapter_bytes": self.adapter_bytes,
                "max_rel_diff": max((m.rel_diff for m in self.modules), default=0.0),
            },
        }

    def render(self) -> str:
        settings = [f"method={self.method}"]
        if self.r is not None:
            settings.append(f"r={self.r}")
        if self.density is not None:
            settings.append(f"density={self.density:g}")
        if self.majority_sign is not None:
            settings.append(f"majority sign={self.majority_sign}")
        if self.seed is not None:
            settings.append(f"seed={self.seed}")
        settings.append(f"for={','.join(self.consumers)}")
        head = [f"merge: {' '.join(settings)}", f"  {self.formula}"]
        inputs = format_table(
            [(i.source, f"{i.weight:g}", i.r, f"{i.lora_alpha:g}", str(i.use_rslora).lower(), str(i.lora_bias).lower(),
              i.modules) for i in self.inputs],
            ["input", "weight", "r", "alpha", "rslora", "lora_bias", "modules"],
        )
        rows = [
            (m.module, m.kind, "x".join(map(str, m.shape)), ",".join("-" if r is None else str(r) for r in m.ranks),
             f"{m.rank}" + ("*" if m.clamped else "") + left_out_mark(m.module, self.for_report),
             f"{100 * m.energy_kept:.3f}%", f"{100 * m.rel_diff:.3f}%")
            for m in self.modules
        ]
        table = format_table(rows, ["module", "kind", "shape", "input r", "new r", "energy kept", "vs exact sum"])
        if any(m.clamped for m in self.modules):
            table += "\n" + CLAMPED_FOOTNOTE
        parts = ["\n".join(head), inputs, table]
        if self.notes:
            parts.append(format_list("notes", self.notes))
        if self.consumers != ["peft"]:
            parts.append(format_for(self.for_report))
        parts.append(
            f"{written_modules([m.module for m in self.modules], self.for_report)}; adapter: "
            f"{format_count(self.adapter_parameters)} parameters, "
            f"{format_bytes(self.adapter_bytes)}"
        )
        if self.output:
            parts.append(f"wrote {self.output}")
        return "\n\n".join(parts)
