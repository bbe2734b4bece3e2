"""Checks of the config alone: what PEFT's LoraConfig refuses or warns about, keys it does not know, and an
init that PEFT runs again when it loads a saved adapter.

The refusals and warnings are :class:`~lorasurg.config.LoraConfig`'s own (read with
:func:`~lorasurg.config.read_config_leniently`), so this module only turns them into findings.
"""

from __future__ import annotations

import json
from typing import Optional

from ..._config_checks import reinitialised_on_load
from ...config import LoraConfig
from ...findings import Finding
from .subject import Subject

__all__ = ["check_config"]


def check_config(subject: Subject) -> list[Finding]:
    """``config-invalid``, ``config-warning``, ``config-unknown-key``, ``alpha-sign`` and (saved adapters)
    ``init-reinit``."""
    reading = subject.reading
    if reading is None:
        return []
    where = str(subject.config_file)
    found = [
        Finding("config-invalid", where, message,
                "fix the value in adapter_config.json; PEFT's LoraConfig raises on it when the adapter is loaded")
        for message, _ in reading.problems
    ]
    found += [Finding("config-warning", where, message, "remove or correct the setting: PEFT does not use it as written")
              for message in reading.warnings]
    found += [
        Finding("config-unknown-key", key,
                f"{key}={json.dumps(value, default=str)[:80]} is not a field of PEFT 0.21.2's LoraConfig",
                "written by a newer PEFT? PEFT 0.21.2 drops it with a warning; lorasurg keeps it unchanged")
        for key, value in reading.unknown.items()
    ]
    found += _alpha_signs(subject.config)
    init = subject.raw_config.get("init_lora_weights") if subject.raw_config else None
    if subject.directory is not None and reinitialised_on_load(init):
        found.append(Finding(
            "init-reinit", "init_lora_weights",
            f"init_lora_weights={init!r} in a saved adapter: PEFT runs this init again when it loads the adapter, "
            "before it copies the saved tensors in (pissa/olora/corda/loftq/lora_ga replace the base weight by a "
            "new residual, so the adapter no longer sits on the base it was trained on)",
            "set init_lora_weights to true (lorasurg validate --fix does) and load the adapter onto the residual "
            "base it was trained on, or convert it to a plain LoRA",
        ))
    return found


def _alpha_signs(config: Optional[LoraConfig]) -> list[Finding]:
    """``alpha-sign`` for ``lora_alpha`` and each ``alpha_pattern`` value that is 0 or negative. PEFT accepts them
    (its scale is ``alpha / r``), and so do vLLM and llama.cpp, which every lorasurg command follows: a negative value
    subtracts the delta (exactly: rerank, merge, convert, fuse and ``--for`` keep the sign); 0 makes the module a
    no-op in PEFT, while llama.cpp reads ``lora_alpha`` 0 as "no scaling" (scale 1)."""
    if config is None:
        return []
    values = [("lora_alpha", config.lora_alpha)]
    values += [(f"alpha_pattern[{key!r}]", value) for key, value in (config.alpha_pattern or {}).items()]
    found = []
    for where, value in values:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            effect = ("the modules it applies to get a negative scale: PEFT (and vLLM, llama.cpp) subtract their "
                      "delta" if value < 0 else
                      "the modules it applies to get scale 0: PEFT applies nothing of them (llama.cpp reads "
                      "lora_alpha 0 as scale 1)")
            found.append(Finding("alpha-sign", where, f"{where} is {value:g}: {effect}",
                                 "if the adapter is not meant to be negated or switched off, set the alpha it was "
                                 "trained with"))
    return found
