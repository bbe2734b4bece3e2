"""LoRA on a grouped ``nn.Conv1d/2d/3d`` (``groups > 1``), PEFT 0.21.2's layout and rank rule.

``lora_A`` is a full conv with the base kernel, ``lora_B`` a 1x1 conv with the base layer's ``groups``, so ``r`` must
be a multiple of ``groups`` (see :mod:`lorasurg.engine.grouped_conv` for the math). Forward is the same as for any
conv, ``y = base(x) + scale * B(A(dropout(x)))``; DoRA divides by PEFT's norm (:func:`~lorasurg.engine.grouped_conv.
peft_dora_norm`). The delta is a dense kernel, which the grouped weight cannot hold: merging is refused (as PEFT
refuses it), so is ``merge_and_unload`` on a model with such a layer; ``unload`` works.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..engine.grouped_conv import grouped_init, peft_dora_norm
from ..engine.init import parse_init_method
from ..errors import UnsupportedError
from ..modules import ModuleInfo
from .base import LoraLayer
from .layers import LoraConv

__all__ = ["GroupedLoraConv", "grouped_problem"]


def grouped_problem(info: ModuleInfo, init: Union[bool, str, None]) -> Optional[str]:
    """Why a LoRA with init ``init`` cannot go on this grouped conv, or None (checked before injecting; the rank rule
    is :func:`lorasurg.targeting.select_modules`'s)."""
    if init is not None and parse_init_method(init).name not in ("kaiming", "random", "gaussian"):
        return (f"init_lora_weights={init!r} on a grouped convolution (groups={info.groups}); PEFT has it for no "
                "convolution: use True, False or 'gaussian'")
    return None


class GroupedLoraConv(LoraConv):
    """LoRA on a grouped conv: ``lora_B`` is grouped (:class:`LoraConv` builds it with the base's ``groups``),
    ``B: (out, r / groups, 1, ...)``."""

    def __init__(self, base_layer: nn.Module, info: ModuleInfo) -> None:
        LoraLayer.__init__(self, base_layer, info)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.groups = int(base_layer.groups)

    def _dora_factor(self, name: str, dtype: torch.dtype) -> Tensor:
        norm = self._peft_norm(name).to(dtype)  # (out,)
        return self.lora_magnitude_vector[name].weight.reshape(-1).to(dtype) / norm  # (out,)

    @torch.no_grad()
    def _peft_norm(self, name: str) -> Tensor:
        return peft_dora_norm(self.lora_A[name].weight.detach(), self.lora_B[name].weight.detach(),
                              self.base_layer.weight.detach(), self.scaling[name])

    @torch.no_grad()
    def reset_magnitude(self, name: str) -> None:
        target = self.lora_magnitude_vector[name].weight
        target.copy_(self._peft_norm(name).reshape(target.shape))  # (out,) -> (1, out, 1, ...)

    @torch.no_grad()
    def initialize(self, name: str, method: Union[bool, str], module_name: str = "") -> None:
        """PEFT's initial tensors for this layer (True, False or "gaussian"), from torch's global RNG."""
        weight = self.base_layer.weight
        A, B, bias = grouped_init(parse_init_method(method).name, tuple(weight.shape), self.groups, self.r[name],
                                  lora_bias=self.lora_B[name].bias is not None)
        self.set_tensors(name, A, B, bias)
        if name in self.lora_magnitude_vector:
            self.reset_magnitude(name)

    def merge(self, names=None) -> None:
        raise UnsupportedError(
            f"cannot merge a LoRA on a grouped convolution ({type(self.base_layer).__name__}, groups={self.groups}): "
            "its delta reaches every input channel, which the grouped weight cannot hold (PEFT refuses too). Keep "
            "the adapter unmerged, or unload() to get the base layer back"
        )
