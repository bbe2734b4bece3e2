"""Put LoRA into a live model from a ``LoraConfig``, the way PEFT's ``get_peft_model`` / ``add_adapter`` do.

Which modules get LoRA, with which rank and alpha, and which modules get a trainable copy (``modules_to_save``)
is :mod:`lorasurg.targeting`'s decision (strings in, strings out); this module builds the wrappers
(:mod:`lorasurg.runtime.layers`), gives them their initial tensors (:mod:`lorasurg.runtime.initialize`) and sets
what trains. Every check runs before the model is touched.

The first adapter injected into a model becomes active and trainable and freezes every other parameter
(``bias="all"`` / ``"lora_only"`` then unfreeze biases, as PEFT does). Later adapters are added inactive and
frozen; :func:`~lorasurg.runtime.adapters.set_adapter` switches.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Any, Optional

from torch import nn

from ..engine.factors import lora_scale
from ..engine.init import InitMethod, parse_init_method
from .. import targeting
from .._config_checks import reinitialised_on_load
from ..errors import ConfigError, UnsupportedError
from ..layer_replication import replicated_view
from ..modules import ModuleInfo, output_layer_names
from .adapters import apply_trainability, set_adapter
from .base import LoraLayer
from .initialize import initialize_adapter
from .layers import expected_shapes, wrap_layer
from .attention import LoraMultiheadAttention, attention_targets
from .grouped_conv import grouped_problem
from .modules_to_save import ModulesToSave
from .replication import Replication, apply_replication, plan_replication
from .tokens import TokenTarget, TrainableTokens, plan_tokens
from .param import LoraParameter
from .param_plan import ParamTarget, apply_parameter_plan, plan_parameters, targets_only_parameters
from .walk import adapter_configs, describe_unwrapped, replace_module, unwrapped

__all__ = ["inject", "plan_injection", "Plan", "config_with"]

# Config fields of PEFT's LoraConfig that select features lorasurg's runtime does not implement.
# (ensure_weight_tying is refused by lorasurg.targeting; target_parameters is lorasurg.runtime.param_plan's.)
_UNSUPPORTED_FIELDS = (
    "megatron_config", "velora_config", "alora_invocation_tokens", "use_qalora",
    "monteclora_config", "use_bdlora", "arrow_config", "kasa_config",
)


def config_with(config: Any, **changes: Any) -> Any:
    """A deep copy of ``config`` with some fields set (the original is never mutated; nothing is re-validated,
    so only change fields whose new value cannot make the config invalid).
    """
    new = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(new, key, value)
    return new


@dataclasses.dataclass(frozen=True)
class Plan:
    """What injecting a config into a model will do, computed without touching the model.

    Attributes:
        targets: ``{module name: (ModuleInfo, r, alpha)}`` of the modules that get LoRA.
        to_save: names of the modules that get a trainable copy (modules_to_save).
        parameters: the parameters that get LoRA (``target_parameters``), in PEFT's order.
        tokens: ``{module name: TokenTarget}`` of the modules that get trainable tokens.
        replication: the layer replication to apply first (``layer_replication``), or None.
    """

    targets: dict[str, tuple[ModuleInfo, int, float]]
    to_save: list[str]
    parameters: tuple[ParamTarget, ...] = ()
    tokens: dict[str, TokenTarget] = dataclasses.field(default_factory=dict)
    replication: Optional[Replication] = None


def _init_problem(method: InitMethod, info: ModuleInfo, r: int) -> Optional[str]:
    """Why ``method`` cannot initialise a rank-``r`` LoRA on this layer, or None (checked before any layer is
    touched, since PiSSA/OLoRA change base weights as they go).
    """
    if info.kind == "embedding":
        return None  # PEFT's default embedding init is used for every method
    A_shape, _, out = expected_shapes(info, r)
    limit = min(out, math.prod(A_shape[1:]))
    if method.name == "orthogonal" and r % 2:
        return f"init_lora_weights='orthogonal' needs an even rank, got r={r}"
    if method.modifies_base and r > limit:
        return f"init_lora_weights={method.config_value!r} needs r <= min(out, in) = {limit}, got r={r}"
    return None


def plan_injection(model: nn.Module, config: Any, adapter_name: str, *, check_init: bool = True) -> Plan:
    """Decide which modules get LoRA (and with which r, alpha) and which get a trainable copy; check everything.

    ``check_init=False`` accepts any init method (loading a saved adapter runs none); otherwise the method must
    be one lorasurg implements and fit every targeted layer (even rank for orthogonal, ``r <= min(out, in)`` for
    PiSSA/OLoRA).

    Raises:
        ConfigError: the adapter name is taken or invalid, target_modules match nothing (the message lists the
            nearest module names), or a modules_to_save module is also a LoRA target.
        UnsupportedError: the config asks for a feature or an init method lorasurg does not implement, or a
            targeted module or its init is not supported (every such module is listed).
    """
    if adapter_name in adapter_configs(model):
        raise ConfigError(
            f"an adapter named {adapter_name!r} is already injected into this model; pick another adapter_name, or "
            f"delete_adapter(model, {adapter_name!r}) first"
        )
    if not adapter_name or "." in adapter_name:
        raise ConfigError(f"adapter name {adapter_name!r} must be non-empty and contain no '.'")
    unsupported = [f"{field}={getattr(config, field)!r}" for field in _UNSUPPORTED_FIELDS if getattr(config, field, None)]
    if unsupported:
        raise UnsupportedError(
            "lorasurg's runtime does not support these LoraConfig settings yet: " + ", ".join(unsupported)
            + "; use PEFT for them"
        )
    _check_bias_option(model, config)
    method = parse_init_method(getattr(config, "init_lora_weights", True)) if check_init else None
    replication = plan_replication(model, config)
    infos = planned_infos(model, replication)
    module_at = module_lookup(model, replication)
    select = config_with(config, target_parameters=None, layer_replication=None)
    names = [] if targets_only_parameters(config) else targeting.select_modules(
        select, infos, output_layer_names(model, getattr(config, "task_type", None)))
    problems: list[str] = []
    targets: dict[str, tuple[ModuleInfo, int, float]] = {}
    for name in names:
        info = infos[name]
        if isinstance(module_at(name), ModulesToSave):
            problems.append(f"{name}: it is a modules_to_save module of another adapter")
        elif isinstance(module_at(name), LoraParameter):
            problems.append(f"{name}: its parameters carry LoRA of another adapter (target_parameters)")
        elif isinstance(module_at(name.rpartition(".")[0]), nn.MultiheadAttention) and name.endswith(".out_proj"):
            problems.append(f"{name}: the out_proj of a MultiheadAttention, whose forward is never called; target "
                            f"{name.rpartition('.')[0]!r} (its LoRA covers in_proj and out_proj, as in PEFT)")
        elif info.type_name == "MultiheadAttention" or isinstance(module_at(name), LoraMultiheadAttention):
            r, alpha = targeting.rank_alpha(config, name)
            entries, found = attention_targets(module_at(name), name, r, alpha, config, check_init=check_init)
            targets.update(entries)
            problems += found
        elif info.groups != 1:
            r, alpha = targeting.rank_alpha(config, name)
            targets[name] = (info, r, alpha)
            found = grouped_problem(info, getattr(config, "init_lora_weights", True) if check_init else None)
            problems += [f"{name}: {found}"] if found else []
        elif info.kind == "embedding" and getattr(config, "lora_bias", False):
            problems.append(f"{name}: lora_bias on an embedding (PEFT refuses it too)")
        else:
            r, alpha = targeting.rank_alpha(config, name)
            targets[name] = (info, r, alpha)
            init_problem = method and _init_problem(method, info, r)
            if init_problem:
                problems.append(f"{name}: {init_problem}")
    to_save: list[str] = []
    for name in infos:
        if not targeting.is_module_to_save(config, name) or any(name.startswith(f"{s}.") for s in to_save):
            continue
        if isinstance(module_at(name), LoraLayer):
            problems.append(f"{name}: in modules_to_save but LoRA-wrapped by another adapter")
        to_save.append(name)
    if problems:
        raise UnsupportedError("cannot inject LoRA into these modules:\n  " + "\n  ".join(problems)
                               + "\nleave them out of target_modules (or use exclude_modules)")
    parameters = plan_parameters(model, config, adapter_name, targets, check_init=check_init)
    tokens = plan_tokens(model, config, infos, targets, to_save)
    _warn_bias_less(config, targets)
    return Plan(targets, to_save, tuple(parameters), tokens, replication)


def planned_infos(model: nn.Module, replication: Optional[Replication]) -> dict[str, ModuleInfo]:
    """``{name: ModuleInfo}`` of the model as targeting sees it: wrappers described by their layer, and the layer
    stack replicated when ``replication`` is to be applied (:mod:`lorasurg.layer_replication`)."""
    infos = describe_unwrapped(model)
    if replication is None:
        return infos
    return replicated_view(infos, replication.stack.prefix, replication.stack.sources)


def module_lookup(model: nn.Module, replication: Optional[Replication]):
    """``name -> module`` for a name of :func:`planned_infos` (a replicated layer: the layer it will copy)."""
    if replication is None:
        return lambda name: model.get_submodule(name) if name else model
    return lambda name: model.get_submodule(replication.stack.source_of(name)) if name else model


def _check_bias_option(model: nn.Module, config: Any) -> None:
    """PEFT allows one adapter with ``bias`` other than "none" per model (it trains and saves biases of the base)."""
    bias = getattr(config, "bias", "none")
    if bias == "none":
        return
    other = [n for n, c in adapter_configs(model).items() if getattr(c, "bias", "none") != "none"]
    if other:
        raise ConfigError(
            f"adapter {other[0]!r} already has bias={getattr(adapter_configs(model)[other[0]], 'bias')!r}; only one "
            f"adapter per model may train base biases (PEFT refuses a second one too): set bias='none' for this one"
        )


def _warn_bias_less(config: Any, targets: dict[str, tuple[ModuleInfo, int, float]]) -> None:
    """PEFT warns when lora_bias targets a layer without a bias (its merge then fails; lorasurg's creates one)."""
    if not getattr(config, "lora_bias", False):
        return
    bare = [n for n, (info, _, _) in targets.items() if info.kind != "embedding" and not info.has_bias]
    if bare:
        warnings.warn(
            f"lora_bias=True on {len(bare)} layer(s) without a bias: {', '.join(bare[:5])}"
            + (" ..." if len(bare) > 5 else "") + ". PEFT cannot merge such an adapter (merge_and_unload raises); "
            "lorasurg's merge gives these layers a bias", UserWarning, stacklevel=4)


def _stored_config(config: Any, plan: Plan) -> Any:
    """A copy of the config as it is recorded (and saved): fan_in_fan_out is true when a targeted layer is a
    GPT-2 ``Conv1D``, as PEFT sets it (the layers themselves follow their own type, whatever the config says).
    """
    return config_with(config, fan_in_fan_out=any(info.fan_in_fan_out for info, _, _ in plan.targets.values()))


def apply_plan(model: nn.Module, config: Any, adapter_name: str, plan: Plan, *, initialize: bool = True) -> None:
    """Build the wrappers of ``plan`` and record the adapter; ``initialize=False`` leaves the tensors empty (the
    caller fills them, e.g. from a file), so no init runs, base-mutating ones (PiSSA, OLoRA) included.
    """
    configs = adapter_configs(model)
    first = not configs
    if first:
        model.requires_grad_(False)
    if plan.replication is not None:
        apply_replication(model, plan.replication)
    use_rslora = bool(getattr(config, "use_rslora", False))
    for name, (info, r, alpha) in plan.targets.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, LoraLayer):
            layer = wrap_layer(layer)
            layer.train(layer.base_layer.training)
            replace_module(model, name, layer)
        layer.add_adapter(adapter_name, r, alpha, lora_scale(r, alpha, use_rslora),
                          dropout=float(getattr(config, "lora_dropout", 0.0) or 0.0),
                          lora_bias=bool(getattr(config, "lora_bias", False)),
                          use_dora=bool(getattr(config, "use_dora", False)))
        layer.lora_dropout[adapter_name].train(layer.training)
        if initialize:
            initialize_adapter(layer, adapter_name, getattr(config, "init_lora_weights", True), name)
    apply_parameter_plan(model, config, adapter_name, list(plan.parameters), initialize=initialize)
    for name in plan.to_save:
        wrapper = model.get_submodule(name)
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(unwrapped(wrapper))
            replace_module(model, name, wrapper)
        wrapper.add_adapter(adapter_name)
    add_tokens(model, plan.tokens, adapter_name)
    configs[adapter_name] = _stored_config(config, plan)
    if first:
        set_adapter(model, adapter_name)
        if not getattr(config, "inference_mode", False):
            _unfreeze_biases(model, getattr(config, "bias", "none"))
    else:
        apply_trainability(model)


