"""Checks of the config alone: what PEFT's LoraConfig refuses or warns about, keys it does not know, and an
init that PEFT runs again when it loads a saved adapter.

The refusals and warnings are :class:`~lorasurg.config.LoraConfig`'s own (read with
:func:`~lorasurg.config.read_config_leniently`), so this module only turns them into findings.
"""

from __future__ import annotations

import json

from ..._config_checks import reinitialised_on_load
from ...findings import Finding
from .subject import Subject

__all__ = ["check_config"]


def check_config(subject: Subject) -> list[Finding]:
    """``config-invalid``, ``config-warning``, ``config-unknown-key`` and (saved adapters) ``init-reinit``."""
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
