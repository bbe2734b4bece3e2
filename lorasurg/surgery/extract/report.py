"""The report ``extract`` returns: every tensor that differs, what became of it, and how well the LoRA fits.

Energy means squared Frobenius norm. For a module with weight delta ``dW`` and LoRA ``scale * B @ A``:

* relative error ``||dW - scale * B @ A||_F / ||dW||_F``;
* energy kept ``sum(S[:r]**2) / ||dW||_F**2`` (``S`` the singular values of ``dW``);
* a tensor's *share* is its ``||delta||_F**2`` over the sum for every changed tensor, so the user sees what a
  dropped tensor costs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ...consumers.prepare import ForReport
from ..budget import format_size
from ..report import CLAMPED_FOOTNOTE, format_bytes, format_count, format_for, format_list, format_table

__all__ = ["ModuleFit", "TensorOutcome", "StreamedTensor", "BufferOutcome", "ExtractReport"]


@dataclass
class ModuleFit:
    """The LoRA fitted to one module's weight delta."""

    module: str
    kind: str
    shape: list[int]
    rank: int
    max_rank: int
    alpha: float
    rel_error: float
    energy_kept: float
    clamped: bool = False


@dataclass
class TensorOutcome:
    """What became of one changed tensor.

    Attributes:
        name: tensor key in the checkpoint.
        shape: its shape.
        outcome: ``lora``, ``lora_bias``, ``modules_to_save``, ``trainable_tokens`` (the rows that changed, exact),
            ``dropped`` or ``rank0`` (the rank policy gave 0: left out of target_modules).
        reason: why, for anything but ``lora``/``lora_bias``.
        energy: ``||tuned - base||_F**2`` of the tensor.
        lost: ``dropped`` for a reason other than the user's choice (:mod:`.plan`): written only with
            ``allow_dropped``, and then listed as such.
    """

    name: str
    shape: list[int]
    outcome: str
    reason: str
    energy: float
    lost: bool = False


@dataclass
class StreamedTensor:
    """A LoRA target whose delta was streamed from disk in row blocks (4 passes) instead of held in memory.

    Attributes:
        name: tensor key; shape: its shape.
        hold_bytes: what holding its delta would have needed.
        block_rows: rows per block read.
        reason: why (the budget it exceeded).
    """

    name: str
    shape: list[int]
    hold_bytes: int
    block_rows: int
    reason: str


@dataclass
class BufferOutcome:
    """A buffer (registered by the architecture, not a weight) on one side only or that differs: ignored.

    Attributes:
        name: tensor key in the checkpoint.
        shape: its shape (base's when both hold it).
        present_in: ``base``, ``tuned`` or ``both``.
        reason: ``only in base``, ``only in tuned``, or how the two differ.
        outcome: always ``buffer, ignored``.
    """

    name: str
    shape: list[int]
    present_in: str
    reason: str
    outcome: str = "buffer, ignored"


