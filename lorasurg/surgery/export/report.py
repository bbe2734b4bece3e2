"""What ``lorasurg export --to gguf`` reports: the file's architecture and alpha, each tensor pair, what was left
out."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ...consumers.prepare import ForReport
from ..report import for_dict, format_bytes, format_for, format_list, format_table

__all__ = ["GgufPair", "ExportReport"]


@dataclass
class GgufPair:
    """One ``lora_a``/``lora_b`` pair written.

    Attributes:
        name: the base weight's GGUF name (``blk.0.attn_q.weight``).
        modules: the adapter's modules it holds (every expert's, for a stacked tensor).
        layout: ``linear``, ``embedding`` or ``experts``.
        rank: ``lora_b``'s last dimension, the ``r`` of llama.cpp's ``alpha / r``.
        lora_a / lora_b: shapes (PyTorch order) and the GGML type each was written in.
        rescaled: the factor ``B @ A`` was multiplied by so that ``alpha / r`` is PEFT's scale (1.0: none).
        permuted: ``lora_b``'s rows permuted as llama.cpp permutes the base weight's (Llama-family q/k).
    """

    name: str
    modules: list[str]
    layout: str
    rank: int
    lora_a: list[int]
    lora_b: list[int]
    types: list[str]
    rescaled: float = 1.0
    permuted: bool = False


@dataclass
class ExportReport:
    """What :func:`lorasurg.export_gguf` wrote; ``render()`` for people, ``to_dict()`` for ``--json``."""

    source: str
    output: Optional[str]
    architecture: str
    hf_architecture: str
    facts_source: str
    alpha: float
    outtype: str
    pairs: list[GgufPair] = field(default_factory=list)
    for_report: Optional[ForReport] = None
    notes: list[str] = field(default_factory=list)
    file_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "output": self.output,
            "format": "gguf",
            "architecture": self.architecture,
            "hf_architecture": self.hf_architecture,
            "facts_from": self.facts_source,
            "adapter.lora.alpha": self.alpha,
            "outtype": self.outtype,
            "tensors": [asdict(p) for p in self.pairs],
            **for_dict(self.for_report),
            "notes": list(self.notes),
            "file_bytes": self.file_bytes,
        }

    def render(self) -> str:
        parts = [
            f"export: {self.source} -> {self.output or '(not written)'} (GGUF LoRA for llama.cpp)\n"
            f"general.architecture={self.architecture} ({self.hf_architecture}, from {self.facts_source}); "
            f"adapter.lora.alpha={self.alpha:g}; outtype={self.outtype}"
        ]
        rows = [
            (p.name, p.modules[0] + (f" (+{len(p.modules) - 1} experts)" if len(p.modules) > 1 else ""), p.rank,
             "x".join(map(str, p.lora_a)), "x".join(map(str, p.lora_b)), "/".join(dict.fromkeys(p.types)),
             "" if p.rescaled == 1.0 else f"x{p.rescaled:.4g}", "rows" if p.permuted else "")
            for p in self.pairs
        ]
        parts.append(format_table(rows, ["tensor", "from", "r", "lora_a", "lora_b", "type", "rescaled", "permuted"]))
        parts.append(format_for(self.for_report))
        if self.notes:
            parts.append(format_list("notes", self.notes))
        tail = f"{len(self.pairs)} tensor pairs, {format_bytes(self.file_bytes)}"
        if self.output:
            tail += (f"; wrote {self.output}\nuse it with the base model converted to GGUF, e.g.: "
                     f"llama-cli -m BASE.gguf --lora {self.output}")
        parts.append(tail)
        return "\n\n".join(p for p in parts if p)
