"""What each tensor of a checkpoint becomes in an extracted adapter, decided before any tensor is read.

``extract`` compares two checkpoints tensor by tensor. Every tensor gets a *role* from its module's kind and the
user's options; what actually lands in the adapter then depends only on whether that tensor changed:

==============  =================================================================================================
role            if the tensor changed
==============  =================================================================================================
``lora``        the weight of a LoRA target: truncated SVD of the delta -> ``lora_A``/``lora_B`` (or
                ``lora_embedding_A``/``_B`` for an embedding)
``bias``        the bias of a LoRA target: ``lora_B.bias = delta / scale`` when ``lora_bias`` is on
``save``        a tensor of a module copied whole from the tuned checkpoint (``modules_to_save``)
``drop``        left out of the adapter, listed in the report with the reason
``alias``       a tied copy of another tensor (``lm_head.weight`` tied to the input embedding): handled with
                that tensor, never twice
``rows``        an embedding layer's weight under ``--embeddings auto|tokens``: the rows that changed decide
                between trainable tokens, a LoRA and the whole layer (:mod:`lorasurg.surgery.extract.tokens`);
                ``reason`` says why its LoRA would be dropped (``--for``), if it would
``tokens``      what a ``rows`` role becomes when its changed rows are kept as trainable tokens
==============  =================================================================================================

Rules, in order:

1. ``--exclude-modules`` wins: every tensor of an excluded module is ``drop`` ("excluded"); the keys of rules 1a
   and 1b are excluded by their own name too.
1a. A key the model has no place for (:attr:`~lorasurg.io.architecture.ModelDescription.unplaced`), a tensor of a
   module the model does not have, or a tensor LoRA cannot carry on its layer is ``drop``, *lost* (below).
1b. A 3-D expert parameter the checkpoint stores fused (gpt-oss's ``mlp.experts.gate_up_proj``; ``stored_experts``)
   is ``lora`` (kind ``experts``: one LoRA per expert), selected by its module's or its own name; any other tensor
   of a module that holds such a target (gpt-oss's expert biases) is ``drop``, lost: PEFT refuses
   ``modules_to_save`` on a module its ``ParamWrapper`` wraps, and a ``ParamWrapper`` takes no ``lora_bias``.
2. Input embedding and output layer follow ``--embeddings``: ``skip`` -> ``drop``; ``full`` -> ``save``;
   ``auto``/``tokens`` -> ``rows`` when targeted (a head's weight, when the head has no bias);
   ``lora`` -> ``lora`` when targeted, except that PEFT refuses ``lora_bias`` on an ``nn.Embedding``, so with
   ``lora_bias`` on an embedding is ``save`` instead (said in the report).
3. Linear and conv layers selected by ``--target-modules`` (default: all of them) are ``lora``; their bias is
   ``bias`` (``drop`` with ``--no-lora-bias``). LoRA-able layers not selected are ``drop`` ("not in
   --target-modules").
4. Every other tensor (norms, biases of layers without LoRA, position embeddings of other types, ...) is
   ``save``.
5. ``--for``: a ``lora``, ``bias`` or ``save`` role that a named consumer cannot carry (see
   :mod:`lorasurg.consumers.rules`: vLLM and llama.cpp take no ``lora_B.bias`` and no ``modules_to_save``, vLLM no
   conv or embedding/output-layer LoRA, llama.cpp no LoRA on ``fan_in_fan_out`` layers) is ``drop``, with the
   consumer's rule as the reason. ``--serving`` is ``--for vllm``.
6. A bias of a LoRA target when ``lora_bias`` is off because PEFT could not load it (``bias_blocked``: the
   adapter needs ``target_parameters``, whose ``ParamWrapper`` refuses ``lora_bias``) is ``drop``, lost.

A ``drop`` is *lost* (:attr:`TensorRole.lost`) when it is not the user's own choice (``--exclude-modules``,
``--target-modules``, ``--embeddings skip``, ``--no-lora-bias``, ``--for``): ``extract`` refuses to leave a lost
tensor out unless ``--allow-dropped`` is given.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Collection, Mapping, Optional, Sequence, Union

from ...consumers.reading import is_norm_key
from ...consumers.rules import CONSUMERS, Consumer, with_serving
from ...errors import ConfigError
from ...modules import ModuleInfo

__all__ = ["ROLES", "EMBEDDING_MODES", "TensorRole", "split_tensor_name", "matches_any", "plan_roles", "blocker"]

ROLES = ("lora", "bias", "save", "drop", "alias", "rows", "tokens")
EMBEDDING_MODES = ("auto", "tokens", "lora", "full", "skip")
_LORA_KINDS = ("linear", "embedding", "conv1d", "conv2d", "conv3d")

Patterns = Union[str, Sequence[str], None]
_BIAS_OFF = "bias of a LoRA target and lora_bias is off"


@dataclass(frozen=True)
class TensorRole:
    """What one checkpoint tensor becomes if it changed.

    Attributes:
        name: the tensor's key (``model.layers.0.self_attn.q_proj.weight``).
        module: the module it belongs to (``model.layers.0.self_attn.q_proj``).
        role: one of :data:`ROLES`.
        reason: why (shown in the report for ``save``/``drop``; empty for ``lora``/``bias``).
        kind: the module's layer kind (``linear``, ``embedding``, ``conv2d``, ...) or None.
        source: for an ``alias``, the tensor it is tied to.
        lost: a ``drop`` that is not the user's choice (the module docstring): refused without ``allow_dropped``.
    """

    name: str
    module: str
    role: str
    reason: str = ""
    kind: Optional[str] = None
    source: Optional[str] = None
    lost: bool = False


def split_tensor_name(name: str) -> tuple[str, str]:
    """``"a.b.weight" -> ("a.b", "weight")``; a top-level tensor has module ``""``."""
    module, _, param = name.rpartition(".")
    return module, param


def matches_any(patterns: Patterns, module: str) -> bool:
    """Whether PEFT's ``target_modules``/``exclude_modules`` rule selects ``module``: a string is a regex that
    must match the whole name; a list entry must equal the name or a ``.``-separated suffix of it.

    Raises:
        ConfigError: a regex does not compile.
    """
    if not patterns:
        return False
    if isinstance(patterns, str):
        try:
            return re.fullmatch(patterns, module) is not None
        except re.error as err:
            raise ConfigError(f"invalid regex {patterns!r} in --target-modules/--exclude-modules: {err}") from err
    return any(module == p or module.endswith("." + p) for p in patterns)


def plan_roles(
    names: Sequence[str],
    modules: Mapping[str, ModuleInfo],
    *,
    input_embedding: Optional[str],
    output_layers: Collection[str] = (),
    aliases: Optional[Mapping[str, str]] = None,
    target_modules: Patterns = None,
    exclude_modules: Patterns = None,
    embeddings: str = "lora",
    lora_bias: bool = False,
    serving: bool = False,
    consumers: Union[str, Sequence[str], None] = None,
    stored_experts: Collection[str] = (),
    unplaced: Optional[Mapping[str, str]] = None,
    bias_blocked: Optional[str] = None,
) -> dict[str, TensorRole]:
    """The role of every tensor in ``names`` (see the module docstring for the rules).

    Args:
        names: tensor keys of the base checkpoint, in shard order (the result keeps that order).
        modules: ``{module name: ModuleInfo}`` of the model.
        input_embedding: name of the input embedding module, or None.
        output_layers: names of the output layer(s) (``lm_head``).
        aliases: ``{tensor name: tensor it is tied to}`` (tied output layer weights).
        target_modules / exclude_modules: PEFT-style selection (list of names/suffixes, or a regex string).
        embeddings: ``auto``, ``tokens``, ``lora``, ``full`` or ``skip``.
        lora_bias: whether bias deltas of LoRA targets become ``lora_B.bias``.
        serving: the same as adding ``vllm`` to ``consumers``.
        consumers: what ``--for`` names (``peft``, ``vllm``, ``llama.cpp``, ``all``, or several): roles they
            cannot carry become ``drop`` (rule 5).
        stored_experts: keys of 3-D expert parameters the checkpoint stores fused (rule 1b).
        unplaced: ``{key: why}`` for keys the model has no place for (rule 1a).
        bias_blocked: why ``lora_bias`` cannot be on when PEFT forbids it (rule 6); None otherwise.

    Raises:
        ConfigError: an unknown ``embeddings`` mode or an invalid regex.
    """
    if embeddings not in EMBEDDING_MODES:
        raise ConfigError(f"--embeddings must be one of {', '.join(EMBEDDING_MODES)}, got {embeddings!r}")
    chosen = [CONSUMERS[c] for c in with_serving(consumers, serving)]
    aliases = dict(aliases or {})
    embedding_layers = {m for m in (input_embedding, *output_layers) if m}
    roles: dict[str, TensorRole] = {}
    unplaced = dict(unplaced or {})
    stored = set(stored_experts)
    for name in names:
        module, param = split_tensor_name(name)
        info = modules.get(module)
        kind = "experts" if name in stored else info.kind if info is not None else None
        if name in aliases:
            roles[name] = TensorRole(name, module, "alias", f"tied to {aliases[name]}", kind, aliases[name])
            continue
        keyed = name in stored or name in unplaced  # no module of their own: selected by their key too
        if matches_any(exclude_modules, module) or (keyed and matches_any(exclude_modules, name)):
            roles[name] = TensorRole(name, module, "drop", "excluded by --exclude-modules", kind)
            continue
        if name in unplaced:
            roles[name] = TensorRole(name, module, "drop", f"the model has no place for it: {unplaced[name]}", kind,
                                     lost=True)
            continue
        if name in stored:
            targeted = not target_modules or matches_any(target_modules, module) or matches_any(target_modules, name)
            roles[name] = TensorRole(name, module, "lora" if targeted else "drop",
                                     "" if targeted else "not in --target-modules", kind)
            continue
        role, reason, lost = _decide(
            module, param, kind, module in embedding_layers, info is not None,
            target_modules=target_modules, embeddings=embeddings, lora_bias=lora_bias,
            has_bias=bool(info is not None and info.has_bias),
        )
        fan = bool(info is not None and info.fan_in_fan_out)
        if role == "rows":  # what a fallback to LoRA would meet: kept as the reason it would be dropped
            fallback, why = _for_consumers("lora", "", name, kind, True, fan, chosen)
            reason = why if fallback == "drop" else ""
        else:
            role, reason = _for_consumers(role, reason, name, kind, module in embedding_layers, fan, chosen)
        if role == "drop" and reason == _BIAS_OFF and bias_blocked:
            reason, lost = bias_blocked, True
        roles[name] = TensorRole(name, module, role, reason, kind, lost=lost and role == "drop")
    _beside_stored_experts(roles)
    return roles


def _beside_stored_experts(roles: dict[str, TensorRole]) -> None:
    """Rule 1b's second half: the other changed-or-not tensors of a module whose stored experts get LoRA."""
    holders = {role.module for role in roles.values() if role.role == "lora" and role.kind == "experts"}
    for name, role in roles.items():
        if role.module in holders and role.kind != "experts" and role.role in ("save", "bias"):
            roles[name] = dataclasses.replace(role, role="drop", lost=True, reason=(
                f"a tensor of {role.module}, whose fused expert parameters get LoRA (target_parameters): PEFT refuses "
                "modules_to_save on a module its ParamWrapper wraps, and a ParamWrapper takes no lora_bias"))


