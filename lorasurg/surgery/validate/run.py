"""The list of checks ``validate`` runs, and how it runs them.

A check is a function ``Subject -> list[Finding]`` with the inputs it needs (:class:`Check`). :data:`CHECKS` is
the default list (its last check, ``consumers``, reads ``subject.consumers``: the consumers named with ``--for``);
a caller adds producers of its own by passing ``checks=CHECKS + (Check(...),)``. A check whose inputs are missing
does not run, and one ``check-skipped`` finding per missing input says which checks did not run and why. Every
check runs before anything is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ...errors import LorasurgError
from ...findings import SEVERITIES, Finding
from .config_checks import check_config
from .consumer_checks import check_consumers
from .expert_checks import check_experts
from .layout_checks import check_layouts
from .structure_checks import check_replication, check_tokens
from .subject import Subject
from .target_checks import check_patterns, check_targets
from .tensor_checks import check_dtypes, check_shapes, check_tensors
from .value_checks import check_values

__all__ = ["Check", "CHECKS", "run_checks"]


@dataclass(frozen=True)
class Check:
    """One producer of findings.

    Attributes:
        name: a short name, shown when the check is skipped.
        run: the check.
        needs: what it reads besides the subject's files: ``"config"`` (a usable config), ``"tensors"`` (the
            weights, read), ``"base"`` (a base model).
    """

    name: str
    run: Callable[[Subject], list[Finding]]
    needs: tuple[str, ...] = ()


CHECKS: tuple[Check, ...] = (
    Check("files", lambda subject: list(subject.read_findings)),
    Check("config", check_config),
    Check("targets", check_targets, ("config", "base")),
    Check("patterns", check_patterns, ("config",)),
    Check("tensors", check_tensors, ("config", "tensors")),
    Check("dtypes", check_dtypes, ("tensors",)),
    Check("shapes", check_shapes, ("tensors", "base")),
    Check("experts", check_experts, ("config", "base")),
    Check("values", check_values, ("tensors",)),
    Check("replication", check_replication),
    Check("tokens", check_tokens, ("config", "tensors")),
    Check("layouts", check_layouts, ("config", "tensors")),  # MoE and multimodal layouts, PEFT on transformers 5
    Check("consumers", check_consumers),  # checks its own inputs: it needs the tensors only with --for
)
"""The checks ``validate`` runs by default, in order."""


def _available(subject: Subject) -> dict[str, bool]:
    return {"config": subject.config is not None, "tensors": subject.adapter is not None,
            "base": subject.base is not None}


def _skip_reasons(subject: Subject) -> dict[str, tuple[str, str, str]]:
    """``{need: (where, why, fix)}`` for a skipped check's finding."""
    return {
        "base": ("--base", "no base model was given", "give --base BASE (the model the adapter was trained on)"),
        "config": (str(subject.config_file or subject.source),
                   "the config is missing, unreadable or has fields of the wrong type (see the findings above)",
                   "fix the config, then validate again"),
        "tensors": (str(subject.weights_file or subject.source),
                    "the weights are missing or unreadable (see the findings above)",
                    "fix the weights file, then validate again"),
    }


def run_checks(subject: Subject, checks: Sequence[Check] = CHECKS) -> list[Finding]:
    """Run every check that has its inputs; return all findings, errors first, then warnings, then info.

    A check that raises a :class:`~lorasurg.errors.LorasurgError` (e.g. targeting options lorasurg does not model)
    gives a ``check-skipped`` finding with the reason; so does any error of a check run on a config that has
    problems already reported.
    """
    available = _available(subject)
    skipped: dict[str, list[str]] = {}
    found: list[Finding] = []
    tolerant = subject.reading is not None and bool(subject.reading.problems)
    for check in checks:
        missing = [need for need in check.needs if not available[need]]
        if missing:
            if "tensors" in missing and subject.directory is None:
                continue  # a bare config has no tensors to check: nothing was skipped
            skipped.setdefault(missing[0], []).append(check.name)
            continue
        try:
            found += check.run(subject)
        except LorasurgError as err:
            found.append(Finding("check-skipped", check.name, f"the {check.name} check could not run: {err}",
                                 "see the message; the other checks ran"))
        except Exception as err:  # noqa: BLE001 - only with a config already reported as invalid
            if not tolerant:
                raise
            found.append(Finding("check-skipped", check.name,
                                 f"the {check.name} check could not run on this config ({type(err).__name__}: {err})",
                                 "fix the config-invalid findings, then validate again"))
    reasons = _skip_reasons(subject)
    for need, names in skipped.items():
        where, why, fix = reasons[need]
        found.append(Finding("check-skipped", where, f"{why}: the {', '.join(names)} check(s) did not run", fix))
    return sorted(found, key=lambda f: SEVERITIES.index(f.severity))
