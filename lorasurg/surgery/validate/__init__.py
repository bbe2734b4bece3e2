"""``lorasurg validate``: say exactly what is wrong with a LoRA adapter or config, and what to do.

The adapter (a directory, its ``adapter_config.json`` alone, or a hub id) is read leniently
(:mod:`.subject`), then every check of :data:`.run.CHECKS` runs, by area:

* files (:mod:`.subject`): missing, unreadable or pickle-based files, keys that are not PEFT's;
* the config alone (:mod:`.config_checks`): PEFT's refusals and warnings, unknown keys, re-run inits;
* the config against the base model (:mod:`.target_checks`): targets, excludes, layers, patterns, ranks,
  modules_to_save;
* the tensors (:mod:`.tensor_checks`): against the config and against the base model's layers;
* values (:mod:`.value_checks`): NaN/inf, an untrained adapter;
* the consumers named with ``--for`` (:mod:`.consumer_checks`): what vLLM or llama.cpp refuse, drop silently,
  misread, or scale differently from PEFT.

A GGUF LoRA file (llama.cpp's format, recognised by its magic bytes) is checked as llama.cpp's loader reads it
instead (:mod:`.gguf_checks`): metadata, pairs, ranks, values and, with a base model, architecture and shapes.

Each finding has a code from :data:`lorasurg.findings.CODES`. ``--fix`` (:mod:`.fix`) writes a corrected copy
for the fixes that cannot change what the adapter does; it does not rewrite an adapter for a consumer (that changes
tensor values: ``--for`` on the writing commands, or :func:`lorasurg.prepare_for`, does).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

from ...consumers import parse_consumers
from ...consumers.reading import Consumers
from ...errors import InputError
from ...findings import SEVERITIES, Finding
from ...io.gguf import is_gguf
from ...io.writer import check_output_dir
from .consumer_checks import CONSUMER_CODES
from .fix import FIXERS, write_fixed_copy
from .gguf_checks import check_gguf
from .report import Change, FixResult, ValidationReport
from .run import CHECKS, Check, run_checks
from .subject import BaseModel, Subject, load_subject, open_base

__all__ = [
    "validate", "validate_adapter", "ValidationReport", "FixResult", "Change", "Check", "CHECKS", "FIXERS",
    "Subject", "BaseModel", "load_subject", "open_base", "run_checks", "CONSUMER_CODES",
]

PathLike = Union[str, "os.PathLike[str]"]


def validate(path: PathLike, base: Optional[PathLike] = None, consumers: Consumers = None, *,
             checks: Sequence[Check] = CHECKS) -> list[Finding]:
    """Every finding for the adapter or config at ``path`` (errors first; empty when nothing is wrong).

    Args:
        path: an adapter directory, its ``adapter_config.json`` (the config alone), or a hub repo id.
        base: the base model (checkpoint directory, weights file or hub id) to check targets and shapes against;
            without it those checks are skipped (one ``check-skipped`` finding says so).
        consumers: who will load the adapter, as ``--for`` takes them (``"vllm,llama.cpp"``, ``"all"``, a list);
            for each but PEFT, what it refuses, drops silently, misreads or scales differently from PEFT
            (``consumer-*`` findings). None or ``"peft"``: PEFT's rules only.
        checks: the producers of findings to run (default :data:`CHECKS`).

    Raises:
        ConfigError: an unknown consumer name (the message lists the names).
        InputError: validation cannot run: ``path`` does not exist or holds no adapter, the base model cannot
            be opened.
    """
    if is_gguf(path):
        return _by_severity(check_gguf(path, base))
    return run_checks(load_subject(path, base, parse_consumers(consumers)), checks)


def _by_severity(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


def validate_adapter(
    path: PathLike,
    base: Optional[PathLike] = None,
    *,
    consumers: Consumers = None,
    fix_output: Optional[PathLike] = None,
    force: bool = False,
    checks: Sequence[Check] = CHECKS,
) -> ValidationReport:
    """:func:`validate`, as a report; with ``fix_output``, also write a corrected copy there (see :mod:`.fix`)
    and validate the copy the same way, consumers included (the report's ``errors`` then counts the copy's).
    The copy is not rewritten for the consumers: :func:`lorasurg.prepare_for` does that.

    Raises:
        ConfigError: an unknown consumer name.
        InputError: as :func:`validate`; ``fix_output`` is the adapter's own directory.
        OutputExistsError: ``fix_output`` is not empty and ``force`` is false (checked before any work).
    """
    names = parse_consumers(consumers)
    if is_gguf(path):
        if fix_output is not None:
            raise InputError(f"--fix writes corrected PEFT adapters; {path} is a GGUF file: export it again instead "
                             "(lorasurg export ADAPTER --to gguf)")
        return ValidationReport(os.fspath(path), None if base is None else os.fspath(base),
                                _by_severity(check_gguf(path, base)), consumers=("llama.cpp",))
    if fix_output is not None:
        _refuse_in_place(path, fix_output)
        check_output_dir(fix_output, force)
    subject = load_subject(path, base, names)
    findings = run_checks(subject, checks)
    report = ValidationReport(os.fspath(path), None if base is None else os.fspath(base), findings, consumers=names)
    if fix_output is not None:
        report.fix = write_fixed_copy(subject, findings, fix_output, force)
        if report.fix.output is not None:
            report.fix.remaining = run_checks(load_subject(fix_output, subject.base, names), checks)
    return report


def _refuse_in_place(path: PathLike, fix_output: PathLike) -> None:
    source = Path(path)
    directory = source if source.is_dir() else source.parent if source.is_file() else None
    if directory is not None and Path(fix_output).resolve() == directory.resolve():
        raise InputError(f"--fix would write over the adapter it reads ({fix_output}); give another -o directory")
