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

__all__ = ["Spectrum", "module_spectrum", "base_weight_norm", "BaseNorms"]

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


class BaseNorms:
    """``||W||_F`` of the base weight each inspected row stands for, read one tensor at a time.

    A row is a module (its ``.weight``; under the model's name for a renamed multimodal tower, read through the
    checkpoint's), or ``<parameter>[e]``, expert ``e`` of a fused expert parameter: slice ``e`` of the parameter
    where the checkpoint stores it fused (gpt-oss), else the expert's per-expert matrices (every projection the
    parameter fuses). The checkpoint's description is built only when a name is not a checkpoint module.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._description = None
        self._experts: dict[str, list[float]] = {}

    @property
    def description(self):
        if self._description is None:
            self._description = self.checkpoint.describe()
        return self._description

    def positions(self) -> dict[str, int]:
        """``{parameter name: position in its module}`` of the fused expert parameters (for target_parameters)."""
        if not any(".experts" in name for name in self.checkpoint.names()):
            return {}
        return {name: p.position for name, p in self.description.parameters.items()}

    def norm(self, name: str) -> Optional[float]:
        """The norm for row ``name``, or None when the base has no such weight."""
        if name.endswith("]") and "[" in name:
            parameter, _, expert = name[:-1].rpartition("[")
            norms = self._expert_norms(parameter)
            return norms[int(expert)] if norms is not None and int(expert) < len(norms) else None
        found = base_weight_norm(self.checkpoint, name)
        if found is None and f"{name}.weight" not in self.checkpoint:
            module = self.description.checkpoint_module(name)
            found = base_weight_norm(self.checkpoint, module) if module and module != name else None
        return found

    def _expert_norms(self, parameter: str) -> Optional[list[float]]:
        if parameter not in self._experts:
            info = self.description.parameters.get(parameter)
            if info is None:
                return None
            if info.stored is not None:
                weight = self.checkpoint.get(info.stored, dtype=torch.float64)  # (E, d1, d2)
                self._experts[parameter] = [float(torch.linalg.vector_norm(w)) for w in weight]
            else:
                squares = [0.0] * info.experts
                for module, slot in self.description.experts.items():
                    if slot.parameter == parameter:
                        squares[slot.expert] += base_weight_norm(self.checkpoint, module) ** 2
                self._experts[parameter] = [math.sqrt(v) for v in squares]
        return self._experts[parameter]