def add_tokens(model: nn.Module, tokens: dict[str, TokenTarget], adapter_name: str) -> None:
    """Wrap the modules of ``tokens`` (embeddings before the heads tied to them) and add the adapter's rows."""
    for name, target in tokens.items():
        wrapper = model.get_submodule(name)
        if not isinstance(wrapper, TrainableTokens):
            tied = model.get_submodule(target.tied_to) if target.tied_to is not None else None
            wrapper = TrainableTokens(wrapper, tied)
            replace_module(model, name, wrapper)
        wrapper.token_adapter.add_adapter(adapter_name, target.indices)


def _unfreeze_biases(model: nn.Module, bias: str) -> None:
    """PEFT's ``bias`` option: "all" trains every ``*.bias`` (but those of modules_to_save originals);
    "lora_only" the biases of LoRA-wrapped layers.
    """
    if bias == "none":
        return
    if bias == "all":
        for name, param in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                param.requires_grad_(True)
        for module in model.modules():
            if isinstance(module, ModulesToSave):  # PEFT wraps these after unfreezing: their originals stay frozen
                module.original_module.requires_grad_(False)
    elif bias == "lora_only":
        for module in model.modules():
            if isinstance(module, LoraLayer) and module.bias is not None:
                module.bias.requires_grad_(True)
    else:
        raise ConfigError(f"bias={bias!r} is not one of 'none', 'all', 'lora_only'")


