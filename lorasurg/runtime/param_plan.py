"""Which parameters a config's ``target_parameters`` selects, PEFT 0.21.2's checks, and building the wrappers.

PEFT's rules (``peft/tuners/tuners_utils.py``: ``BaseTuner._inject_parameters``; ``lora/layer.py``: ``ParamWrapper``;
``lora/model.py``: ``_check_new_adapter_config``), as mirrored here:

1. Parameters are matched after modules (``target_modules``), walking the model in ``named_modules`` order and each
   module's own parameters in registration order: ``<module>.<parameter>`` is selected when an entry of
   ``target_parameters`` equals it or a ``.``-suffix of it (:func:`lorasurg.targeting.select_parameters`). Names are
   those of the unwrapped model. ``exclude_modules``, ``layers_to_transform`` and ``modules_to_save`` do not apply.
2. Rank and alpha come from ``rank_pattern``/``alpha_pattern`` matched against ``<module>.<parameter>``; ``r`` is per
   expert (``A`` has ``r * E`` rows).
3. Refused, with PEFT's reasons: ``lora_dropout != 0``, ``fan_in_fan_out``, ``lora_bias``, ``use_dora``; a
   parameter that is not 2-D or 3-D; a parameter of the top-level module; a parameter of a module that
   ``target_modules`` also targets; two adapters with ``target_parameters`` that are not the same set (the nesting
   of wrappers, hence the keys, encodes which parameter a LoRA belongs to).
4. Two parameters of one module: the one registered first is wrapped innermost, so its LoRA's name is
   ``<module>.base_layer`` (``<module>.base_layer.base_layer`` for the first of three), the last one's ``<module>``
   (:func:`lorasurg.io.adapter.wrapper_paths`).

Beyond PEFT, refused rather than mis-named: a parameter of a module inside ``modules_to_save``, of a module that
has parameters in submodules (LoRA targets in them would move under ``base_layer``), or already parametrised with
``torch.nn.utils.parametrize``; ``target_parameters`` that match no parameter at all (PEFT warns); PiSSA, OLoRA and
orthogonal inits on 3-D parameters (PEFT fails on them); ``target_modules=None`` together with ``target_parameters``
on a transformers model, where PEFT would add its default target modules for the model type
(``target_modules=[]`` targets parameters only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

from torch import nn

from .. import targeting
from ..engine.factors import lora_scale
from ..engine.init import parse_init_method
from ..engine.param_factors import ParamLayout, param_layout
from ..consumers.experts import PARAM_WRAPPER_REFUSES
from ..errors import ConfigError, LorasurgError, ShapeMismatchError, UnsupportedError
from ..io.adapter import wrapper_paths
from .base import LoraLayer
from .modules_to_save import ModulesToSave
from .param import LoraParameter, initialize_parameter_adapter
from .walk import adapter_configs, replace_module, unwrapped

__all__ = [
    "ParamTarget",
    "targets_only_parameters",
    "plan_parameters",
    "apply_parameter_plan",
    "parameter_wrappers",
    "parameter_config_problems",
    "check_parameter_fits",
]

# Why PEFT's ParamWrapper refuses each of consumers.experts.PARAM_WRAPPER_REFUSES, and the fix.
_WHY_REFUSED = {
    "lora_dropout": ("lora_dropout != 0 (dropout acts on a layer's input, and a LoRA on a parameter changes the "
                     "weight, so x cannot be factored out)", "set lora_dropout=0"),
    "lora_bias": ("lora_bias", "set lora_bias=False"),
    "use_dora": ("use_dora (DoRA)", "set use_dora=False"),
    "fan_in_fan_out": ("fan_in_fan_out (a parameter's layout comes from its shape)", "set fan_in_fan_out=False"),
}


@dataclass(frozen=True)
class ParamTarget:
    """One parameter that gets LoRA.

    Attributes:
        module: the name of the module holding it (unwrapped model).
        parameter: its attribute name.
        wrapper: the name of its :class:`LoraParameter` in the wrapped model (``module`` plus one ``.base_layer`` per
            wrapper outside it): the module name of its keys.
        layout: how the parameter reads as expert matrices.
        r, alpha: per-expert rank and alpha (rank/alpha patterns applied to :attr:`key`).
    """

    module: str
    parameter: str
    wrapper: str
    layout: ParamLayout
    r: int
    alpha: float

    @property
    def key(self) -> str:
        """``<module>.<parameter>``: what target_parameters and the patterns match."""
        return _key(self.module, self.parameter)

    @property
    def shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(A shape, B shape)``: ``(r*E, in)``, ``(out, r*E)``."""
        return self.layout.factor_shapes(self.r)


