"""How PEFT 0.21.2 on transformers 5 sees an adapter on its base model: the config after PEFT's MoE conversion, the
parameters its ``target_parameters`` select, where each one's LoRA is saved, and the name each module's LoRA keys
are loaded under (:mod:`lorasurg.consumers.peft_conversion`).

A ``target_parameters`` LoRA is saved under the module holding the parameter, one ``.base_layer`` deeper for each
parameter of that module targeted after it (:func:`lorasurg.io.adapter.wrapper_paths`, in the module's parameter
order); PEFT selects a parameter whose full name equals an entry or ends in ``"." + entry``
(:func:`lorasurg.targeting.select_parameters`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable
from ...consumers.peft_conversion import ConvertedConfig, peft_converted_config, peft_loaded_name, \
    peft_renames_adapter_keys
from ...io.adapter import wrapper_paths
from ...targeting import select_parameters
from .base_model import BaseModel, ParameterInfo

__all__ = ["PeftView", "peft_view"]


@dataclass(frozen=True)
class PeftView:
    """An adapter's config and names as PEFT loads them on the base (module docstring).

    Attributes:
        converted: PEFT's MoE conversion of the config (:class:`~lorasurg.consumers.peft_conversion.ConvertedConfig`).
        parameters: ``{parameter name: ParameterInfo}`` the converted ``target_parameters`` select, in model order.
        paths: ``{saved module path: parameter name}`` for those parameters.
        loaded: ``{adapter module: the module name PEFT loads its LoRA under}`` where the two differ (renamed keys).
    """

    converted: ConvertedConfig
    parameters: dict[str, ParameterInfo] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    loaded: dict[str, str] = field(default_factory=dict)

    def name(self, module: str) -> str:
        """The module name PEFT loads adapter module ``module``'s LoRA under."""
        return self.loaded.get(module, module)


def peft_view(config, base: BaseModel, modules: Iterable[str] = ()) -> PeftView:
    """The view of ``config`` (and the adapter's ``modules`` names) on ``base``."""
    linear = [n for n, info in base.modules.items() if info.is_linear_like and n not in base.output_layers
              and n not in base.experts]
    converted = peft_converted_config(config, base.model_type, base.modules, linear, base.parameters)
    order = {name: i for i, name in enumerate(base.modules)}
    ranked = sorted(base.parameters.values(), key=lambda p: (order.get(p.module, len(order)), p.position))
    chosen = select_parameters(converted.config, [p.name for p in ranked])
    parameters = {name: base.parameters[name] for name in chosen}
    by_module: dict[str, list[ParameterInfo]] = {}
    for info in parameters.values():
        by_module.setdefault(info.module, []).append(info)
    paths = {}
    for module, infos in by_module.items():
        for leaf, path in wrapper_paths(module, [p.leaf for p in infos]).items():
            paths[path] = f"{module}.{leaf}"
    renames = peft_renames_adapter_keys(base.model_type)
    loaded = {}
    for module in modules:
        model_name = base.checkpoint_names.get(module)
        if model_name is not None and peft_loaded_name(module, model_name, renames) != module:
            loaded[module] = model_name
    return PeftView(converted, parameters, paths, loaded)