def inject(model: nn.Module, config: Any, adapter_name: str = "default") -> nn.Module:
    """Inject LoRA into ``model`` in place, as PEFT's ``get_peft_model`` would; returns ``model``.

    Targeted layers are replaced by wrappers with PEFT's layout (``base_layer``, ``lora_A.<adapter>``, ...), so
    ``model.state_dict()`` has PEFT's keys (without PEFT's ``base_model.model.`` prefix). The first adapter
    becomes active and only its tensors train; a further adapter is added inactive (see :func:`set_adapter`).
    PiSSA/OLoRA inits replace the targeted base weights by their residual.

    Args:
        model: any torch model.
        config: a ``LoraConfig`` (lorasurg's or PEFT's; PEFT's field names are read).
        adapter_name: the adapter's name (the ``<adapter>`` segment of the state_dict keys).

    Raises:
        ConfigError: the name is taken, target_modules match nothing, or the config is inconsistent.
        UnsupportedError: a feature or a targeted module lorasurg does not support.
    """
    plan = plan_injection(model, config, adapter_name)
    apply_plan(model, config, adapter_name, plan)
    return model


def warn_unrun_init(config: Any, source: str) -> None:
    """Warn that PEFT would run the init an adapter's config names on load (CorDA, LoftQ, LoRA-GA, EVA), which
    lorasurg does not implement: the tensors are loaded as saved."""
    init = getattr(config, "init_lora_weights", True)
    if reinitialised_on_load(init) and not (init.lower() == "olora" or init.startswith("pissa")):
        warnings.warn(
            f"{source} was initialised with init_lora_weights={init!r}, which PEFT runs again on load (changing the "
            "base or the tensors first); lorasurg does not implement it and loads the tensors as saved",
            UserWarning, stacklevel=3,
        )
