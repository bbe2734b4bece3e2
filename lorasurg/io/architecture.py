"""Describe a checkpoint's modules (layer kinds, shapes, tied weights) without loading its tensors.

Two sources:

1. **The architecture.** When ``config.json`` names a class in ``config["architectures"][0]`` that transformers
   has (never remote code), the model is built on the meta device (no memory, no init cost) from
   ``AutoConfig.for_model(**config)`` and described with :func:`lorasurg.modules.describe_model`. Tied parameters
   are the parameters that are the same object in that model.
2. **Names and shapes** (no config, an architecture transformers does not know, or a causal LM of one of the
   :data:`SHAPE_DESCRIBABLE_MODEL_TYPES`, whose modules these rules describe exactly, checked against
   transformers for each type by the tests; that skips importing transformers' modeling code).
   For each ``<m>.weight``:

   - 2-D: ``embedding`` if the last name part is a known embedding name (:data:`EMBEDDING_NAMES`) or ends in
     ``_embeddings``, or if ``config["vocab_size"]`` is known, the weight has that many rows, no bias, and the
     name is not a known output head (:data:`OUTPUT_NAMES`); otherwise ``linear``;
   - 3-D, 4-D, 5-D: ``conv1d``, ``conv2d``, ``conv3d`` (groups cannot be seen from the shape: reported as 1);
   - anything else: ``kind=None``.

   ``fan_in_fan_out`` (GPT-2's ``Conv1D``) cannot be seen from a shape and is reported False: give the
   checkpoint's config.json for such models. Tied weights are only known here from ``tie_word_embeddings``
   in a config (or, when a causal LM's config leaves it out, from ``lm_head.weight`` missing from the
   checkpoint): ``lm_head`` is then tied to the input embedding.

Buffers. Besides parameters, checkpoints hold tensors that a module registers as a *buffer* (``register_buffer``:
``embeddings.position_ids`` in BERT, ``rotary_emb.inv_freq`` in the Llama family, GPT-2's ``attn.bias`` and
``attn.masked_bias``), written by some transformers versions and not by others. They are not weights, and
:attr:`ModelDescription.buffers` says which names are buffers (:class:`BufferNames`): from the meta-device model,
its ``named_buffers()`` (persistent and non-persistent), the same buffers on another module (the last two name parts:
older Llama versions kept ``rotary_emb`` in every layer), and :data:`LEGACY_BUFFERS`, the buffers earlier
transformers versions registered and the current classes dropped; from the names-and-shapes fast path,
:data:`FAST_PATH_BUFFERS` (what the meta model gives, checked per type by the tests) and the same legacy table.
Without a config (or for an architecture transformers lacks) no name is known to be a buffer.

Module names are checkpoint key prefixes (``<name>.weight`` is a key). With the architecture, checkpoint keys are
placed among the model's parameters by transformers' own conversion rules (:mod:`lorasurg.io.keymap`: renamed
towers of multimodal models, per-expert matrices fused into 3-D expert parameters, the ``base_model_prefix``
stripped or added), and the description says where the model names a module otherwise (``names``), which modules
are experts inside fused parameters (``experts``), which 3-D expert parameters LoRA can target (``parameters``) and
which keys have no place in the model (``unplaced``): see :mod:`lorasurg.io.model_layout`. The names-and-shapes
path knows none of this; it is only taken for the types above, which have no conversion rules.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from ..modules import ModuleInfo
from .keymap import ExpertSlot
from .model_layout import ExpertParameter, model_layout

__all__ = [
    "BufferNames",
    "ModelDescription",
    "describe_checkpoint",
    "is_shape_describable",
    "meta_model",
    "EMBEDDING_NAMES",
    "OUTPUT_NAMES",
    "SHAPE_DESCRIBABLE_MODEL_TYPES",
    "FAST_PATH_BUFFERS",
    "LEGACY_BUFFERS",
]

EMBEDDING_NAMES: frozenset[str] = frozenset(
    {"embed_tokens", "wte", "wpe", "word_embeddings", "shared", "tok_embeddings", "embed_in", "embed_positions",
     "embeddings", "embedding"}
)
# Input (token) embeddings, the target of a tied output head, in order of preference.
_INPUT_EMBEDDING_NAMES: tuple[str, ...] = (
    "embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in", "shared"
)
# Decoder-only model types whose every 2-D weight belongs to an nn.Linear or an nn.Embedding: no GPT-2 Conv1D, no
# fused 3-D expert tensors, no grouped convolutions. Their causal LMs are described from names and shapes.
SHAPE_DESCRIBABLE_MODEL_TYPES: frozenset[str] = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2", "granite", "starcoder2",
     "stablelm", "cohere"}
)
OUTPUT_NAMES: frozenset[str] = frozenset({"lm_head", "embed_out", "output", "score", "classifier", "cls", "decoder"})
_OUTPUT_HEADS: tuple[str, ...] = ("lm_head", "embed_out")

_ROTARY = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")
# The buffers of the fast path's model types, as dotted suffixes: the last two name parts of each name in the
# meta-device causal LM's named_buffers() (checked per type by tests/io/test_architecture_fast_path.py).
FAST_PATH_BUFFERS: dict[str, frozenset[str]] = {
    model_type: frozenset(_ROTARY + (("embed_tokens.embed_scale",) if model_type in ("gemma", "gemma2") else ()))
    for model_type in SHAPE_DESCRIBABLE_MODEL_TYPES
}
# Buffers that earlier transformers versions registered, and so wrote into checkpoints, and that the current classes
# no longer have, by model_type, as dotted suffixes. Sources: those versions' modeling files (GPT2Attention's
# ``bias``/``masked_bias``, GPTNeoSelfAttention's ``masked_bias``, GPTJAttention's and GPTNeoXAttention's
# ``bias``/``masked_bias``, GPT-NeoX's per-layer ``rotary_emb.inv_freq``), and today's
# ``_keys_to_ignore_on_load_unexpected`` of GPT-2, GPT-J and GPT-NeoX.
LEGACY_BUFFERS: dict[str, frozenset[str]] = {
    "gpt2": frozenset({"attn.bias", "attn.masked_bias", "crossattention.bias", "crossattention.masked_bias"}),
    "gpt_neo": frozenset({"attention.masked_bias"}),
    "gptj": frozenset({"attn.bias", "attn.masked_bias"}),
    "gpt_neox": frozenset({"attention.bias", "attention.masked_bias", "rotary_emb.inv_freq"}),
}


@dataclass(frozen=True)
class BufferNames:
    """Which tensor names an architecture registers as buffers (``register_buffer``), not parameters.

    ``name in buffer_names`` is True for a name in ``exact``, else False for a name in ``parameters``, else True when
    the name is one of ``suffixes`` or ends with ``"." + suffix``. A name can be asked about whether or not a given
    checkpoint holds it (a buffer only one side of a pair has).

    Attributes:
        exact: checkpoint keys of the model's buffers, persistent and non-persistent.
        suffixes: dotted suffixes that name a buffer on any module (a buffer whose module moved between versions,
            and :data:`LEGACY_BUFFERS`).
        parameters: checkpoint keys of the model's parameters, never buffers.
    """

    exact: frozenset[str] = frozenset()
    suffixes: frozenset[str] = frozenset()
    parameters: frozenset[str] = frozenset()

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name in self.exact:
            return True
        if name in self.parameters:
            return False
        return any(name == s or name.endswith("." + s) for s in self.suffixes)

    def __bool__(self) -> bool:
        return bool(self.exact or self.suffixes)


@dataclass(frozen=True)
class ModelDescription:
    """What a checkpoint's modules are.

    Attributes:
        modules: ``{module name: ModuleInfo}``; names are checkpoint key prefixes.
        output_layers: names of the output layers (``lm_head``) that ``"all-linear"`` leaves out.
        tied: ``{alias key: canonical key}`` for parameters that are one tensor in the model; the canonical key is
            one the checkpoint holds where possible (e.g. ``{"lm_head.weight": "model.embed_tokens.weight"}``).
            An alias may be absent from the checkpoint (save_pretrained drops tied copies) or present.
        source: ``"architecture:<class name>"`` or ``"names and shapes"``.
        buffers: which names are buffers of the architecture (see the module docstring); ``name in buffers``.
        names: ``{checkpoint module name: the model's module name}`` where they differ (renamed towers).
        experts: ``{per-expert checkpoint module: ExpertSlot}`` for experts the model fuses into 3-D parameters.
        parameters: ``{model parameter name: ExpertParameter}``: 3-D expert parameters, ``target_parameters``
            targets.
        model_modules: every module name of the model (containers included, model namespace) and the per-expert
            names; empty for the names-and-shapes path.
        unplaced: ``{checkpoint key: why the model has no place for it}``.
        input_embedding: the token embedding module (the model's ``get_input_embeddings()``), when known.
    """

    modules: dict[str, ModuleInfo]
    output_layers: set[str] = field(default_factory=set)
    tied: dict[str, str] = field(default_factory=dict)
    source: str = "names and shapes"
    buffers: BufferNames = field(default_factory=BufferNames)
    names: dict[str, str] = field(default_factory=dict)
    experts: dict[str, ExpertSlot] = field(default_factory=dict)
    parameters: dict[str, ExpertParameter] = field(default_factory=dict)
    model_modules: tuple[str, ...] = ()
    unplaced: dict[str, str] = field(default_factory=dict)
    input_embedding: Optional[str] = None

    def model_name(self, module: str) -> str:
        """The model's name for checkpoint module ``module`` (the name adapters use): itself unless renamed."""
        return self.names.get(module, module)

    def checkpoint_module(self, name: str) -> Optional[str]:
        """The checkpoint module a model (adapter) module name stands for, or None when the model has no such
        LoRA-able module: the inverse of :meth:`model_name`."""
        inverse = self._inverse_names()
        if name in inverse:
            return inverse[name]
        return name if name in self.modules and name not in self.names else None

    def _inverse_names(self) -> dict[str, str]:
        cached = self.__dict__.get("_inverse")
        if cached is None:
            cached = {model: key for key, model in self.names.items()}
            object.__setattr__(self, "_inverse", cached)
        return cached

    def all_module_names(self) -> list[str]:
        """Every module name a ``target_modules`` entry can select, in the model's namespace (containers included,
        per-expert modules by their checkpoint names); without a model, the checkpoint's module names."""
        return list(self.model_modules) if self.model_modules else list(self.modules)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def meta_model(config: Mapping) -> Optional[nn.Module]:
    """Build ``config["architectures"][0]`` from transformers on the meta device, or None if that is not possible.

    Never uses remote code: the class must be an attribute of the ``transformers`` package. A failure to build
    (an unknown ``model_type``, a config the class rejects) gives None and a warning naming the reason.
    """
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if not archs or not isinstance(archs[0], str) or not isinstance(model_type, str):
        return None
    import transformers

    cls = getattr(transformers, archs[0], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return None
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    try:
        with _quiet_transformers():
            hf_config = transformers.AutoConfig.for_model(model_type, **kwargs)
            with torch.device("meta"):
                return cls(hf_config)
    except Exception as err:  # noqa: BLE001 - any failure means "describe from names and shapes instead"
        warnings.warn(
            f"could not build {archs[0]} on the meta device ({type(err).__name__}: {err}); describing the "
            "checkpoint's modules from tensor names and shapes instead",
            stacklevel=2,
        )
        return None


def describe_checkpoint(
    shapes: Mapping[str, Sequence[int]], config: Optional[Mapping] = None, task_type: Optional[str] = None
) -> ModelDescription:
    """Describe the modules of a checkpoint from its tensor shapes (``{key: shape}``, in checkpoint order) and
    its parsed config.json (or None). See the module docstring for the rules.
    """
    if config and task_type in (None, "CAUSAL_LM") and is_shape_describable(config):
        return _from_shapes(shapes, config, known_architecture=True)
    model = meta_model(config) if config else None
    if model is not None:
        return _from_model(model, shapes, task_type)
    return _from_shapes(shapes, config)


def is_shape_describable(config: Mapping) -> bool:
    """True for a causal LM of a model type in :data:`SHAPE_DESCRIBABLE_MODEL_TYPES`.

    For these, the names-and-shapes rules give the description the meta-device model gives (checked for each
    type against transformers by tests/io/test_architecture_fast_path.py), without importing transformers'
    modeling code, which costs 3-4 s of CPU before any tensor is read.
    """
    archs = config.get("architectures") or []
    return (
        config.get("model_type") in SHAPE_DESCRIBABLE_MODEL_TYPES
        and len(archs) == 1
        and isinstance(archs[0], str)
        and archs[0].endswith("ForCausalLM")
    )


def _from_model(model: nn.Module, shapes: Mapping[str, Sequence[int]], task_type: Optional[str]) -> ModelDescription:
    layout = model_layout(model, shapes, task_type)
    return ModelDescription(
        layout.modules, layout.output_layers, layout.tied, f"architecture:{type(model).__name__}",
        _model_buffers(model, layout.to_checkpoint), layout.names, layout.experts, layout.parameters,
        layout.model_modules, layout.unplaced, layout.input_embedding,
    )


def _model_buffers(model: nn.Module, to_key: Callable[[str], Optional[str]]) -> BufferNames:
    """The model's buffers under checkpoint names, with their two-part suffixes and its type's legacy buffers."""
    names = [key for key in (to_key(n) for n, _ in model.named_buffers(remove_duplicate=False)) if key is not None]
    parameters = {to_key(n) for n, _ in model.named_parameters(remove_duplicate=False)} - {None}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    model_type = model_type if isinstance(model_type, str) else None
    suffixes = {".".join(name.split(".")[-2:]) for name in names} | LEGACY_BUFFERS.get(model_type, frozenset())
    return BufferNames(frozenset(names), frozenset(suffixes), frozenset(parameters))


def _guess_kind(module: str, shape: Sequence[int], has_bias: bool, vocab: Optional[int]) -> tuple[str, Optional[str]]:
    """(type name, kind) of the module owning ``<module>.weight`` of ``shape``; the rules are in the module doc."""
    last = module.rsplit(".", 1)[-1]
    if len(shape) == 2:
        named = last in EMBEDDING_NAMES or last.endswith("_embeddings")
        by_vocab = vocab is not None and shape[0] == vocab and not has_bias and last not in OUTPUT_NAMES
        return ("Embedding", "embedding") if named or by_vocab else ("Linear", "linear")
    if len(shape) in (3, 4, 5):
        return f"Conv{len(shape) - 2}d", f"conv{len(shape) - 2}d"
    return "Unknown", None


def _from_shapes(
    shapes: Mapping[str, Sequence[int]], config: Optional[Mapping], known_architecture: bool = False
) -> ModelDescription:
    """The names-and-shapes rules. For a known architecture embeddings are recognised by name only: a linear
    layer with as many outputs as the vocabulary (a fused qkv_proj in a tiny model) is not an embedding."""
    vocab = config.get("vocab_size") if config else None
    vocab = vocab if isinstance(vocab, int) and not known_architecture else None
    modules: dict[str, ModuleInfo] = {}
    for key, shape in shapes.items():
        if not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        has_bias = f"{module}.bias" in shapes
        type_name, kind = _guess_kind(module, shape, has_bias, vocab)
        modules[module] = ModuleInfo(type_name, kind, False, tuple(shape), has_bias and kind != "embedding")
    tied: dict[str, str] = {}
    if config and _ties_embeddings(config, shapes) and "lm_head.weight" not in shapes:
        embedding = _input_embedding(modules, vocab)
        if embedding is not None:
            tied["lm_head.weight"] = f"{embedding}.weight"
            modules["lm_head"] = ModuleInfo("Linear", "linear", False, modules[embedding].weight_shape, False)
    outputs = {m for m in modules if m.rsplit(".", 1)[-1] in _OUTPUT_HEADS}
    source = "names and shapes (known architecture)" if known_architecture else "names and shapes"
    model_type = config.get("model_type") if config else None
    model_type = model_type if isinstance(model_type, str) else None
    suffixes = LEGACY_BUFFERS.get(model_type, frozenset())
    if known_architecture:
        suffixes = suffixes | FAST_PATH_BUFFERS.get(model_type, frozenset())
    return ModelDescription(modules, outputs, tied, source, BufferNames(suffixes=suffixes))


def _ties_embeddings(config: Mapping, shapes: Mapping[str, Sequence[int]]) -> bool:
    """Whether the output head shares the input embedding's weight.

    ``tie_word_embeddings`` when config.json states it; transformers leaves it out when it equals the model
    class's default, and then a causal LM checkpoint without ``lm_head.weight`` is tied (save_pretrained drops
    tied copies).
    """
    stated = config.get("tie_word_embeddings")
    if isinstance(stated, bool):
        return stated
    archs = config.get("architectures") or []
    causal = bool(archs) and isinstance(archs[0], str) and archs[0].endswith("ForCausalLM")
    return causal and "lm_head.weight" not in shapes


def _input_embedding(modules: Mapping[str, ModuleInfo], vocab: Optional[int]) -> Optional[str]:
    """The module most likely to be the token embedding: preferred names first, then checkpoint order."""
    for wanted in _INPUT_EMBEDDING_NAMES:
        for name, info in modules.items():
            shape = info.weight_shape or ()
            if name.rsplit(".", 1)[-1] == wanted and (vocab is None or shape[:1] == (vocab,)):
                return name
    return None
