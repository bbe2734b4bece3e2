"""An adapter's LoRAs on mixture-of-experts layers, found from its names and config alone (no base model needed).

Two layouts (:mod:`lorasurg.consumers.experts`):

* **per-expert modules** keyed ``<layer>.experts.<e>.<projection>`` (``model.layers.0.mlp.experts.3.gate_proj``,
  Mixtral's ``block_sparse_moe.experts.3.w1``): :func:`expert_groups` groups them per layer and projection,
  ``"<layer>.experts.*.<projection>"`` -> ``{e: module}``. PEFT on transformers 5 reads the experts of a group at one
  rank and the config's global ``r``/``lora_alpha`` (``lorasurg validate`` says when it would not);
* **target_parameters LoRAs** (PEFT's ``ParamWrapper``): one saved module path per targeted parameter, holding every
  expert (``lora_A (r E, in)``, ``lora_B (out, r E)``, :mod:`lorasurg.engine.experts`). :func:`parameter_loras`
  finds which parameter each path is and its ``E``: the path is the module holding the parameter with one
  ``.base_layer`` per parameter of that module targeted after it, in the module's parameter order
  (:func:`lorasurg.io.adapter.wrapper_paths`); that order is the model's (``positions``, from a base model's
  description) or else the order transformers' expert modules declare their parameters in
  (:data:`PARAMETER_ORDER`); ``r`` is the config's for the parameter's name (PEFT looks a wrapper's rank up by it),
  and ``E = rows / r``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from ..io.adapter import Adapter, wrapped_module, wrapper_paths
from ..targeting import ALL_LINEAR, matches_entry, rank_alpha

__all__ = ["EXPERT_NAME", "PARAMETER_ORDER", "ParameterLora", "parameter_loras", "expert_groups", "expert_group_of"]

#: a per-expert module name: ``<layer>.experts.<e>.<projection>``
EXPERT_NAME = re.compile(r"^(?P<layer>.+\.experts)\.(?P<expert>\d+)\.(?P<projection>[^.]+)$")
#: the order transformers 5's expert modules register their parameters in (a 2-D weight is its module's first)
PARAMETER_ORDER = ("weight", "gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


@dataclass(frozen=True)
class ParameterLora:
    """One saved ``target_parameters`` LoRA.

    Attributes:
        path: its saved module path (``model.layers.0.mlp.experts.base_layer``).
        parameter: the parameter it adapts (``model.layers.0.mlp.experts.gate_up_proj``).
        experts: ``E`` (1 for a 2-D weight).
        rank: ``r`` per expert (``lora_A`` has ``r E`` rows).
        alpha: the config's ``lora_alpha`` for the parameter.
    """

    path: str
    parameter: str
    experts: int
    rank: int
    alpha: float

    @property
    def leaf(self) -> str:
        return self.parameter.rpartition(".")[2]


def parameter_loras(adapter: Adapter, positions: Optional[Mapping[str, int]] = None) -> dict[str, ParameterLora]:
    """``{saved path: ParameterLora}`` for the adapter's target_parameters LoRAs (module docstring). ``positions``:
    ``{parameter name: index among its module's parameters}`` from the base model, when known. A path whose rows
    are not a multiple of the config's rank is left out (``lorasurg validate`` reports it), and so is a module
    ``target_modules`` selects."""
    entries = list(adapter.config.target_parameters or [])
    if not entries:
        return {}
    found: dict[str, ParameterLora] = {}
    by_module: dict[str, list[str]] = {}
    for path in adapter.modules:
        by_module.setdefault(wrapped_module(path), []).append(path)
    for module, paths in by_module.items():
        leaves = _targeted_leaves(module, entries)
        if not leaves or (paths == [module] and _module_target(adapter.config.target_modules, module)):
            continue  # a LoRA on the module itself (PEFT refuses to wrap a parameter of a targeted module)
        order = {leaf: (positions or {}).get(f"{module}.{leaf}", _default_position(leaf)) for leaf in leaves}
        for leaf, path in wrapper_paths(module, sorted(leaves, key=lambda leaf: (order[leaf], leaf))).items():
            mod = adapter.modules.get(path)
            if mod is None or mod.A.dim() != 2:
                continue
            parameter = f"{module}.{leaf}"
            r, alpha = rank_alpha(adapter.config, parameter)
            rows = int(mod.A.shape[0])
            if r > 0 and rows % r == 0 and rows == mod.B.shape[1]:
                found[path] = ParameterLora(path, parameter, rows // r, r, alpha)
    return found


def _targeted_leaves(module: str, entries: Iterable[str]) -> set[str]:
    """The leaves of the parameters of ``module`` the entries select (an entry ``[owner.]leaf`` selects
    ``module.leaf`` when ``owner`` is empty, ``module`` itself or a ``.``-suffix of it)."""
    leaves = set()
    for entry in entries:
        owner, _, leaf = entry.rpartition(".")
        if not owner or module == owner or module.endswith("." + owner):
            leaves.add(leaf)
    return leaves


def _module_target(target_modules, module: str) -> bool:
    """Whether ``target_modules`` (a list, or a regex other than ``"all-linear"``) selects ``module``."""
    if isinstance(target_modules, str):
        return target_modules.lower() != ALL_LINEAR and re.fullmatch(target_modules, module) is not None
    return any(matches_entry(entry, module) for entry in target_modules or ())


def _default_position(leaf: str) -> int:
    return PARAMETER_ORDER.index(leaf) if leaf in PARAMETER_ORDER else len(PARAMETER_ORDER)


def expert_group_of(name: str) -> Optional[tuple[str, int]]:
    """``("<layer>.experts.*.<projection>", e)`` for a per-expert module name, else None."""
    found = EXPERT_NAME.match(name)
    if found is None:
        return None
    return f"{found['layer']}.*.{found['projection']}", int(found["expert"])


def expert_groups(names: Iterable[str]) -> dict[str, dict[int, str]]:
    """``{"<layer>.experts.*.<projection>": {e: module}}`` for the per-expert module names among ``names``."""
    groups: dict[str, dict[int, str]] = {}
    for name in names:
        found = expert_group_of(name)
        if found is not None:
            groups.setdefault(found[0], {})[found[1]] = name
    return {group: dict(sorted(members.items())) for group, members in groups.items()}
