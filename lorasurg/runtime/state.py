"""An injected adapter <-> an :class:`Adapter` (config + per-module tensors + extra tensors), and its files.

Saving reads the wrappers' tensors into an ``Adapter``; PEFT's file naming is the ``Adapter``'s business
(:mod:`lorasurg.io.adapter`). ``extra`` holds the modules_to_save copies (``<module>.<param>``) and, with
``bias="all"``/``"lora_only"``, the biases PEFT saves with the adapter (keys as in the model's state_dict with the
adapter name taken out, e.g. ``...q_proj.base_layer.bias``).

Loading checks everything before it changes the model: the adapter's modules exist in the model (else it was made
for another model), its config selects exactly those modules, and every tensor has the shape the model needs
(all mismatches reported together). It then injects and copies the tensors in. No init runs, except the one an
adapter's config names when that init changes the base (PiSSA, OLoRA): PEFT runs it on the base first, so an
adapter trained from a PiSSA start, loaded onto the original base, gives the trained outputs (the same residual;
for ``pissa_niter_N`` the same draws from the same RNG state). ``base_is_residual=True`` skips it, for a base that
already is the residual.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..errors import InputError, ShapeMismatchError
from ..io import adapter as adapter_io
from .adapters import delete_adapter
from .experts import fuse_expert_modules
from .initialize import initialize_adapter
from .attention import attention_infos
from .inject import Plan, apply_plan, config_with, module_lookup, plan_injection, planned_infos, warn_unrun_init
from .replication import plan_replication
from .tokens import token_tensors
from .layers import expected_shapes
from .param_plan import check_parameter_fits, parameter_wrappers
from .walk import lora_layers, require_adapter, save_wrappers

__all__ = ["adapter_from_model", "save_adapter", "load_adapter"]


def _bias_tensors(model: nn.Module, adapter_name: str, bias: str) -> dict[str, Tensor]:
    """The biases PEFT saves with an adapter for its ``bias`` option, keyed as in the model's state_dict.

    With ``bias="all"`` PEFT also writes the biases of modules_to_save wrappers under ``<m>.modules_to_save.bias``
    and ``<m>.original_module.bias``, keys its own loader reports as unexpected; they are left out here (the
    copy's bias is saved as ``<m>.bias`` with the module anyway).
    """
    if bias == "lora_only":
        return {f"{name}.base_layer.bias": layer.bias for name, layer in lora_layers(model)
                if adapter_name in layer.r and layer.bias is not None}
    if bias != "all":
        return {}
    copies = tuple(f"{name}." for name, _ in save_wrappers(model))  # saved as modules_to_save already
    return {key: value for key, value in model.state_dict().items()
            if key.endswith(".bias") and ".lora_" not in key and not key.startswith(copies)}


def _unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached tensors; one that shares memory with an earlier one is cloned (safetensors refuses shared memory)."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        value = value.detach()
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def adapter_from_model(model: nn.Module, adapter_name: str = "default") -> "adapter_io.Adapter":
    """The injected adapter ``adapter_name`` as an ``Adapter`` (tensors detached, sharing memory with the model
    except where two would share memory with each other).

    Raises:
        ConfigError: the model has no adapter of that name.
    """
    config = require_adapter(model, adapter_name)
    modules = {}
    for name, layer in lora_layers(model):
        if adapter_name not in layer.r:
            continue
        A, B, bias = layer._ab(adapter_name)
        magnitude = layer.lora_magnitude_vector[adapter_name].weight if adapter_name in layer.lora_magnitude_vector \
            else None
        modules[name] = adapter_io.AdapterModule(
            name, A.detach(), B.detach(), None if bias is None else bias.detach(),
            None if magnitude is None else magnitude.detach(), embedding=adapter_name in layer.lora_embedding_A,
        )
    extra: dict[str, Tensor] = {}
    for name, wrapper in save_wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for key, value in wrapper.modules_to_save[adapter_name].state_dict().items():
                extra[f"{name}.{key}"] = value
    extra.update(_bias_tensors(model, adapter_name, getattr(config, "bias", "none")))
    extra.update(token_tensors(model, adapter_name))
    return adapter_io.Adapter(config_with(config, inference_mode=True), modules, _unshared(extra))


def save_adapter(model: nn.Module, directory: str, adapter_name: str = "default", *, force: bool = False) -> None:
    """Write adapter ``adapter_name`` of ``model`` to ``directory`` in PEFT's format (loadable by PEFT).

    Raises:
        ConfigError: the model has no adapter of that name.
        OutputExistsError: ``directory`` is not empty and ``force`` is False.
    """
    adapter_from_model(model, adapter_name).save(directory, force=force)


def _mutates_base(config: Any) -> bool:
    """The config names an init lorasurg runs that replaces the base weights by a residual (PiSSA, OLoRA)."""
    init = getattr(config, "init_lora_weights", True)
    return isinstance(init, str) and (init.lower() == "olora" or init.startswith("pissa"))


def _nearest(names: list[str], candidates: list[str]) -> list[str]:
    out: list[str] = []
    for name in names[:3]:
        out += difflib.get_close_matches(name, candidates, n=1, cutoff=0.0)
    return out


def _check_modules_exist(adapter: Any, model: nn.Module, source: str) -> None:
    """Raise if some of the adapter's LoRA modules are not in ``model``, or are layers of another kind (the
    adapter was made for another model). A replicated stack (``layer_replication``) counts as replicated.
    """
    replication = plan_replication(model, adapter.config)
    infos = attention_infos(planned_infos(model, replication), module_lookup(model, replication))
    absent = [n for n in adapter.modules if n not in infos]
    other_kind = [f"{n} (adapter: {m.kind} LoRA, model: {infos[n].type_name})"
                  for n, m in adapter.modules.items() if n in infos and infos[n].kind != m.kind]
    if not absent and not other_kind:
        return
    config = adapter.config
    made_for = (getattr(config, "auto_mapping", None) or {}).get("base_model_class") or getattr(
        config, "base_model_name_or_path", None) or "another model"
    found = []
    if absent:
        found.append(f"{len(absent)} of its {len(adapter.modules)} LoRA modules are not in the model, e.g. "
                     f"{absent[:3]} (nearest model modules: {_nearest(absent, list(infos))})")
    if other_kind:
        found.append(f"modules of another kind: {', '.join(other_kind[:3])}")
    raise InputError(f"{source} does not fit this {type(model).__name__}: {'; '.join(found)}. It was made for "
                     f"{made_for}; load it into that architecture")


def _check_fits(adapter: Any, plan: Plan, source: str) -> None:
    """Raise if the adapter's modules are not the ones its config selects or any shape differs."""
    unselected = [n for n in adapter.modules if n not in plan.targets]
    if unselected:
        raise InputError(
            f"{source} has LoRA tensors for modules its own config does not target: {unselected[:5]}; fix "
            "target_modules / layers_to_transform / exclude_modules in its adapter_config.json"
        )
    problems = []
    for name, m in adapter.modules.items():
        info, r, _ = plan.targets[name]
        want_A, want_B, out = expected_shapes(info, r)
        for label, got, want in (("A", m.A.shape, want_A), ("B", m.B.shape, want_B)):
            if tuple(got) != want:
                problems.append(f"{name} ({info.type_name}, weight {info.weight_shape}, r={r}): lora_{label} is "
                                f"{tuple(got)} in the adapter, the model needs {want}")
        for label, t in (("lora_B.bias", m.bias), ("lora_magnitude_vector", m.magnitude)):
            if t is not None and t.numel() != out:
                problems.append(f"{name}: {label} has {tuple(t.shape)}, the model needs {out} outputs")
    if problems:
        raise ShapeMismatchError(
            f"{source} does not fit this model ({len(problems)} mismatches):\n  " + "\n  ".join(problems)
            + "\nload it into the model it was trained on, or fix r / rank_pattern in its adapter_config.json"
        )


