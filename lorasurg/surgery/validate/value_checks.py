"""Checks of the stored values: NaN or inf anywhere, and an adapter whose ``lora_B`` is zero everywhere."""

from __future__ import annotations

import torch

from ...findings import Finding
from ...io.values import nonfinite_findings
from .subject import Subject

__all__ = ["check_values"]


def check_values(subject: Subject) -> list[Finding]:
    """``value-nonfinite`` for each tensor holding NaN or inf that is not one of the adapter's (those are among
    :meth:`~lorasurg.io.adapter.Adapter.findings`, reported by the tensor checks); ``untrained`` when every module's
    ``lora_B`` (and ``lora_B.bias``) is all zeros, so the adapter changes nothing (DoRA adapters are left out: a
    trained magnitude changes the layer even with a zero ``lora_B``)."""
    kept = set(subject.adapter.to_state_dict()) if subject.adapter is not None else set()
    found = nonfinite_findings({k: t for k, t in (subject.state or {}).items() if k not in kept})
    modules = subject.adapter.modules if subject.adapter is not None else {}
    if modules and all(_all_zero(m.B) and (m.bias is None or _all_zero(m.bias)) and m.magnitude is None
                       for m in modules.values()):
        found.append(Finding(
            "untrained", "lora_B",
            f"lora_B is all zeros in every one of the {len(modules)} modules: the adapter changes nothing",
            "was it saved before training (PEFT starts lora_B at zero), or from the wrong state?",
        ))
    return found


def _all_zero(tensor: torch.Tensor) -> bool:
    return not bool(tensor.ne(0).any())