def blocker(consumers: Sequence[Consumer], feature: str) -> Optional[Consumer]:
    """The first of ``consumers`` that cannot carry ``feature`` (a key of ``consumers.rules.FEATURES``), or None."""
    return next((c for c in consumers if not c.carries(feature)), None)


def _for_consumers(role: str, reason: str, name: str, kind: Optional[str], is_embedding_layer: bool,
                   fan_in_fan_out: bool, chosen: Sequence[Consumer]) -> tuple[str, str]:
    """Rule 5: ``drop`` a role that a named consumer cannot carry, with that consumer's rule as the reason."""
    if role == "save":
        feature = "saved_norms" if is_norm_key(name) else "modules_to_save"
    elif role == "bias" or (role == "drop" and reason == _BIAS_OFF):
        feature = "lora_bias"
    elif role == "lora" and kind == "embedding":
        feature = "embedding_lora"
    elif role == "lora" and is_embedding_layer:
        feature = "output_layer_lora"
    elif role == "lora" and kind is not None and kind.startswith("conv"):
        feature = "conv_lora"
    elif role == "lora" and fan_in_fan_out:
        feature = "fan_in_fan_out_lora"
    else:
        return role, reason
    blocked = [c for c in chosen if not c.carries(feature)]
    if not blocked:
        return role, reason
    return "drop", f"--for {', '.join(c.name for c in blocked)}: {blocked[0].title} {blocked[0].rules[feature].says}"


