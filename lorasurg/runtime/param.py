"""LoRA on one ``nn.Parameter`` of a module (PEFT's ``target_parameters``, its ``lora.ParamWrapper``).

Some layers hold their weights as bare parameters rather than as ``nn.Linear`` children: transformers 5's fused MoE
experts (``mlp.experts.gate_up_proj (E, 2I, H)``, ``mlp.experts.down_proj (E, H, I)``; gpt-oss stores them
``(E, in, out)``), MoE routers (``mlp.gate.weight``), custom layers. :class:`LoraParameter` wraps the module that
holds the parameter, in PEFT's layout, so ``model.state_dict()`` has PEFT's keys:

=====================================  ==========================================================================
``base_layer``                         the module holding the parameter, or the next wrapper (see below)
``lora_A.<adapter>``                   ``nn.Linear(in, r*E)``: ``A (r*E, in)``, expert-major
``lora_B.<adapter>``                   ``nn.Linear(r*E, out)``: ``B (out, r*E)``, rank-major
``lora_dropout.<adapter>``             always ``nn.Identity``
=====================================  ==========================================================================

The tensor math (layouts, ``delta[e] = scale * B_e @ A_e``) is :mod:`lorasurg.engine.param_factors`. Forward runs the
wrapped module with the parameter replaced, for that call only, by ``W + delta`` (so the module's own code, any
experts kernel included, sees the adapted weight; reading ``module.<parameter>`` outside a forward gives the base
weight, as in PEFT). Merging writes ``W + delta`` into the parameter.

Two parameters of one module get two wrappers, nested: the parameter registered first is wrapped innermost. For the
experts of Qwen3-MoE, ``gate_up_proj``'s LoRA is ``mlp.experts.base_layer.lora_A`` and ``down_proj``'s
``mlp.experts.lora_A``, PEFT's keys. Which parameters get wrapped is :mod:`lorasurg.runtime.param_plan`'s decision.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init

from ..engine.init import init_factors, parse_init_method
from ..engine.param_factors import ParamLayout, param_adapted, param_delta, param_layout, param_merged, param_unmerged
from ..modules import ModuleInfo
from .base import LoraLayer
from .walk import unwrapped

__all__ = ["LoraParameter", "initialize_parameter_adapter"]


@contextmanager
def _substituted(module: nn.Module, name: str, value: Tensor) -> Iterator[None]:
    """Inside, ``module.<name>`` is ``value`` (a plain tensor in the parameter's slot, as ``torch.func.functional_call``
    puts it); on exit the parameter is back."""
    original = module._parameters[name]
    module._parameters[name] = value
    try:
        yield
    finally:
        module._parameters[name] = original


class LoraParameter(LoraLayer):
    """LoRA on the parameter ``parameter_name`` of the module it wraps (PEFT's ``lora.ParamWrapper``).

    Attributes:
        parameter_name: the attribute name of the adapted parameter on :attr:`module`.
        layout: :class:`~lorasurg.engine.param_factors.ParamLayout` of the parameter (experts, in, out, transposed).
        num_experts, in_features, out_features: from the layout.
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        module = unwrapped(base_layer)
        param = module._parameters[parameter_name]
        layout = param_layout(tuple(param.shape), bool(getattr(module, "is_transposed", False)))
        info = ModuleInfo(type(module).__name__, "linear", False, (layout.out_features, layout.in_features), False)
        super().__init__(base_layer, info)
        self.parameter_name = parameter_name
        self.layout: ParamLayout = layout
        self.num_experts = layout.experts
        self.in_features, self.out_features = layout.in_features, layout.out_features

    @property
    def module(self) -> nn.Module:
        """The module that holds the parameter (below every nested wrapper)."""
        return unwrapped(self.base_layer)

    @property
    def parameter(self) -> nn.Parameter:
        """The adapted parameter itself (base weights; merged adapters included)."""
        return self.module._parameters[self.parameter_name]

    def _allocate(self, name: str, r: int, lora_bias: bool) -> None:
        param = self.parameter
        kw = dict(device=param.device, dtype=param.dtype)
        E = self.num_experts
        self.lora_A[name] = skip_init(nn.Linear, self.in_features, r * E, bias=False, **kw)
        self.lora_B[name] = skip_init(nn.Linear, r * E, self.out_features, bias=False, **kw)

    def delta_weight(self, name: str) -> Tensor:
        """Adapter ``name``'s change to the parameter, in its layout and dtype (detached)."""
        A, B, _ = self._ab(name)
        return param_delta(A.detach(), B.detach(), self.scaling[name], self.layout, self.parameter.dtype)

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._skip_lora():
            return self.base_layer(*args, **kwargs)
        name = next((n for n in self.active_adapters if n in self.lora_A), None)
        if name is None:
            return self.base_layer(*args, **kwargs)
        A, B, _ = self._ab(name)
        adapted = param_adapted(self.parameter, A, B, self.scaling[name], self.layout)
        with _substituted(self.module, self.parameter_name, adapted):
            return self.base_layer(*args, **kwargs)

    # ---------------------------------------------------------------------------------------------- merging
    @torch.no_grad()
    def merge(self, names: Optional[Iterable[str]] = None) -> None:
        """Merge adapters (default: the active ones) into the parameter: ``W <- W + delta``."""
        param = self.parameter
        for name in list(self.active_adapters if names is None else names):
            if name in self.merged_adapters or name not in self.r:
                continue
            A, B, _ = self._ab(name)
            param.data = param_merged(param.data, A.detach(), B.detach(), self.scaling[name], self.layout)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter out of the parameter, in reverse merge order."""
        param = self.parameter
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            A, B, _ = self._ab(name)
            param.data = param_unmerged(param.data, A.detach(), B.detach(), self.scaling[name], self.layout)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, shape={self.layout.shape}, " + super().extra_repr()


@torch.no_grad()
def initialize_parameter_adapter(layer: LoraParameter, name: str, method: Union[bool, str]) -> None:
    """Give adapter ``name`` of ``layer`` its initial tensors, as PEFT's ``ParamWrapper`` does, draw for draw.

    PEFT builds ``nn.Linear(in, r*E)`` and ``nn.Linear(r*E, out)`` (two default kaiming-uniform draws), then
    ``True``: A kaiming-uniform again, B = 0; ``False``: keeps both; ``"gaussian"``: ``A ~ N(0, 1/r^2)`` with the
    per-expert ``r``, B = 0. On a 2-D parameter ``"orthogonal"``, ``"pissa[_niter_N]"`` and ``"olora"`` are those of
    a linear layer on that parameter (PiSSA/OLoRA replace it by its residual). :mod:`lorasurg.runtime.param_plan`
    refuses those three on 3-D parameters, where PEFT fails.
    """
    parsed = parse_init_method(method)
    param, r = layer.parameter, layer.r[name]
    rows = r * layer.num_experts
    shape = (layer.out_features, layer.in_features)
    common = dict(dtype=param.dtype, device=param.device)
    if parsed.name == "gaussian":  # PEFT's std is 1/r with the per-expert r, not 1/(r*E)
        init_factors(False, "linear", shape, rows, 1.0, **common)  # the nn.Linear draws, discarded
        A = torch.nn.init.normal_(torch.empty(rows, layer.in_features), std=1 / r)
        layer.set_tensors(name, A, torch.zeros(layer.out_features, rows))
        return
    weight = param.detach() if parsed.modifies_base else None
    result = init_factors(parsed, "linear", shape, rows, layer.scaling[name], weight=weight, **common)
    layer.set_tensors(name, result.factors.A, result.factors.B)
    if result.residual_weight is not None:
        param.copy_(result.residual_weight)