def targets_only_parameters(config: Any) -> bool:
    """True when the config targets parameters and no modules (``target_modules`` None or empty)."""
    return bool(getattr(config, "target_parameters", None)) and not getattr(config, "target_modules", None)


@dataclass(frozen=True)
class _Holder:
    name: str  # unwrapped name
    head: nn.Module  # what sits at that name in the model
    module: nn.Module  # the module holding the parameters
    saved: bool  # inside a modules_to_save wrapper


def _holders(model: nn.Module) -> Iterator[_Holder]:
    """Every module of the unwrapped model (the root as ``""``), in ``named_modules`` order, with what wraps it."""
    def visit(module: nn.Module, prefix: str, saved: bool) -> Iterator[_Holder]:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if isinstance(child, ModulesToSave):
                yield _Holder(name, child, child.original_module, True)
                yield from visit(child.original_module, f"{name}.", True)
            elif isinstance(child, LoraLayer) and not isinstance(child, LoraParameter):
                yield _Holder(name, child, child.base_layer, saved)
            else:
                inner = unwrapped(child)
                yield _Holder(name, child, inner, saved)
                yield from visit(inner, f"{name}.", saved)

    yield _Holder("", model, model, False)
    yield from visit(model, "", False)


def _chain(head: nn.Module) -> list[str]:
    """Parameter names of the :class:`LoraParameter` chain at ``head``, outermost first."""
    names = []
    while isinstance(head, LoraParameter):
        names.append(head.parameter_name)
        head = head.base_layer
    return names


def _key(module: str, parameter: str) -> str:
    return f"{module}.{parameter}" if module else parameter


def _matched(model: nn.Module, config: Any) -> list[tuple[_Holder, list[str]]]:
    """``[(holder, [parameter names in registration order])]`` that ``target_parameters`` selects (rule 1)."""
    found = []
    for holder in _holders(model):
        own = {_key(holder.name, p): p for p, _ in holder.module.named_parameters(recurse=False)}
        names = [own[key] for key in targeting.select_parameters(config, own)]
        if names:
            found.append((holder, names))
    return found


def _wrapper_names(holder: _Holder, params: list[str]) -> dict[str, str]:
    """``{parameter: wrapper name}`` (rule 4), or only those an existing chain of wrappers agrees on."""
    paths = wrapper_paths(holder.name, params)
    chain = _chain(holder.head)
    return paths if not chain or chain == list(reversed(params)) else {}


def parameter_wrappers(model: nn.Module, config: Any) -> dict[str, str]:
    """``{<module>.<parameter>: wrapper name}`` for what ``config``'s target_parameters selects (no checks): the
    wrapper names are the module names of the LoRA keys."""
    return {_key(holder.name, p): w for holder, params in _matched(model, config)
            for p, w in _wrapper_names(holder, params).items()}


def _check_adapters(model: nn.Module, config: Any, adapter_name: str) -> None:
    """Rule 3's last point: every adapter with target_parameters targets the same set."""
    mine = set(config.target_parameters)
    for other, other_config in adapter_configs(model).items():
        theirs = getattr(other_config, "target_parameters", None)
        if other != adapter_name and theirs and set(theirs) != mine:
            raise ConfigError(
                "every adapter with target_parameters must target the same set of parameters (the nesting of the "
                f"wrappers says which parameter a LoRA belongs to; PEFT refuses it too), but adapter {adapter_name!r} "
                f"has {sorted(mine)} and adapter {other!r} has {sorted(theirs)}; use the same list, or delete_adapter "
                f"{other!r} first"
            )


