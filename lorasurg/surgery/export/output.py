"""``--to peft|gguf`` on the commands that write an adapter: one set of rules for where and how the result goes.

With ``to="gguf"`` the adapter is written for the consumer ``llama.cpp-gguf`` (the command's ``prepare_for`` step
leaves out what llama.cpp cannot carry and writes llama.cpp's scale), then as a GGUF LoRA file at ``output``
(:func:`~lorasurg.surgery.export.run.export_gguf`) instead of a PEFT directory; the command's report gains the
export's (:class:`WithGguf`). ``--for`` then may only name ``llama.cpp`` (or stay ``peft``): a GGUF file is read by
llama.cpp alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ...consumers import parse_consumers
from ...consumers.reading import Consumers
from ...errors import ConfigError
from ...io.adapter import Adapter
from ...io.writer import check_output_dir, check_output_file
from .report import ExportReport
from .run import CONSUMER, BaseSource, check_gguf_base, export_gguf

__all__ = ["TARGETS", "output_consumers", "check_output", "output_path", "write_output", "WithGguf"]

#: what ``--to`` accepts.
TARGETS = ("peft", "gguf")
PathLike = Union[str, "os.PathLike[str]"]


def _check_to(to: str) -> None:
    if to not in TARGETS:
        raise ConfigError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")


def output_consumers(consumers: Consumers, to: str) -> tuple[str, ...]:
    """The consumers a command writes for: ``consumers`` for PEFT output; ``llama.cpp-gguf`` for GGUF output.

    Raises:
        ConfigError: an unknown ``to``, or ``to="gguf"`` with ``--for`` naming another consumer than llama.cpp.
    """
    _check_to(to)
    names = parse_consumers(consumers)
    if to == "peft":
        return names
    others = [n for n in names if n not in ("peft", "llama.cpp", CONSUMER)]
    if others:
        raise ConfigError(f"--to gguf writes a file only llama.cpp reads; --for {','.join(others)} does not apply "
                          "to it "
                          "(write a PEFT adapter for them separately, without --to gguf)")
    return (CONSUMER,)


def output_path(default: PathLike, to: str) -> Path:
    """A command's default output for ``to``: the directory ``default``, or ``default.gguf``."""
    _check_to(to)
    return Path(default) if to == "peft" else Path(f"{os.fspath(default)}.gguf")


def check_output(output: PathLike, to: str, force: bool, base: BaseSource = None) -> Path:
    """Refuse, before any work, an output that would clobber something (a directory, or a ``.gguf`` file), and for
    GGUF a ``base`` whose architecture has no GGUF name map."""
    _check_to(to)
    if to == "peft":
        return check_output_dir(output, force)
    check_gguf_base(base)
    return check_output_file(output, force)


def write_output(adapter: Adapter, output: PathLike, *, to: str = "peft", force: bool = False,
                 base: BaseSource = None, outtype: str = "f32",
                 metadata: Optional[Mapping[str, str]] = None) -> Optional[ExportReport]:
    """Save ``adapter`` at ``output`` as a PEFT directory (None returned) or a GGUF file (its export report)."""
    _check_to(to)
    if to == "peft":
        adapter.save(output, force=force, metadata=metadata)
        return None
    return export_gguf(adapter, output, base=base, outtype=outtype, force=force)


@dataclass
class WithGguf:
    """A command's report followed by the export report of the GGUF file it wrote (attributes are the command's)."""

    report: Any
    gguf: ExportReport

    def __getattr__(self, name: str) -> Any:
        return getattr(self.report, name)

    def to_dict(self) -> dict[str, Any]:
        return {**self.report.to_dict(), "gguf": self.gguf.to_dict()}

    def render(self) -> str:
        return f"{self.report.render()}\n\n{self.gguf.render()}"
