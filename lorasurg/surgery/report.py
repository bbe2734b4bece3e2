"""What every surgery operation returns: a report the CLI prints as text or JSON.

A report is any object with ``to_dict()`` (JSON-serialisable) and ``render()`` (human text). Operations never
print; the CLI chooses between ``render()`` and ``json.dumps(to_dict())``.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

__all__ = ["Report", "format_table", "format_bytes", "format_count", "format_list", "model_summary"]


@runtime_checkable
class Report(Protocol):
    """The contract of an operation's result."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (what ``--json`` prints)."""
        ...

    def render(self) -> str:
        """Human-readable text (what the CLI prints without ``--json``)."""
        ...


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain-text table with columns padded to their widest cell; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells[1:])
    return "\n".join(out)


def format_list(title: str, items: Sequence[Any]) -> str:
    """``title:`` then one ``  - item`` line each (empty string for no items)."""
    return f"{title}:\n" + "\n".join(f"  - {item}" for item in items) if items else ""


def model_summary(written: Any) -> str:
    """One line on a checkpoint written by :func:`lorasurg.io.rewrite.rewrite_checkpoint` (its ``RewriteResult``)."""
    return (f"model: {written.edited} tensors rewritten, {written.copied} copied unchanged, "
            f"{len(written.weight_files)} weight file(s), {format_bytes(written.bytes)}, "
            f"{len(written.side_files)} other file(s) copied")


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_count(n: int) -> str:
    """``1234567 -> '1,234,567'``."""
    return f"{n:,}"


def _is_number(value: Any) -> bool:
    if isinstance(value, (int, float)):
        return True
    try:
        float(str(value).replace(",", "").rstrip("%"))
    except ValueError:
        return False
    return True
