"""The consumers named with ``--for``: where vLLM or llama.cpp read the adapter other than PEFT does.

The rules and the comparison are :mod:`lorasurg.consumers` (:func:`~lorasurg.consumers.consumer_findings`); this
module turns each :class:`~lorasurg.consumers.ConsumerFinding` into a validate :class:`~lorasurg.findings.Finding`,
by the table :data:`CONSUMER_CODES`. A finding's ``where`` is ``"<consumer>: <first module> and N more"``, its
``modules`` every module (or tensor key) concerned.

PEFT itself has no consumer findings (it is the reference), so without ``--for`` (or with ``--for peft``) this
check finds nothing and does not run. Tied heads (llama.cpp refuses a LoRA on an ``lm_head`` tied to the input
embedding, and on that embedding) come from the base model's tied weights when ``--base`` is given, else from what ``extract`` writes
for a tied head and its embedding (:func:`~lorasurg.consumers.tied_modules`).
"""

from __future__ import annotations

from typing import Optional

from ...consumers import ConsumerFinding, consumer_findings
from ...findings import Finding
from .subject import Subject

__all__ = ["CONSUMER_CODES", "check_consumers", "to_finding"]

#: ConsumerFinding code (its part before ``:``) -> (finding code, whether rewriting the adapter for that consumer
#: with ``--for``/``prepare_for`` removes the finding).
CONSUMER_CODES: dict[str, tuple[str, bool]] = {
    "refuses": ("consumer-refuses", True),
    "drops": ("consumer-drops", True),
    "misreads": ("consumer-misreads", True),
    "scale": ("consumer-scale", True),
    "model-dependent": ("consumer-model-dependent", True),
    "legacy-scale": ("consumer-legacy-scale", True),
    "max-rank": ("consumer-max-rank", False),
}


def check_consumers(subject: Subject) -> list[Finding]:
    """How each consumer of ``subject.consumers`` other than PEFT reads the adapter, as findings.

    Needs the config and the tensors (ranks, biases, saved modules): without them, one ``check-skipped``
    finding says so (a config alone cannot be judged for a consumer).
    """
    names = [n for n in subject.consumers if n != "peft"]
    if not names:
        return []
    if subject.config is None or subject.adapter is None:
        what = ("PATH is a config alone" if subject.directory is None
                else "the config or the weights could not be read (see the findings above)")
        return [Finding("check-skipped", "--for", f"{what}: the consumers check ({', '.join(names)}) did not run",
                        "validate the adapter directory (config and weights) with --for")]
    model_type = subject.base.model_type if subject.base is not None else None
    found = consumer_findings(subject.adapter, names, _tied(subject), model_type)
    return [to_finding(f, subject.source) for f in found]


def to_finding(found: ConsumerFinding, source: str = "PATH") -> Finding:
    """One :class:`ConsumerFinding` as a validate finding (``source``: the adapter, for the fix's example).

    Raises:
        KeyError: a ConsumerFinding code :data:`CONSUMER_CODES` does not list (add a row and a finding code).
    """
    kind = found.code.split(":", 1)[0]
    if kind not in CONSUMER_CODES:
        raise KeyError(f"consumer finding code {found.code!r} has no validate code; add it to CONSUMER_CODES")
    code, rewritable = CONSUMER_CODES[kind]
    fix = found.hint
    if rewritable:
        fix += (f"; for an adapter already written: lorasurg.prepare_for(lorasurg.Adapter.load({source!r}), "
                f"{found.consumer!r})[0].save(OUT)")
    return Finding(code, _where(found.consumer, found.modules), found.message, fix, tuple(found.modules))


def _where(consumer: str, modules: tuple[str, ...]) -> str:
    if not modules:
        return consumer
    more = f" and {len(modules) - 1} more" if len(modules) > 1 else ""
    return f"{consumer}: {modules[0]}{more}"


def _tied(subject: Subject) -> Optional[set[str]]:
    """Adapter modules whose base weight is tied to another, or that another is tied to (from ``--base``); None
    without a base."""
    if subject.base is None:
        return None
    tied = {*subject.base.tied, *subject.base.tied.values()}
    return {name for name in subject.adapter.modules if f"{name}.weight" in tied}