def _extra_target(key: str, adapter_name: str, state: dict[str, Tensor], wrappers: list[str]) -> Optional[str]:
    """Which key of the model's state_dict an extra tensor of the adapter goes to, or None."""
    if key.endswith(f".{adapter_io.TOKENS_PART}"):
        return f"{key}.{adapter_name}"
    for name in sorted(wrappers, key=len, reverse=True):
        if key.startswith(f"{name}."):
            rest = key[len(name) + 1:]
            if rest.startswith("original_module."):
                return key
            rest = rest.removeprefix("modules_to_save.")
            return f"{name}.modules_to_save.{adapter_name}.{rest}"
    return key if key in state else None


def _extra_targets(model: nn.Module, adapter: Any, adapter_name: str, source: str) -> dict[str, Tensor]:
    """``{model state_dict key: tensor}`` for the adapter's extra tensors; raises before anything is copied.

    Raises:
        InputError: an extra tensor has no place in the model, or a place of another shape (all listed).
    """
    state = model.state_dict(keep_vars=True)
    wrappers = [n for n, _ in save_wrappers(model)]
    found, unknown = {}, []
    for key, tensor in adapter.extra.items():
        target = _extra_target(key, adapter_name, state, wrappers)
        if target in state and tuple(state[target].shape) == tuple(tensor.shape):
            found[target] = tensor
        else:
            where = f" (model: {tuple(state[target].shape)})" if target in state else ""
            unknown.append(f"{key} {tuple(tensor.shape)}{where}")
    if unknown:
        made_for = getattr(adapter.config, "base_model_name_or_path", None) or "another model"
        raise InputError(f"{source} has tensors this model has no place for: {unknown[:5]}; it was made for "
                         f"{made_for}")
    return found


