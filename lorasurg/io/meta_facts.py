"""Facts about a checkpoint's architecture that need its model class, built on the meta device (no memory).

Only for architectures transformers has (never remote code, see :func:`lorasurg.io.architecture.meta_model`);
module names are given as the checkpoint's keys name them.

Module order (:func:`module_order`): the order ``named_modules()`` visits modules, which is the order PEFT
initialises adapters in (and so draws random numbers in); a safetensors file stores tensors sorted by name instead.

Bias flags (:func:`bias_flags`): fusing a ``lora_bias`` into a layer that has no bias needs a bias tensor the model will load. Some architectures
can express that in their config: Llama's ``attention_bias`` gives q/k/v/o_proj a bias, ``mlp_bias`` gives
gate/up/down_proj one. Others cannot (Qwen2's o_proj and MLP are built without a bias, whatever the config says).

Nothing is hard-coded per model type: for every boolean config field whose name ends in ``bias`` and that is false,
the model class is built with that field true, and the layers that gained a bias are the ones the flag governs.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional, Sequence

from ..modules import describe_model
from .architecture import is_shape_describable, meta_model
from .keymap import build_keymap
from .model_layout import checkpoint_namer

__all__ = ["bias_flags", "module_order"]


def bias_flags(config: Optional[Mapping], shapes: Mapping[str, Sequence[int]]) -> dict[str, frozenset[str]]:
    """``{config field: module names (checkpoint key prefixes) that have a bias only when it is true}``.

    Args:
        config: the checkpoint's parsed config.json (None: nothing can be expressed).
        shapes: ``{tensor key: shape}`` of the checkpoint, to name modules as its keys do.

    Returns:
        one entry per false ``*bias`` field that adds a bias to some layer; empty when the architecture is not
        one transformers builds (or builds no differently).
    """
    if not config:
        return {}
    plain = meta_model(config)
    if plain is None:
        return {}
    to_key = checkpoint_namer(plain, build_keymap(plain, shapes))
    with_bias = {name for name, info in describe_model(plain).items() if info.has_bias}
    flags: dict[str, frozenset[str]] = {}
    for key, value in _full_config(plain, config).items():
        if value is not False or not key.endswith("bias"):
            continue
        model = meta_model({**config, key: True})
        if model is None:
            continue
        gained = {name for name, info in describe_model(model).items() if info.has_bias} - with_bias
        names = {to_key(name) for name in gained}
        if gained and None not in names:
            flags[key] = frozenset(n for n in names if n is not None)
    return flags


def _full_config(model, config: Mapping) -> dict:
    """Every field of the model's config (config.json leaves out fields equal to the class defaults)."""
    hf_config = getattr(model, "config", None)
    full = hf_config.to_dict() if hf_config is not None and hasattr(hf_config, "to_dict") else {}
    return {**full, **config}


# Module leaf names of the known causal LMs (SHAPE_DESCRIBABLE_MODEL_TYPES) in the order their classes register
# them; checked against the model classes for every type by tests/io/test_meta_facts.py.
_LEAF_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj",
               "down_proj", "c_fc", "c_proj")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")


def module_order(config: Optional[Mapping], shapes: Mapping[str, Sequence[int]], names: Iterable[str]) -> list[str]:
    """``names`` (module names of the checkpoint) in the order the model's ``named_modules()`` visits them.

    For a causal LM of a type :func:`~lorasurg.io.architecture.is_shape_describable` accepts, from the names alone
    (``model.embed_tokens``, then each layer's attention and MLP projections in their classes' order, then
    ``lm_head``), without importing the modeling code. Otherwise from the model built on the meta device; without a
    model class (no config, an architecture transformers lacks), in natural order: names compared part by part,
    numbers numerically (``layers.2`` before ``layers.10``).
    """
    wanted = list(names)
    if config and is_shape_describable(config):
        keys = [_known_key(n) for n in wanted]
        if None not in keys:
            return [n for _, n in sorted(zip(keys, wanted))]
    model = meta_model(config) if config else None
    if model is not None:
        to_key = checkpoint_namer(model, build_keymap(model, shapes))
        rank = {}
        for position, (name, _) in enumerate(model.named_modules()):
            key = to_key(name)
            if key is not None:
                rank.setdefault(key, position)
        if all(n in rank for n in wanted):
            return sorted(wanted, key=rank.__getitem__)
    return sorted(wanted, key=_natural)


def _known_key(name: str) -> Optional[tuple[int, int, int]]:
    if name == "model.embed_tokens":
        return (0, 0, 0)
    if name == "lm_head":
        return (2, 0, 0)
    found = _LAYER.fullmatch(name)
    if found is None or found.group(3) not in _LEAF_ORDER:
        return None
    return (1, int(found.group(1)), _LEAF_ORDER.index(found.group(3)))


def _natural(name: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"[.]", name)]
