"""Per-module ranks and scales written as PEFT config fields: ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``.

A surgery that gives each module its own rank ``r_m`` and scale ``s_m`` (extract with a rank policy, rerank, merge)
writes them so PEFT computes exactly that scale for every module: PEFT's scale is ``alpha_m / r_m`` (``alpha_m /
sqrt(r_m)`` with rsLoRA), so ``alpha_m = s_m * r_m`` (``s_m * sqrt(r_m)``). The config's own ``r`` is the largest rank
and ``lora_alpha`` the alpha that the most modules of that rank need; every module that differs from them gets an
anchored key (:func:`lorasurg.targeting.anchored_pattern_key`, one module each) in ``rank_pattern`` and/or
``alpha_pattern`` (PEFT looks the two up separately). Tools that read only the global values (some servers) then
still apply the right scale to the modules at the global rank and scale.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

from ..config import LoraConfig
from ..targeting import rank_alpha_fields

__all__ = ["rank_scale_fields", "derive_config"]


def rank_scale_fields(modules: Mapping[str, tuple[int, float]], use_rslora: bool = False,
                      base: Optional[tuple[int, float]] = None) -> dict[str, Any]:
    """The config fields that give each module its rank and scale (see the module docstring): a dict with
    ``r``, ``lora_alpha``, ``rank_pattern`` and ``alpha_pattern``, keyword arguments for a ``LoraConfig``.

    Args:
        modules: ``{module name: (rank, scale)}``, ranks >= 1, not empty.
        use_rslora: whether the config uses rsLoRA (``alpha = scale * sqrt(r)``).
        base: force the global ``(r, scale)`` (per-expert MoE modules, which PEFT reads at the global values).

    Raises:
        ConfigError: no modules, or a rank < 1 (:func:`lorasurg.targeting.rank_alpha_fields`).
    """

    def alpha(r: int, s: float) -> float:
        return s * (math.sqrt(r) if use_rslora else r)

    return rank_alpha_fields({m: (r, alpha(r, s)) for m, (r, s) in modules.items()},
                             base=None if base is None else (base[0], alpha(*base)))


def derive_config(config: LoraConfig, **changes: Any) -> LoraConfig:
    """A copy of ``config`` with ``changes`` applied (validated again), keeping the keys it did not know, and with
    ``peft_version`` cleared so the written file names the PEFT version lorasurg writes for."""
    derived = dataclasses.replace(config, **{"peft_version": None, **changes})
    derived._unknown = config.unknown_keys  # the same private slot LoraConfig.from_dict fills
    return derived