def parameter_config_problems(config: Any) -> list[str]:
    """The config fields that LoRA on parameters refuses (rule 3), each with its fix; empty when none."""
    return [": ".join(_WHY_REFUSED[f]) for f in PARAM_WRAPPER_REFUSES if getattr(config, f, None)]


def _init_problem(config: Any, layout: ParamLayout, r: int, check_init: bool) -> Optional[str]:
    if not check_init:
        return None
    method = parse_init_method(getattr(config, "init_lora_weights", True))
    if method.name in ("kaiming", "random", "gaussian"):
        return None
    if len(layout.shape) == 3:
        return (f"init_lora_weights={method.config_value!r} is not possible on a 3-D parameter (PEFT fails on it); "
                "use True, False or 'gaussian'")
    if method.name == "orthogonal" and r % 2:
        return f"init_lora_weights='orthogonal' needs an even rank, got r={r}"
    limit = min(layout.in_features, layout.out_features)
    if method.modifies_base and r > limit:
        return f"init_lora_weights={method.config_value!r} needs r <= min(out, in) = {limit}, got r={r}"
    return None


def _holder_problem(holder: _Holder, module_targets: Any) -> Optional[str]:
    kind = type(holder.module).__name__
    if holder.name == "":
        return "a parameter of the top-level module cannot be targeted (PEFT refuses it too); target a submodule's"
    module_lora = isinstance(holder.head, LoraLayer) and not isinstance(holder.head, LoraParameter)
    if holder.name in module_targets or module_lora:
        return (f"its module ({kind}) is also targeted with target_modules (PEFT refuses it too); leave it out of "
                "target_modules, or set target_modules=[]")
    if holder.saved:
        return f"its module ({kind}) is in modules_to_save"
    if any("." in n for n, _ in holder.module.named_parameters()):
        return (f"its module ({kind}) has submodules with parameters, whose LoRA keys would move under "
                "'base_layer'; lorasurg does not support that, target those submodules' own parameters")
    if hasattr(holder.module, "parametrizations"):
        return f"its module ({kind}) is parametrised (torch.nn.utils.parametrize), which lorasurg does not support"
    return None


def plan_parameters(model: nn.Module, config: Any, adapter_name: str, module_targets: Any = (), *,
                    check_init: bool = True) -> list[ParamTarget]:
    """The parameters ``config.target_parameters`` adapts, in PEFT's order, with every check of rules 1-4 done
    before the model is touched; ``[]`` when the config has no target_parameters.

    Args:
        model: the model (possibly wrapped already).
        config: a LoRA config (PEFT's attribute names).
        adapter_name: the adapter being added.
        module_targets: names ``target_modules`` selects for this adapter (their parameters cannot be targeted).
        check_init: check that ``init_lora_weights`` can initialise every parameter (not when loading a file).

    Raises:
        ConfigError: a refused config field, different target_parameters from another adapter, target_modules
            None on a transformers model, or target_parameters matching no parameter (nearest names listed).
        UnsupportedError: a matched parameter that cannot carry LoRA (every one listed, with why).
    """
    entries = getattr(config, "target_parameters", None)
    if not entries:
        return []
    _check_adapters(model, config, adapter_name)
    if getattr(config, "target_modules", None) is None and getattr(getattr(model, "config", None), "model_type", None):
        raise ConfigError(
            f"target_parameters={sorted(entries)!r} with target_modules=None on a {type(model).__name__}: PEFT would "
            f"also adapt its default target modules for model type {model.config.model_type!r}, which lorasurg does "
            "not model; set target_modules=[] to adapt the parameters only (PEFT's documented way), or name modules"
        )
    matched = _matched(model, config)
    if not matched:
        keys = [_key(h.name, p) for h in _holders(model) for p, _ in h.module.named_parameters(recurse=False)]
        hints = "; ".join(f"{e!r} -> {', '.join(targeting.nearest_names(e, keys)) or 'nothing similar'}"
                          for e in sorted(entries))
        raise ConfigError(
            f"target_parameters={sorted(entries)!r} matches none of the model's parameters. Nearest: {hints}. An entry "
            "must equal '<module name>.<parameter name>' or a '.'-separated suffix of it (e.g. "
            "'experts.gate_up_proj'); there is no regex matching"
        )
    problems = [f"target_parameters: LoRA on a parameter does not work with {p}"
                for p in parameter_config_problems(config)]
    targets: list[ParamTarget] = []
    for holder, params in matched:
        problem = _holder_problem(holder, module_targets)
        wrappers = _wrapper_names(holder, params)
        for p in params:
            key = _key(holder.name, p)
            param = holder.module._parameters[p]
            try:
                layout = param_layout(tuple(param.shape), bool(getattr(holder.module, "is_transposed", False)))
            except LorasurgError as err:
                problems.append(f"{key}: {err}")
                continue
            if problem or p not in wrappers:
                problems.append(f"{key}: {problem or 'its module already wraps other parameters for another adapter'}")
                continue
            r, alpha = targeting.rank_alpha(config, key)
            init = _init_problem(config, layout, r, check_init)
            if init:
                problems.append(f"{key}: {init}")
            targets.append(ParamTarget(holder.name, p, wrappers[p], layout, r, alpha))
    if problems:
        raise UnsupportedError("cannot put LoRA on these parameters:\n  " + "\n  ".join(problems))
    return targets


