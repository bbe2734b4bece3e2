"""Fill a freshly added adapter with its initial tensors, by init method name (``init_lora_weights``).

The tensors come from :func:`lorasurg.engine.init.init_factors`, the same pure functions the offline tools use:
``True`` (kaiming-uniform A, zero B), ``False``, ``"gaussian"``, ``"orthogonal"``, ``"pissa"``,
``"pissa_niter_N"``, ``"olora"`` (for a parameter wrapper, :func:`lorasurg.runtime.param.initialize_parameter_adapter`).
Randomness comes from torch's global generator in PEFT's order, so from the same seed a model gets PEFT's tensors.
PiSSA and OLoRA also return a residual base weight, which replaces the layer's weight here (as PEFT does). A DoRA
magnitude then starts at ``||W + delta||_row`` of the (possibly residual) weight.
"""

from __future__ import annotations

import warnings
from typing import Union

import torch

from ..engine.init import init_factors
from .base import LoraLayer
from .param import LoraParameter, initialize_parameter_adapter

__all__ = ["initialize_adapter", "default_initialize"]


@torch.no_grad()
def initialize_adapter(layer: LoraLayer, name: str, method: Union[bool, str], module_name: str = "") -> None:
    """Give adapter ``name`` of ``layer`` its initial tensors per ``init_lora_weights`` = ``method``.

    PiSSA/OLoRA replace ``layer.base_layer.weight`` by its residual ``W - scale * B @ A``. A method that does not
    do what its name says on this layer (e.g. PiSSA on an embedding, which PEFT initialises as usual) warns.

    Raises:
        UnsupportedError: an init method lorasurg does not implement (eva, corda, loftq, lora_ga, mica).
        ConfigError: an invalid method for this layer (odd rank for orthogonal, r > min(out, in) for PiSSA).
    """
    if isinstance(layer, LoraParameter):
        initialize_parameter_adapter(layer, name, method)
        return
    custom = getattr(type(layer), "initialize", None)  # a layer whose tensors PEFT draws otherwise (grouped conv, MHA)
    if custom is not None:
        custom(layer, name, method, module_name)
        return
    default_initialize(layer, name, method, module_name)


@torch.no_grad()
def default_initialize(layer: LoraLayer, name: str, method: Union[bool, str], module_name: str = "") -> None:
    """:func:`initialize_adapter` from :func:`lorasurg.engine.init.init_factors`, on ``layer.weight``."""
    weight = layer.weight
    lora_bias = layer._ab(name)[2] is not None
    result = init_factors(method, layer.info.kind, tuple(weight.shape), layer.r[name], layer.scaling[name],
                          weight=weight.detach(), fan_in_fan_out=layer.info.fan_in_fan_out, lora_bias=lora_bias,
                          dtype=weight.dtype, device=weight.device)
    factors = result.factors
    layer.set_tensors(name, factors.A, factors.B, factors.bias)
    if result.residual_weight is not None:
        weight.copy_(result.residual_weight)
    if result.note:
        warnings.warn(f"{module_name or type(layer.base_layer).__name__}: {result.note}", UserWarning, stacklevel=4)
    if name in layer.lora_magnitude_vector:
        layer.reset_magnitude(name)
