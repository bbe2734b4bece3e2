"""The singular-value spectrum of each module's delta, from its factors, and what it says about rank.

For a module with factors ``A: (r, in)``, ``B: (out, r)`` and scale ``s``, the delta is ``dW = s * B @ A``. Its
singular values come from the exact low-rank SVD (:func:`lorasurg.engine.lowrank.lowrank_svd`: QR of the
factors and the SVD of an ``r x r`` core), never from the dense ``(out, in)`` matrix. From them:

* ``||dW||_F = sqrt(sum_i S_i^2)``, and ``||dW||_F / ||W||_F`` against the base weight when it is given;
* the effective rank ``exp(H(p))``, ``p_i = S_i / sum_j S_j`` (:func:`lorasurg.engine.ranks.effective_rank`);
* the smallest ranks keeping 90% and 99% of ``||dW||_F^2`` (the ``energy`` rank policy), so ``r - rank_99`` is
  rank the module stores but barely uses.

DoRA's magnitude and a ``lora_B`` bias are not part of ``dW`` here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...engine.lowrank import lowrank_svd
from ...engine.ranks import RankPolicy, effective_rank
from ...io.adapter import AdapterModule
from ...io.checkpoint import Checkpoint

__all__ = ["Spectrum", "module_spectrum", "base_weight_norm"]

_ENERGY_90 = RankPolicy("energy", 0.9)
_ENERGY_99 = RankPolicy("energy", 0.99)


@dataclass(frozen=True)
class Spectrum:
    """The spectrum of one module's delta ``s * B @ A`` and the figures read from it."""

    singular_values: list[float]
    norm: float
    effective_rank: float
    rank_90: int
    rank_99: int


def module_spectrum(module: AdapterModule, scale: float) -> Spectrum:
    """The exact singular values of ``scale * B @ A`` (float32, float64 factors stay float64), descending."""
    S = lowrank_svd([(scale, module.B, module.A)]).S  # (min(r, out, in),)
    values = S.detach().to("cpu", torch.float64)
    rank = values.numel()
    return Spectrum(
        singular_values=[float(v) for v in values],
        norm=math.sqrt(float(values.pow(2).sum())),
        effective_rank=effective_rank(values),
        rank_90=_ENERGY_90.choose(values, max(rank, 1)),
        rank_99=_ENERGY_99.choose(values, max(rank, 1)),
    )


def base_weight_norm(checkpoint: Checkpoint, module: str) -> Optional[float]:
    """``||W||_F`` of ``<module>.weight`` in the base checkpoint (a tied alias read through its canonical key),
    or None when the checkpoint has no such weight."""
    key = f"{module}.weight"
    key = key if key in checkpoint else checkpoint.tied_weights().get(key)
    if key is None or key not in checkpoint:
        return None
    return float(torch.linalg.vector_norm(checkpoint.get(key), dtype=torch.float64))
