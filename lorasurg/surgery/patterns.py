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
from collections import Counter
from typing import Any, Mapping, Union

from ..config import LoraConfig
from ..targeting import anchored_pattern_key

__all__ = ["config_number", "rank_alpha_fields", "derive_config"]

Number = Union[int, float]


def config_number(x: float) -> Number:
    """An int when ``x`` is integral to 1e-9 relative (PEFT writes ``lora_alpha`` as an int by default), else float."""
    nearest = round(x)
    if math.isclose(x, nearest, rel_tol=1e-9, abs_tol=1e-12):
        return int(nearest)
    return float(x)


def rank_alpha_fields(modules: Mapping[str, tuple[int, float]], use_rslora: bool = False) -> dict[str, Any]:
    """The config fields that give each module its rank and scale (see the module docstring): a dict with
    ``r``, ``lora_alpha``, ``rank_pattern`` and ``alpha_pattern``, keyword arguments for a ``LoraConfig``.

    Args:
        modules: ``{module name: (rank, scale)}``, ranks >= 1, not empty.
        use_rslora: whether the config uses rsLoRA (``alpha = scale * sqrt(r)``).

    Raises:
        ValueError: no modules, or a rank < 1.
    """
    if not modules:
        raise ValueError("rank_alpha_fields needs at least one module")
    bad = {m: r for m, (r, _) in modules.items() if r < 1}
    if bad:
        raise ValueError(f"ranks must be >= 1, got {bad}")

    def alpha(rank: int, scale: float) -> Number:
        return config_number(scale * (math.sqrt(rank) if use_rslora else rank))

    alphas = {m: alpha(r, s) for m, (r, s) in modules.items()}
    r_cfg = max(r for r, _ in modules.values())
    at_top = Counter(alphas[m] for m, (r, _) in modules.items() if r == r_cfg)
    alpha_cfg = at_top.most_common(1)[0][0]
    rank_pattern = {anchored_pattern_key(m): r for m, (r, _) in modules.items() if r != r_cfg}
    alpha_pattern = {
        anchored_pattern_key(m): a for m, a in alphas.items() if not math.isclose(a, alpha_cfg, rel_tol=1e-12)
    }
    return dict(r=r_cfg, lora_alpha=alpha_cfg, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def derive_config(config: LoraConfig, **changes: Any) -> LoraConfig:
    """A copy of ``config`` with ``changes`` applied (validated again), keeping the keys it did not know, and with
    ``peft_version`` cleared so the written file names the PEFT version lorasurg writes for."""
    derived = dataclasses.replace(config, **{"peft_version": None, **changes})
    derived._unknown = config.unknown_keys  # the same private slot LoraConfig.from_dict fills
    return derived
