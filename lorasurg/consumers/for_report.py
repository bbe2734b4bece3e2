"""What :func:`~lorasurg.consumers.prepare.prepare_for` did to an adapter: :class:`ForReport` (layout, padding,
rescaling, what each consumer leaves out with its share of the delta, the MoE expert completion) and
:class:`LeftOut`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from .complete import ExpertFix
from .reading import MODULE_FEATURES

#: features whose LoRA module is left out whole (fan_in_fan_out: llama.cpp misreads it)
WHOLE_MODULE_FEATURES = (*MODULE_FEATURES, "fan_in_fan_out_lora")

__all__ = ["LeftOut", "ForReport"]


@dataclass
class LeftOut:
    """Something of the adapter that a named consumer cannot carry, left out of the rewritten adapter.

    Attributes:
        name: the module, or the tensor key for ``modules_to_save``.
        feature: which part (a key of :data:`~lorasurg.consumers.rules.FEATURES`).
        consumers: the named consumers that cannot carry it.
        reason: what each of them does with it (``"vLLM: ...; llama.cpp: ..."``).
        energy: its ``||delta||_F**2`` under PEFT; None when not known (DoRA rescaling, a whole saved module
            without a given delta energy).
        share: ``energy`` over the adapter's total delta energy, or None.
        reasons: ``{consumer: its rule}`` (the parts of ``reason``).
    """

    name: str
    feature: str
    consumers: tuple[str, ...]
    reason: str
    energy: Optional[float]
    share: Optional[float]
    reasons: dict[str, str] = field(default_factory=dict)


@dataclass
class ForReport:
    """What :func:`prepare_for` did; ``render()`` for people, ``to_dict()`` for JSON."""

    consumers: tuple[str, ...]
    layout: str
    r: int
    lora_alpha: float
    use_rslora: bool
    rescaled: dict[str, float] = field(default_factory=dict)
    padded: dict[str, tuple[int, int]] = field(default_factory=dict)
    padding_bytes: int = 0
    left_out: list[LeftOut] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    total_energy: float = 0.0
    experts: ExpertFix = field(default_factory=ExpertFix)

    @property
    def left_out_share(self) -> float:
        """Sum of the known shares of what was left out."""
        return sum(x.share or 0.0 for x in self.left_out)

    @property
    def left_out_modules(self) -> set[str]:
        """The LoRA modules left out whole (not written at all), for whichever named consumer."""
        return {x.name for x in self.left_out if x.feature in WHOLE_MODULE_FEATURES}

    def left_out_for(self, consumer: str) -> list[LeftOut]:
        """What ``consumer`` cannot carry."""
        return [x for x in self.left_out if consumer in x.consumers]

    def left_out_by_consumer(self) -> dict[str, list[dict]]:
        """``{consumer: [{"name", "feature", "why", "share"}, ...]}`` for every named consumer (``peft``: empty)."""
        return {name: [{"name": x.name, "feature": x.feature, "why": x.reasons.get(name, x.reason), "share": x.share}
                       for x in self.left_out_for(name)] for name in self.consumers}

    def to_dict(self) -> dict:
        return {
            "consumers": list(self.consumers),
            "layout": self.layout,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "rescaled": dict(self.rescaled),
            "padded": {k: list(v) for k, v in self.padded.items()},
            "padding_bytes": self.padding_bytes,
            "left_out": [dict(asdict(x), consumers=list(x.consumers)) for x in self.left_out],
            "left_out_share": self.left_out_share,
            "notes": list(self.notes),
            "experts": {"rank": self.experts.rank, "added": list(self.experts.added),
                        "padded": {k: list(v) for k, v in self.experts.padded.items()}, "bytes": self.experts.bytes,
                        "targets_added": list(self.experts.targets_added), "unresolved": list(self.experts.unresolved)},
        }

    def render(self) -> str:
        head = f"written for {', '.join(self.consumers)}: " + _LAYOUT_TEXT[self.layout].format(
            r=self.r, alpha=f"{self.lora_alpha:g}", n=len(self.padded), bytes=f"{self.padding_bytes:,} bytes")
        if self.rescaled:
            head += (f"; {len(self.rescaled)} module(s) had their factors rescaled so their scale is written as "
                     "the consumers read it")
        parts = [head]
        for name in self.consumers:
            items = self.left_out_for(name)
            if name == "peft" or not items:
                parts.append("  peft: the reference" if name == "peft" else f"  {name}: carries everything")
                continue
            parts.append(f"  {name} leaves out:")
            parts.extend(
                f"    - {x.name} ({x.feature}, {'share unknown' if x.share is None else f'{100 * x.share:.3f}%'}): "
                f"{x.reasons.get(name, x.reason)}" for x in items
            )
        fix = self.experts
        if fix.added or fix.padded:
            parts.append(f"  experts: {len(fix.added)} missing expert module(s) given zero factors, {len(fix.padded)} "
                         f"zero-padded to rank {fix.rank} (+{fix.bytes:,} bytes): every consumer needs every expert "
                         "of an adapted layer, with gate, up and down, at one rank")
        parts.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(parts)


_LAYOUT_TEXT = {
    "patterns": "as PEFT wrote it (rank_pattern/alpha_pattern), r={r}, lora_alpha={alpha}",
    "uniform-scale": "one scale for every module, r={r}, lora_alpha={alpha}, other ranks in rank_pattern/alpha_pattern",
    "tensor-rank": "no alpha_pattern or rsLoRA, lora_alpha={alpha} over each module's rank (r={r})",
    "padded": "every module zero-padded to rank {r} ({n} padded, +{bytes}), lora_alpha={alpha}, no patterns",
    "experts": "every routed expert at r={r}, lora_alpha={alpha} (no rsLoRA), other modules in "
               "rank_pattern/alpha_pattern",
}
