"""Which config.json flags give which layers a bias, for architectures transformers knows.

Fusing a ``lora_bias`` into a layer that has no bias needs a bias tensor the model will load. Some architectures
can express that in their config: Llama's ``attention_bias`` gives q/k/v/o_proj a bias, ``mlp_bias`` gives
gate/up/down_proj one. Others cannot (Qwen2's o_proj and MLP are built without a bias, whatever the config says).

Nothing is hard-coded per model type: for every boolean config field whose name ends in ``bias`` and that is false,
the model class is built on the meta device (no memory) with that field true, and the layers that gained a bias
are the ones the flag governs. Never uses remote code (see :func:`lorasurg.io.architecture.meta_model`).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from ..modules import describe_model
from .architecture import _key_mapper, meta_model

__all__ = ["bias_flags"]


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
    to_key = _key_mapper(plain, shapes)
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