@torch.no_grad()
def _copy_in(model: nn.Module, adapter: Any, adapter_name: str, source: str) -> None:
    extra = _extra_targets(model, adapter, adapter_name, source)
    layers = dict(lora_layers(model))
    for name, m in adapter.modules.items():
        layers[name].set_tensors(adapter_name, m.A, m.B, m.bias, m.magnitude)
    missing = [n for n, layer in layers.items() if adapter_name in layer.r and n not in adapter.modules]
    for name in missing:
        initialize_adapter(layers[name], adapter_name, True, name)
    if missing:
        warnings.warn(f"{source} has no tensors for {len(missing)} module(s) its config targets, e.g. {missing[:3]}; "
                      "they start as a no-op LoRA", UserWarning, stacklevel=3)
    state = model.state_dict(keep_vars=True)
    for key, tensor in extra.items():
        state[key].data.copy_(tensor)


def load_adapter(model: nn.Module, path_or_repo: str, adapter_name: str = "default", *,
                 trainable: bool = False, base_is_residual: bool = False) -> nn.Module:
    """Load a PEFT-format adapter into ``model`` under ``adapter_name``; returns ``model``.

    Like PEFT's ``from_pretrained``: an adapter whose config says ``init_lora_weights`` "pissa", "pissa_niter_N" or
    "olora" first runs that init on ``model`` (each targeted base weight becomes its residual), then the saved
    tensors replace the initial ones, so on the original base the trained outputs come back. The adapter is frozen
    unless ``trainable``; the first adapter of a model becomes active. An adapter written with per-expert module keys
    for a transformers-5 MoE model, whose experts are fused parameters, is converted to ``target_parameters`` first
    (:func:`lorasurg.runtime.experts.fuse_expert_modules`), as PEFT does.

    Args:
        base_is_residual: ``model`` already holds the residual weights (the model PEFT trained on, saved after its
            init): load the tensors as saved and run no init. (What ``lorasurg residualize`` writes needs no flag:
            its adapter says ``init_lora_weights: true``.)

    Raises:
        InputError: the adapter cannot be read, or was made for another model (its modules are not in this one),
            or its per-expert LoRA cannot be fused (a missing expert, ranks differing between experts, ...).
        ShapeMismatchError: its tensors do not fit this model (every module and both shapes are listed).
        ConfigError: ``adapter_name`` is already taken.
    """
    source = f"adapter {path_or_repo!r}"
    adapter = fuse_expert_modules(adapter_io.Adapter.load(path_or_repo), model, source)
    config = config_with(adapter.config, inference_mode=not trainable)
    reinit = not base_is_residual and _mutates_base(config)
    warn_unrun_init(config, source)
    on_parameters = set(parameter_wrappers(model, config).values())  # LoRA on nn.Parameters, checked by param_plan
    on_modules = dataclasses.replace(adapter, modules={n: m for n, m in adapter.modules.items()
                                                       if n not in on_parameters})
    _check_modules_exist(on_modules, model, source)
    plan = plan_injection(model, config, adapter_name, check_init=reinit)
    _check_fits(on_modules, plan, source)
    check_parameter_fits(adapter, list(plan.parameters), source)
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    apply_plan(model, config, adapter_name, plan, initialize=reinit)
    try:
        _copy_in(model, adapter, adapter_name, source)
    except Exception:
        delete_adapter(model, adapter_name)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        raise
    return model
