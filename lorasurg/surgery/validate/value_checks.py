"""Checks of the stored values: NaN or inf anywhere, and an adapter whose ``lora_B`` is zero everywhere."""

from __future__ import annotations

import torch

from ...findings import Finding
from .subject import Subject

__all__ = ["check_values"]


def check_values(subject: Subject) -> list[Finding]:
    """``value-nonfinite`` for each tensor holding NaN or inf; ``untrained`` when every module's ``lora_B`` (and
    ``lora_B.bias``) is all zeros, so the adapter changes nothing (DoRA adapters are left out: a trained
    magnitude changes the layer even with a zero ``lora_B``)."""
    found = []
    for key, tensor in (subject.state or {}).items():
        if not tensor.is_floating_point():
            continue
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        if nan or inf:
            found.append(Finding(
                "value-nonfinite", key, f"{nan} NaN and {inf} inf among its {tensor.numel()} values "
                f"(shape {tuple(tensor.shape)}, {str(tensor.dtype).removeprefix('torch.')})",
                "the training diverged or the file was written from a broken state: use an earlier checkpoint",
            ))
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
