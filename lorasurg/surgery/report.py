"""What every surgery operation returns: a report the CLI prints as text or JSON.

A report is any object with ``to_dict()`` (JSON-serialisable) and ``render()`` (human text). Operations never
print; the CLI chooses between ``render()`` and ``json.dumps(to_dict())``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from ..consumers.prepare import ForReport

__all__ = [
    "Report", "CLAMPED_FOOTNOTE", "format_table", "format_bytes", "format_count", "format_list", "model_summary",
    "format_for", "for_dict", "written_modules", "left_out_mark",
]


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


#: The footnote under a module table whose ``r`` column marks clamped ranks with ``*``.
CLAMPED_FOOTNOTE = "* rank clamped to the module's largest possible rank min(out, in)"


def format_list(title: str, items: Sequence[Any]) -> str:
    """``title:`` then one ``  - item`` line each (empty string for no items)."""
    return f"{title}:\n" + "\n".join(f"  - {item}" for item in items) if items else ""


def model_summary(written: Any) -> str:
    """One line on a checkpoint written by :func:`lorasurg.io.rewrite.rewrite_checkpoint` (its ``RewriteResult``)."""
    return (f"model: {written.edited} tensors rewritten, {written.copied} copied unchanged, "
            f"{len(written.weight_files)} weight file(s), {format_bytes(written.bytes)}, "
            f"{len(written.side_files)} other file(s) copied")


def format_for(for_report: Optional["ForReport"],
               left_out: Optional[Mapping[str, Sequence[Mapping[str, Any]]]] = None) -> str:
    """The ``--for`` section of a report: how the scale was written, then one line per named consumer but PEFT
    with what it leaves out (count, share of the delta's energy, names) and the notes of the rewrite.

    Args:
        for_report: what :func:`lorasurg.consumers.prepare_for` returned (None: no head line).
        left_out: ``{consumer: [{"name", "share", ...}]}``; default ``for_report.left_out_by_consumer()`` (extract
            adds the tensors its plan left out for the consumers).
    """
    if left_out is None:
        left_out = for_report.left_out_by_consumer() if for_report is not None else {}
    lines = [] if for_report is None else [for_report.render().splitlines()[0]]
    for name, items in left_out.items():
        if name == "peft":
            continue
        if not items:
            lines.append(f"  {name}: leaves out nothing")
            continue
        shares = [i["share"] for i in items if i["share"] is not None]
        unknown = len(items) - len(shares)
        energy = f"{100 * sum(shares):.3f}% of the delta energy" if shares else "share of the delta energy unknown"
        if shares and unknown:
            energy += f" (+{unknown} of unknown share)"
        shown = ", ".join(_item(i) for i in items[:8])
        shown += f" and {len(items) - 8} more" if len(items) > 8 else ""
        lines.append(f"  {name}: leaves out {len(items)} tensor(s)/module(s), {energy}: {shown}")
    if for_report is not None:
        lines.extend(f"  note: {n}" for n in for_report.notes)
    return "\n".join(lines)


#: features whose left-out item is a part of a module, not the whole module: the tensor's key suffix
_PART = {"lora_bias": ".lora_B.bias", "dora": ".lora_magnitude_vector"}


def _item(item: Mapping[str, Any]) -> str:
    name = item["name"]
    return name if name.startswith("config.") else name + _PART.get(item.get("feature"), "")


def written_modules(names: Sequence[str], for_report: Optional["ForReport"]) -> str:
    """``"14 modules (2 more left out for the --for consumers)"``: how many of the report's modules ``names`` the
    written adapter holds (``--for`` leaves out whole modules a named consumer cannot carry)."""
    left = len(set(names) & (for_report.left_out_modules if for_report is not None else set()))
    return f"{len(names) - left} modules" + (f" ({left} more left out for the --for consumers)" if left else "")


def left_out_mark(name: str, for_report: Optional["ForReport"]) -> str:
    """``" (left out)"`` for a module of a report's table that ``--for`` left out of the written adapter, else ``""``."""
    return " (left out)" if for_report is not None and name in for_report.left_out_modules else ""


def for_dict(for_report: Optional["ForReport"]) -> dict[str, Any]:
    """The ``--for`` keys of a report's ``to_dict()``: ``for`` (the rewrite, or None) and ``left_out_by_consumer``."""
    return {
        "for": for_report.to_dict() if for_report is not None else None,
        "left_out_by_consumer": for_report.left_out_by_consumer() if for_report is not None else {},
    }


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