@dataclass
class ExtractReport:
    """Everything ``extract`` did; ``render()`` for people, ``to_dict()`` for ``--json``."""

    base: str
    tuned: str
    r: int
    alpha: float
    rank_policy: str
    svd: str
    device: str
    dtype: str
    lora_bias: bool
    serving: bool
    tensors_compared: int = 0
    tensors_unchanged: int = 0
    fits: list[ModuleFit] = field(default_factory=list)
    outcomes: list[TensorOutcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    buffers: list[BufferOutcome] = field(default_factory=list)
    adapter_parameters: int = 0
    adapter_bytes: int = 0
    output: Optional[str] = None
    max_memory: int = 0
    memory_budget: str = ""
    memory_in_use: int = 0
    streamed: list[StreamedTensor] = field(default_factory=list)
    consumers: list[str] = field(default_factory=lambda: ["peft"])
    for_report: Optional[ForReport] = None
    embeddings: list = field(default_factory=list)  # tokens.EmbeddingChoice of each changed embedding layer

    # ------------------------------------------------------------------------------------------ totals
    @property
    def total_energy(self) -> float:
        """Sum of ``||delta||_F**2`` over every changed tensor."""
        return sum(o.energy for o in self.outcomes)

    def share(self, outcome: TensorOutcome) -> float:
        """The tensor's fraction of the total delta energy."""
        total = self.total_energy
        return outcome.energy / total if total > 0 else 0.0

    @property
    def captured_energy(self) -> float:
        """Fraction of the total delta energy the adapter reproduces: LoRA energy kept plus exact copies."""
        total = self.total_energy
        if total <= 0:
            return 1.0
        fits = {f.module: f for f in self.fits}
        kept = 0.0
        for o in self.outcomes:
            if o.outcome in ("modules_to_save", "lora_bias", "trainable_tokens"):
                kept += o.energy
            elif o.outcome == "lora":
                fit = fits.get(o.name.rpartition(".")[0]) or fits.get(o.name)  # a module's weight, or stored experts
                kept += o.energy * (1 - fit.rel_error**2 if fit else 0.0)
        return kept / total

    def left_out(self) -> list[TensorOutcome]:
        """Changed tensors the adapter does not carry (dropped, rank 0)."""
        return [o for o in self.outcomes if o.outcome in ("dropped", "rank0")]

    def lost(self) -> list[TensorOutcome]:
        """Changed tensors left out for a reason other than the user's choice (written only with
        ``allow_dropped``)."""
        return [o for o in self.outcomes if o.lost]

    def left_out_by_consumer(self) -> dict[str, list[dict[str, Any]]]:
        """For each consumer named with ``--for``: what was left out because it cannot carry it (tensor or
        module, why, energy share; share None when unknown)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for name in self.consumers:
            items = [{"name": o.name, "why": o.reason, "share": self.share(o)}
                     for o in self.outcomes if o.outcome == "dropped" and name in _for_names(o.reason)]
            if self.for_report is not None:
                items += [{"name": x.name, "why": x.reasons.get(name, x.reason), "share": x.share}
                          for x in self.for_report.left_out_for(name)]
            out[name] = items
        return out

    # ------------------------------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "tuned": self.tuned,
            "output": self.output,
            "settings": {
                "r": self.r, "alpha": self.alpha, "rank_policy": self.rank_policy, "svd": self.svd,
                "device": self.device, "dtype": self.dtype, "lora_bias": self.lora_bias, "serving": self.serving,
                "for": list(self.consumers),
            },
            "for": self.for_report.to_dict() if self.for_report is not None else None,
            "left_out_by_consumer": self.left_out_by_consumer(),
            "lost": [{"name": o.name, "share": self.share(o), "why": o.reason} for o in self.lost()],
            "modules": [asdict(f) for f in self.fits],
            "tensors": [dict(asdict(o), share=self.share(o)) for o in self.outcomes],
            "buffers": [asdict(b) for b in self.buffers],
            "embeddings": [asdict(c) for c in self.embeddings],
            "notes": list(self.notes),
            "totals": {
                "tensors_compared": self.tensors_compared,
                "tensors_changed": len(self.outcomes),
                "tensors_unchanged": self.tensors_unchanged,
                "buffers_ignored": len(self.buffers),
                "lora_modules": len(self.fits),
                "adapter_parameters": self.adapter_parameters,
                "adapter_bytes": self.adapter_bytes,
                "delta_energy": self.total_energy,
                "captured_energy": self.captured_energy,
                "left_out_energy": sum(self.share(o) for o in self.left_out()),
            },
            "memory": self._memory_dict(),
        }

    def _memory_dict(self) -> dict[str, Any]:
        return {"max_memory": self.max_memory, "in_use_at_start": self.memory_in_use,
                "for_tensors": self.max_memory - self.memory_in_use, "budget": self.memory_budget,
                "streamed": [asdict(t) for t in self.streamed]}

    def _render_memory(self) -> str:
        """The memory budget and the LoRA targets streamed under it."""
        head = f"memory budget {format_size(self.max_memory)} ({self.memory_budget})"
        if not self.streamed:
            return head + ": every LoRA target's delta held in memory (one read each)"
        rows = [(t.name, "x".join(map(str, t.shape)), format_size(t.hold_bytes), t.block_rows) for t in self.streamed]
        left = format_size(self.max_memory - self.memory_in_use)
        return (head + f": {len(self.streamed)} LoRA target(s) streamed from disk in row blocks (4 passes each), "
                f"because holding their delta needs more than the {left} the budget leaves for tensors:\n"
                + format_table(rows, ["tensor", "shape", "to hold", "block rows"]))

    def render(self) -> str:
        head = [
            f"extract: {self.base} -> {self.tuned}",
            f"r={self.r} alpha={self.alpha:g} rank policy={self.rank_policy} svd={self.svd} device={self.device} "
            f"dtype={self.dtype} lora_bias={str(self.lora_bias).lower()} for={','.join(self.consumers)}",
        ]
        parts = ["\n".join(head)]
        if self.fits:
            rows = [
                (f.module, f.kind, "x".join(map(str, f.shape)), f"{f.rank}" + ("*" if f.clamped else ""),
                 f"{f.alpha:g}", f"{100 * f.rel_error:.2f}%", f"{100 * f.energy_kept:.2f}%")
                for f in self.fits
            ]
            table = format_table(rows, ["module", "kind", "shape", "r", "alpha", "rel. error", "energy kept"])
            if any(f.clamped for f in self.fits):
                table += "\n" + CLAMPED_FOOTNOTE
            parts.append(table)
        others = [o for o in self.outcomes if o.outcome != "lora" and not o.lost]
        if others:
            rows = [(o.name, o.outcome, f"{100 * self.share(o):.3f}%", o.reason) for o in others]
            parts.append("other changed tensors:\n" + format_table(rows, ["tensor", "became", "energy share", "why"]))
        if self.embeddings:
            rows = [(c.tensor, f"{c.changed}" + (f" +{c.added}" if c.added else "") + f" of {c.rows - c.added}",
                     format_bytes(c.tokens_bytes), "-" if c.lora_bytes is None else format_bytes(c.lora_bytes),
                     format_bytes(c.full_bytes), c.chosen, c.reason) for c in self.embeddings]
            parts.append("embedding layers (trainable tokens: the changed rows, exact; LoRA at r; the whole layer):\n"
                         + format_table(rows, ["tensor", "rows changed", "tokens", "LoRA", "full", "became", "why"]))
        if self.lost():
            rows = [(o.name, f"{100 * self.share(o):.3f}%", o.reason) for o in self.lost()]
            parts.append("changed tensors the adapter cannot carry, left out with --allow-dropped:\n"
                         + format_table(rows, ["tensor", "energy share", "why"]))
        if self.buffers:
            rows = [(b.name, "x".join(map(str, b.shape)) or "scalar", b.outcome, b.reason) for b in self.buffers]
            parts.append("buffers (registered by the architecture, not weights):\n"
                         + format_table(rows, ["tensor", "shape", "became", "why"]))
        if self.notes:
            parts.append(format_list("notes", self.notes))
        if self.max_memory:
            parts.append(self._render_memory())
        if self.consumers != ["peft"]:
            parts.append(format_for(self.for_report, self.left_out_by_consumer()))
        left = sum(self.share(o) for o in self.left_out())
        totals = (
            f"{self.tensors_compared} tensors compared, {len(self.outcomes)} changed, {self.tensors_unchanged} "
            f"unchanged; {len(self.fits)} LoRA modules; adapter: {format_count(self.adapter_parameters)} "
            f"parameters, {format_bytes(self.adapter_bytes)}; delta energy captured "
            f"{100 * self.captured_energy:.2f}%, left out {100 * left:.3f}%"
        )
        parts.append(totals)
        if self.output:
            parts.append(f"wrote {self.output}")
        return "\n\n".join(parts)


def _for_names(reason: str) -> list[str]:
    """The consumers a ``--for a, b: ...`` reason names (empty for any other reason)."""
    if not reason.startswith("--for "):
        return []
    return [n.strip() for n in reason[len("--for "):].split(":", 1)[0].split(",")]
