"""Fill a freshly added adapter with its initial tensors, by init method name (``init_lora_weights``).

``True``: A kaiming-uniform (``a = sqrt(5)``, as ``nn.Linear``), B zero, so the adapter starts as a no-op
(Hu et al. 2021); for an embedding A is zero and B standard normal. ``"gaussian"``: A normal with std ``1/r``.
``False``: both random (``nn.Linear``'s default init; standard normal for an embedding), for tests. Randomness
comes from torch's global generator, like ``nn.Linear``'s own init: seed with ``torch.manual_seed``.

A DoRA magnitude starts at ``||W + delta||_row`` of the (possibly residual) base weight.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import nn

from ..errors import UnsupportedError
from .base import LoraLayer

__all__ = ["initialize_adapter", "BASE_MUTATING_INITS"]

# Init methods that change the base weight (it becomes the residual W - scale * B @ A).
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq")


def _is_base_mutating(method: Union[bool, str]) -> bool:
    return isinstance(method, str) and method.lower().startswith(BASE_MUTATING_INITS)


@torch.no_grad()
def _inline_init(layer: LoraLayer, name: str, method: Union[bool, str]) -> None:
    # TEMPORARY: replace with lorasurg.engine.init once it lands (same results for True/False/"gaussian").
    if method not in (True, False, "gaussian"):
        raise UnsupportedError(
            f"init_lora_weights={method!r} is not supported yet; use True, False or 'gaussian'"
        )
    A, B, bias = layer._ab(name)
    if name in layer.lora_embedding_A:
        if method is False:
            nn.init.normal_(A)
        else:
            nn.init.zeros_(A)
        nn.init.normal_(B)
        return
    r = A.shape[0]
    if method == "gaussian":
        nn.init.normal_(A, std=1 / r)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    if method is False:
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        if bias is not None:
            bound = 1 / math.sqrt(B[0].numel())
            nn.init.uniform_(bias, -bound, bound)
    else:
        nn.init.zeros_(B)
        if bias is not None:
            nn.init.zeros_(bias)


def initialize_adapter(layer: LoraLayer, name: str, method: Union[bool, str]) -> None:
    """Give adapter ``name`` of ``layer`` its initial tensors per ``init_lora_weights`` = ``method``.

    Raises:
        UnsupportedError: an init method lorasurg does not implement (eva, corda, loftq, lora_ga, ...).
    """
    _inline_init(layer, name, method)
    if name in layer.lora_magnitude_vector:
        layer.reset_magnitude(name)