def apply_parameter_plan(model: nn.Module, config: Any, adapter_name: str, targets: list[ParamTarget], *,
                         initialize: bool = True) -> None:
    """Wrap the planned parameters (nesting wrappers per module, innermost first) and add adapter ``adapter_name``
    to each; ``initialize=False`` leaves the tensors empty for the caller to fill."""
    use_rslora = bool(getattr(config, "use_rslora", False))
    init = getattr(config, "init_lora_weights", True)
    for t in targets:
        head = model.get_submodule(t.module)
        wrapper = head
        while isinstance(wrapper, LoraParameter) and wrapper.parameter_name != t.parameter:
            wrapper = wrapper.base_layer
        if not isinstance(wrapper, LoraParameter):  # a new outermost wrapper
            wrapper = LoraParameter(head, t.parameter)
            wrapper.train(unwrapped(head).training)
            replace_module(model, t.module, wrapper)
        wrapper.add_adapter(adapter_name, t.r, t.alpha, lora_scale(t.r, t.alpha, use_rslora))
        wrapper.lora_dropout[adapter_name].train(wrapper.training)
        if initialize:
            initialize_parameter_adapter(wrapper, adapter_name, init)


def check_parameter_fits(adapter: Any, targets: list[ParamTarget], source: str) -> None:
    """Raise if a saved adapter's tensors for the planned parameters have other shapes, or carry a lora_B bias or
    a DoRA magnitude (all problems listed); modules absent from the file are the caller's business."""
    problems = []
    for t in targets:
        m = adapter.modules.get(t.wrapper)
        if m is None:
            continue
        want_A, want_B = t.shapes
        for label, got, want in (("A", m.A.shape, want_A), ("B", m.B.shape, want_B)):
            if tuple(got) != want:
                problems.append(f"{t.wrapper} (LoRA on {t.key}, shape {t.layout.shape}, {t.layout.experts} expert(s), "
                                f"r={t.r}): lora_{label} is {tuple(got)} in the adapter, the model needs {want}")
        if m.bias is not None or m.magnitude is not None or m.embedding:
            problems.append(f"{t.wrapper}: LoRA on a parameter has only lora_A and lora_B weights, the adapter has "
                            "more (lora_B.bias, a DoRA magnitude or embedding factors)")
    if problems:
        raise ShapeMismatchError(
            f"{source} does not fit this model's parameters ({len(problems)} problems):\n  " + "\n  ".join(problems)
            + "\nload it into the model it was trained on, or fix r / rank_pattern in its adapter_config.json"
        )
