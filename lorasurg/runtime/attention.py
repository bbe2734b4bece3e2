"""LoRA on ``nn.MultiheadAttention``: its ``in_proj_weight`` and its ``out_proj``, PEFT 0.21.2's layout.

``nn.MultiheadAttention`` calls no layer's forward: ``in_proj_weight`` is a bare parameter ``(3E, E)`` (query, key
and value stacked) and ``out_proj``'s weight is read directly. PEFT's ``lora.MultiheadAttention`` therefore puts a
LoRA on each, both with the module's ``r`` and ``alpha``:

    mha.lora_A.<adapter>                   (r, E)      mha.lora_B.<adapter>                   (3E, r)
    mha.base_layer.out_proj.lora_A.<a.>    (r, E)      mha.base_layer.out_proj.lora_B.<a.>    (E, r)

and its forward runs the attention with ``W_in + s B A`` and ``W_out + s B_o A_o`` in place of the two weights
(``torch.func.functional_call`` here; PEFT swaps the tensors in and out). Only ``E``-dimensional query, key and value
(``_qkv_same_embed_dim``) are supported, and neither DoRA, ``lora_bias`` nor PiSSA/OLoRA, as in PEFT. LoRA dropout
does not apply (the LoRA is part of the weights, as in PEFT).

Where PEFT 0.21.2 is wrong: its forward and its merge add the ``out_proj`` delta twice (it replaces the weight by
``W_out + s B_o A_o`` and then merges the ``out_proj`` LoRA into that again), so PEFT computes
``W_out + 2 s B_o A_o``. lorasurg adds it once; an adapter trained with PEFT therefore gives other outputs here
unless its ``out_proj`` LoRA is zero (``tests/parity/test_layers_parity.py`` shows both).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..engine.factors import delta_weight, merged_weight, unmerged_weight
from ..engine.init import make_init_draws, parse_init_method
from ..modules import ModuleInfo, describe_module
from .base import LoraLayer
from .initialize import default_initialize
from .layers import LoraLinear

__all__ = ["LoraMultiheadAttention", "attention_targets", "attention_infos", "OUT_PROJ"]

#: Where the out_proj LoRA sits under an attention wrapper (PEFT's module path).
OUT_PROJ = "base_layer.out_proj"


def _in_proj_info(mha: nn.MultiheadAttention) -> ModuleInfo:
    """The in-projection described as the linear layer it is: weight ``(3E, E)``."""
    shape = tuple(mha.in_proj_weight.shape)
    return ModuleInfo(type(mha).__name__, "linear", False, shape, mha.in_proj_bias is not None)


def attention_targets(module: nn.Module, name: str, r: int, alpha: float, config: Any, *, check_init: bool
                      ) -> tuple[dict[str, tuple[ModuleInfo, int, float]], list[str]]:
    """The two LoRA targets of attention module ``name`` (in_proj, out_proj) and why it cannot take them, if so."""
    mha = module.base_layer if isinstance(module, LoraLayer) else module
    problems = []
    if not getattr(mha, "_qkv_same_embed_dim", True) or mha.in_proj_weight is None:
        problems.append(f"{name}: MultiheadAttention with kdim/vdim other than embed_dim (PEFT supports only equal "
                        "ones)")
    for field, what in (("use_dora", "DoRA"), ("lora_bias", "lora_bias")):
        if getattr(config, field, False):
            problems.append(f"{name}: {what} on a MultiheadAttention (PEFT refuses DoRA there and ignores the "
                            "in_proj lora_B bias)")
    init = getattr(config, "init_lora_weights", True)
    if check_init and parse_init_method(init).modifies_base:
        problems.append(f"{name}: init_lora_weights={init!r} on a MultiheadAttention (PEFT cannot decompose "
                        "in_proj_weight)")
    if problems:
        return {}, problems
    out = mha.out_proj.base_layer if isinstance(mha.out_proj, LoraLayer) else mha.out_proj
    return {name: (_in_proj_info(mha), r, alpha), f"{name}.{OUT_PROJ}": (describe_module(out), r, alpha)}, []


def attention_infos(infos: dict[str, ModuleInfo], module_at) -> dict[str, ModuleInfo]:
    """``infos`` with each attention module described as its in-projection and its out_proj added under PEFT's path
    (what an adapter's module names refer to); ``module_at(name)`` gives the module of a name."""
    out = dict(infos)
    for name, info in infos.items():
        if info.type_name == "MultiheadAttention":
            mha = module_at(name)
            mha = mha.base_layer if isinstance(mha, LoraLayer) else mha
            proj = mha.out_proj.base_layer if isinstance(mha.out_proj, LoraLayer) else mha.out_proj
            out[name], out[f"{name}.{OUT_PROJ}"] = _in_proj_info(mha), describe_module(proj)
    return out


class LoraMultiheadAttention(LoraLinear):
    """LoRA on the in-projection of an ``nn.MultiheadAttention``; its ``out_proj`` is a :class:`LoraLinear` of its
    own under ``base_layer.out_proj`` (module docstring)."""

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        super().__init__(base_layer, _in_proj_info(base_layer))
        _register_last(base_layer, "in_proj_weight")  # PEFT re-registers it: its state_dict lists it after the bias
        out = base_layer.out_proj
        _register_last(out.base_layer if isinstance(out, LoraLayer) else out, "weight")

    @property
    def weight(self) -> Tensor:
        """``in_proj_weight`` (what this LoRA adapts)."""
        return self.base_layer.in_proj_weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.in_proj_bias

    def _allocate(self, name: str, r: int, lora_bias: bool) -> None:
        weight = self.weight
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A[name] = torch.nn.utils.skip_init(nn.Linear, self.in_features, r, bias=False, **kw)
        self.lora_B[name] = torch.nn.utils.skip_init(nn.Linear, r, self.out_features, bias=False, **kw)

    @torch.no_grad()
    def initialize(self, name: str, method: Union[bool, str], module_name: str = "") -> None:
        """PEFT's draws: for a newly wrapped attention, the out_proj LoRA is built once more before the in_proj's
        (PEFT creates it, then creates it again when it adds the adapter), so those draws come first."""
        if len(self.r) == 1:
            out = self.base_layer.out_proj
            shape = tuple((out.base_layer if isinstance(out, LoraLayer) else out).weight.shape)
            make_init_draws(method, "linear", shape, self.r[name])
        default_initialize(self, name, method, module_name)

    @torch.no_grad()
    def merge(self, names=None) -> None:
        for name in list(self.active_adapters if names is None else names):
            if name in self.merged_adapters or name not in self.r:
                continue
            self.weight.data = merged_weight(self._detached_factors(name), self.weight.data)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.weight.data = unmerged_weight(self._detached_factors(name), self.weight.data)

    def forward(self, query: Tensor, *args: Any, **kwargs: Any):
        params = {}
        if not self._skip_lora():
            params["in_proj_weight"] = _adapted(self, self.weight)
        out = self.base_layer.out_proj
        if isinstance(out, LoraLayer) and not out._skip_lora():
            params["out_proj.base_layer.weight"] = _adapted(out, out.base_layer.weight)
        if not params:
            return self.base_layer(query, *args, **kwargs)
        result = torch.func.functional_call(self.base_layer, params, (query, *args), kwargs)
        return result[0].to(query.dtype), None if result[1] is None else result[1].to(query.dtype)


def _register_last(module: nn.Module, name: str) -> None:
    """Register parameter ``name`` of ``module`` again, so that it comes last in the state_dict (PEFT's order)."""
    param = module._parameters.pop(name)
    module.register_parameter(name, param)


def _adapted(layer: LoraLayer, weight: Tensor) -> Tensor:
    """``W + sum of scale * B @ A`` over the layer's active adapters, differentiable in A and B."""
    for name in layer.active_adapters:
        if name in layer.lora_A:
            weight = weight + delta_weight(layer.factors(name), tuple(weight.shape)).to(weight.dtype)
    return weight
