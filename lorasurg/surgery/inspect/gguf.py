"""``lorasurg inspect FILE.gguf``: what is in a llama.cpp GGUF LoRA file, as llama.cpp's loader reads it.

The metadata the loader reads (architecture, ``general.type``, ``adapter.type``, ``adapter.lora.alpha``), then per
``lora_a``/``lora_b`` pair: the layout, rank ``r`` (``lora_b``'s last dimension), the scale llama.cpp applies
(``alpha / r``, 1 when alpha is 0 or missing), shapes and types, and the delta llama.cpp adds, ``scale * B @ A``
(per expert for a stacked tensor): its norm, its singular values computed from the factors (:mod:`.spectra`, never
the dense matrix), effective rank and the ranks keeping 90% / 99% of its energy. Tensors the loader skips or refuses
are listed; ``lorasurg validate FILE.gguf --base BASE`` says what each means.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from ...consumers.gguf_reading import pair_factors, pair_layout, pair_tensors
from ...io.adapter import AdapterModule
from ...io.gguf import open_gguf
from ..report import format_bytes, format_list, format_table
from .spectra import module_spectrum

__all__ = ["GgufPairSummary", "GgufInspectReport", "inspect_gguf"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class GgufPairSummary:
    """One pair: ``delta_norm`` is ``||scale * B @ A||_F`` (over every expert), ``effective_rank``/``rank_90``/
    ``rank_99`` of the delta (the mean / largest over experts for a stacked tensor)."""

    name: str
    layout: str
    rank: int
    scale: float
    lora_a: list[int]
    lora_b: list[int]
    types: list[str]
    experts: Optional[int]
    delta_norm: float
    effective_rank: float
    rank_90: int
    rank_99: int


@dataclass
class GgufInspectReport:
    """Everything ``inspect`` found in a GGUF LoRA file."""

    source: str
    metadata: dict[str, Any]
    pairs: list[GgufPairSummary] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    file_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "format": "gguf", "metadata": self.metadata,
                "pairs": [asdict(p) for p in self.pairs], "incomplete": self.incomplete, "skipped": self.skipped,
                "unexpected": self.unexpected, "file_bytes": self.file_bytes}

    def render(self) -> str:
        m = self.metadata
        head = (f"GGUF LoRA: {self.source}\ngeneral.architecture={m.get('general.architecture')} "
                f"general.type={m.get('general.type')} adapter.type={m.get('adapter.type')} "
                f"adapter.lora.alpha={m.get('adapter.lora.alpha')}")
        rows = [(p.name, p.layout + (f" x{p.experts}" if p.experts else ""), p.rank, f"{p.scale:.4g}",
                 "x".join(map(str, p.lora_a)), "x".join(map(str, p.lora_b)), "/".join(dict.fromkeys(p.types)),
                 f"{p.delta_norm:.4g}", f"{p.effective_rank:.2f}", p.rank_90, p.rank_99) for p in self.pairs]
        table = format_table(rows, ["tensor", "layout", "r", "scale", "lora_a", "lora_b", "type", "||dW||_F",
                                    "eff. rank", "r@90%", "r@99%"])
        parts = [head, table,
                 format_list("pairs missing a half (llama.cpp refuses the file)", self.incomplete),
                 format_list("skipped by llama.cpp's loader (norms)", self.skipped),
                 format_list("unexpected tensors (llama.cpp refuses the file)", self.unexpected),
                 f"{len(self.pairs)} pairs, {format_bytes(self.file_bytes)}"]
        return "\n\n".join(p for p in parts if p)


def inspect_gguf(path: PathLike) -> GgufInspectReport:
    """Summarise the GGUF LoRA file at ``path`` (see the module docstring); problems are listed, not raised.

    Raises:
        InputError: the file cannot be read as GGUF.
    """
    f = open_gguf(path)
    alpha = f.get("adapter.lora.alpha") or 0.0
    grouped = pair_tensors(list(f.entries))
    report = GgufInspectReport(os.fspath(path), dict(f.fields), skipped=grouped.norms, unexpected=grouped.unexpected,
                               file_bytes=f.path.stat().st_size)
    for name, halves in grouped.pairs.items():
        if set(halves) != {"a", "b"}:
            report.incomplete.append(name)
            continue
        ea, eb = f.entries[halves["a"]], f.entries[halves["b"]]
        rank = eb.shape[-1]
        scale = alpha / rank if alpha else 1.0
        spectra = [module_spectrum(AdapterModule(name, A, B), scale)
                   for A, B in pair_factors(name, f.read(ea.name), f.read(eb.name))]
        layout = pair_layout(name, ea.shape)
        report.pairs.append(GgufPairSummary(
            name, layout, rank, scale, list(ea.shape), list(eb.shape), [ea.type, eb.type],
            len(spectra) if layout == "experts" else None, math.sqrt(sum(s.norm ** 2 for s in spectra)),
            sum(s.effective_rank for s in spectra) / len(spectra), max(s.rank_90 for s in spectra),
            max(s.rank_99 for s in spectra)))
    return report
