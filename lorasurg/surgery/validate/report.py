"""What ``lorasurg validate`` prints: the findings, and what ``--fix`` changed."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from ...findings import SEVERITIES, Finding

__all__ = ["Change", "FixResult", "ValidationReport", "count_line"]


@dataclass(frozen=True)
class Change:
    """One change ``--fix`` made: the finding code it answers, what it concerns, and what it did."""

    code: str
    where: str
    description: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "where": self.where, "description": self.description}


@dataclass
class FixResult:
    """What ``--fix -o OUT`` did.

    Attributes:
        output: the directory written, or None when nothing could be written (``note`` says why).
        changes: every change made; tensor values are never changed.
        remaining: the findings of the written copy, validated again the same way.
        note: why nothing was written, when so.
    """

    output: Optional[str]
    changes: list[Change] = field(default_factory=list)
    remaining: list[Finding] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "changes": [c.to_dict() for c in self.changes],
                "remaining": [f.to_dict() for f in self.remaining], "note": self.note}


def count_line(findings: list[Finding]) -> str:
    """``"2 errors, 1 warning, 0 info"``."""
    counts = Counter(f.severity for f in findings)
    words = {"error": ("error", "errors"), "warning": ("warning", "warnings"), "info": ("info", "info")}
    return ", ".join(f"{counts[s]} {words[s][counts[s] != 1]}" for s in SEVERITIES)


def _render_findings(findings: list[Finding]) -> list[str]:
    lines = []
    for f in findings:
        lines.append(f"{f.severity:<7}  {f.code}  {f.where}")
        lines.append(f"         {f.message}")
        if f.fix:
            lines.append(f"         fix: {f.fix}")
    return lines


@dataclass
class ValidationReport:
    """Everything ``validate`` found in one adapter or config.

    Attributes:
        source: PATH as given. base: ``--base`` as given, or None.
        findings: every finding, errors first.
        fix: what ``--fix`` did, or None without ``--fix``.
        consumers: the consumers checked (``--for``); ``("peft",)`` is PEFT's rules only.
    """

    source: str
    base: Optional[str]
    findings: list[Finding]
    fix: Optional[FixResult] = None
    consumers: tuple[str, ...] = ("peft",)

    @property
    def errors(self) -> int:
        """How many findings are errors (of the written copy, with ``--fix``)."""
        judged = self.fix.remaining if self.fix is not None and self.fix.output is not None else self.findings
        return sum(f.severity == "error" for f in judged)

    def to_dict(self) -> dict[str, Any]:
        counts = Counter(f.severity for f in self.findings)
        return {
            "source": self.source,
            "base": self.base,
            "consumers": list(self.consumers),
            "counts": {s: counts[s] for s in SEVERITIES},
            "findings": [f.to_dict() for f in self.findings],
            "fix": self.fix.to_dict() if self.fix is not None else None,
        }

    def render(self) -> str:
        head = f"validate {self.source}" + (f" against {self.base}" if self.base else "")
        if self.consumers != ("peft",):
            head += f", as read by {', '.join(self.consumers)}"
        parts = [head]
        if self.findings:
            parts.append("\n".join(_render_findings(self.findings)))
        parts.append(count_line(self.findings) if self.findings else "no problems found")
        if self.fix is not None:
            parts.append(self._render_fix(self.fix))
        return "\n\n".join(parts)

    @staticmethod
    def _render_fix(fix: FixResult) -> str:
        if fix.output is None:
            return f"--fix wrote nothing: {fix.note}"
        lines = [f"--fix wrote {fix.output}:"]
        lines += [f"  - [{c.code}] {c.where}: {c.description}" for c in fix.changes] or [
            "  (no safe fix applied: an unchanged copy)"]
        remaining = [f for f in fix.remaining if f.severity != "info"]
        lines.append(f"the copy has {count_line(fix.remaining)}" + (":" if remaining else ""))
        lines += [f"  - {f.severity} {f.code} {f.where}: {f.message}" for f in remaining]
        return "\n".join(lines)