def _decide(
    module: str, param: str, kind: Optional[str], is_embedding_layer: bool, known: bool, *,
    target_modules: Patterns, embeddings: str, lora_bias: bool, has_bias: bool = False,
) -> tuple[str, str, bool]:
    """(role, reason, lost) for one tensor not excluded; see :func:`plan_roles`."""
    if not known:
        return "drop", "not a parameter of a module of the model", True
    if is_embedding_layer:
        if embeddings == "skip":
            return "drop", "--embeddings skip", False
        if embeddings == "full" or param != "weight":
            return "save", "--embeddings full" if embeddings == "full" else "embedding-layer bias", False
        if target_modules and not matches_any(target_modules, module):
            return "drop", "not in --target-modules", False
        if embeddings in ("auto", "tokens") and (kind == "embedding" or not has_bias):
            return "rows", "", False
        if lora_bias and kind == "embedding":
            return "save", "lora_bias is on and PEFT refuses lora_bias on Embedding layers, so saved in full", False
        return "lora", "", False
    if kind in _LORA_KINDS and kind != "embedding":
        if target_modules and not matches_any(target_modules, module):
            return "drop", "not in --target-modules", False
        if param == "weight":
            return "lora", "", False
        if param == "bias":
            return ("bias", "", False) if lora_bias else ("drop", _BIAS_OFF, False)
        return "drop", f"unexpected tensor {param!r} on a {kind} layer", True
    return "save", "not LoRA-able: saved in modules_to_save", False
