"""``layer_replication`` on a live model: the replicated stack with shared base weights, as PEFT builds it.

PEFT 0.21.2 (``replicate_layers``, called before targeting) replaces the model's layer list by clones of the listed
layers whose parameters are the originals' (``clone_module(share_weights=True)``: a deep copy whose every parameter
is then re-registered from the source; buffers are copied), sets each clone's ``layer_idx`` attributes to its new
position, and sets ``config.num_hidden_layers`` to the new count. Targeting then sees the replicated names
(:mod:`lorasurg.layer_replication`), so every copy gets its own LoRA while the base weights stay shared.

Where PEFT is wrong: it means to refuse merging a replicated model, but its check never fires, and it merges every
copy's delta into the weight the copies share. Here, before a merge the base weights of the LoRA layers that copies
share are given to each copy as its own tensor (:func:`unshare_for_merge`), so merging one copy's adapter does not
change the others; :func:`~lorasurg.runtime.adapters.unload` puts the original layer list (and
``num_hidden_layers``) back. The record of what was replaced lives on the model as a plain attribute
(``model._lorasurg_replication``), like the adapter configs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from ..errors import UnsupportedError
from ..layer_replication import LayerStack, expand_layer_map, find_layer_stack
from .walk import lora_layers

__all__ = ["Replication", "plan_replication", "apply_replication", "undo_replication", "forget_replication",
           "unshare_for_merge", "replication_of"]

_ATTR = "_lorasurg_replication"


@dataclass
class Replication:
    """A replication to apply (or applied): the stack, the map, and (once applied) the original layer list."""

    stack: LayerStack
    layer_map: list[list[int]]
    original: Optional[nn.ModuleList] = None
    original_count: Optional[int] = None


def replication_of(model: nn.Module) -> Optional[Replication]:
    """The replication applied to ``model``, or None."""
    return model.__dict__.get(_ATTR)


def plan_replication(model: nn.Module, config: Any) -> Optional[Replication]:
    """What ``config.layer_replication`` will do to ``model``, checked without touching it; None when nothing is to
    be done (no map, or the model was already replicated by the same map for another adapter).

    Raises:
        UnsupportedError: no stack of layers PEFT's rule finds; the model is already replicated by another map.
        ConfigError: a pair of the map is not a range of the model's layers.
    """
    layer_map = getattr(config, "layer_replication", None)
    if not layer_map:
        return None
    wanted = [list(pair) for pair in layer_map]
    done = replication_of(model)
    if done is not None:
        if done.layer_map == wanted:
            return None
        raise UnsupportedError(
            f"this model's layers are already replicated by layer_replication={done.layer_map} (an earlier adapter); "
            f"an adapter with layer_replication={wanted} needs the unreplicated model: load it into a fresh copy"
        )
    prefix = find_layer_stack({name: type(m).__name__ for name, m in model.named_modules() if name})
    if prefix is None:
        raise UnsupportedError(
            f"layer_replication needs the model's stack of layers, which PEFT looks for at model(.model)*.layers, "
            f".encoder.layer (BERT) or .h (Falcon, GPT-2) as an nn.ModuleList; {type(model).__name__} has none"
        )
    count = len(model.get_submodule(prefix))
    return Replication(LayerStack(prefix, count, expand_layer_map(wanted, count)), wanted)


def _clone_sharing(layer: nn.Module) -> nn.Module:
    """PEFT's ``clone_module(share_weights=True)``: a deep copy whose parameters are the original's."""
    clone = copy.deepcopy(layer)
    for name, module in layer.named_modules():
        target = clone.get_submodule(name)
        for param_name, param in module.named_parameters(recurse=False):
            target.register_parameter(param_name, param)
    return clone


def apply_replication(model: nn.Module, replication: Replication) -> None:
    """Replace the stack by its replicated list (see the module docstring) and record it on the model."""
    stack = replication.stack
    parent_name, _, attr = stack.prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, attr)
    layers = []
    for j, i in enumerate(stack.sources):
        clone = _clone_sharing(original[i])
        for sub in clone.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = j  # transformers' attention caches are indexed by the layer's position
        layers.append(clone)
    setattr(parent, attr, nn.ModuleList(layers))
    config = getattr(model, "config", None)
    replication.original = original
    if config is not None and hasattr(config, "num_hidden_layers"):
        replication.original_count = config.num_hidden_layers
        config.num_hidden_layers = len(layers)
    model.__dict__[_ATTR] = replication


def undo_replication(model: nn.Module) -> None:
    """Put the original layer list (and ``config.num_hidden_layers``) back; no-op for a model never replicated."""
    replication = model.__dict__.pop(_ATTR, None)
    if replication is None:
        return
    parent_name, _, attr = replication.stack.prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, replication.original)
    if replication.original_count is not None:
        model.config.num_hidden_layers = replication.original_count


def forget_replication(model: nn.Module) -> None:
    """Drop the record of a replication and keep the replicated stack (after a merge: the copies are layers now)."""
    model.__dict__.pop(_ATTR, None)


def unshare_for_merge(model: nn.Module) -> None:
    """Give every LoRA layer of a replicated model whose base weight (or bias) another layer shares a tensor of its
    own, so that merging its adapter changes only it. No-op for a model never replicated.
    """
    if replication_of(model) is None:
        return
    seen: set[int] = set()
    for _, layer in lora_layers(model):
        base = layer.base_layer
        for name in ("weight", "bias"):
            param = getattr(base, name, None)
            if not isinstance(param, nn.Parameter):
                continue
            if id(param) in seen:
                base.register_parameter(name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
            else:
                seen.add(id(param))

