"""The base model ``validate`` judges an adapter against, in the namespace PEFT loads adapters in: the model's.

A checkpoint's keys and the model transformers builds from it can name modules differently (Qwen2-VL's
``model.layers.0.mlp`` is the model's ``model.language_model.layers.0.mlp``) and fuse experts into 3-D parameters
(:class:`~lorasurg.io.architecture.ModelDescription`). PEFT matches ``target_modules`` against the model's module
names and loads adapter keys under them, so :func:`open_base` describes the base that way: modules and tensors under
the model's names, per-expert checkpoint modules (``mlp.experts.3.gate_proj``, what per-expert adapters and PEFT's
MoE conversion name) as linear modules of their own, and every parameter a ``target_parameters`` entry can select
(:class:`ParameterInfo`). The names-and-shapes description of the plain decoder types has no renames: there the
two namespaces are one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

from ...io.architecture import ModelDescription
from ...io.checkpoint import Checkpoint
from ...modules import ModuleInfo

__all__ = ["BaseModel", "ParameterInfo", "open_base"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class ParameterInfo:
    """A parameter of the model that a ``target_parameters`` LoRA (PEFT's ``ParamWrapper``) can wrap.

    PEFT's layout: a 3-D ``(E, d1, d2)`` parameter is ``(experts, in, out)`` when its module is ``is_transposed``
    (gpt-oss), else ``(experts, out, in)``; a 2-D weight is ``(out, in)`` with one "expert". The LoRA stores
    ``lora_A (r E, in)`` and ``lora_B (out, r E)`` (:mod:`lorasurg.engine.experts`).

    Attributes:
        name: the parameter's model name. module: the model name of the module holding it.
        position: its index among the module's own parameters (the order PEFT nests wrappers in).
        experts, in_features, out_features: as above.
    """

    name: str
    module: str
    position: int
    experts: int
    in_features: int
    out_features: int

    @property
    def leaf(self) -> str:
        return self.name.rpartition(".")[2]


@dataclass
class BaseModel:
    """The base model's modules and tensor shapes, in the model's namespace (no tensor is read).

    Attributes:
        source: what was given as ``--base``.
        modules: ``{module name: ModuleInfo}``: the model's modules (containers included) and the per-expert modules.
        output_layers: the layers ``"all-linear"`` leaves out.
        shapes: ``{tensor name: shape}``, tied aliases (a tied ``lm_head.weight``) included.
        from_architecture: module kinds come from the transformers class (so GPT-2's ``Conv1D`` is known), not
            from names and shapes alone.
        tied: ``{alias: canonical}`` of tied weights (``{"lm_head.weight": "model.embed_tokens.weight"}``).
        description: the checkpoint's description (checkpoint names), when read from a checkpoint.
        model_type: ``config.json``'s ``model_type``.
        parameters: ``{parameter name: ParameterInfo}`` for every 2-D weight and 3-D expert parameter.
        checkpoint_names: ``{checkpoint module: model module}`` where they differ (renamed towers).
        checkpoint_shapes: ``{checkpoint key: shape}``, tied aliases included: the checkpoint's own names (what
            llama.cpp's converter maps to GGUF names).
    """

    source: str
    modules: dict[str, ModuleInfo]
    output_layers: set[str]
    shapes: dict[str, tuple[int, ...]]
    from_architecture: bool
    tied: dict[str, str] = field(default_factory=dict)
    description: Optional[ModelDescription] = None
    model_type: Optional[str] = None
    parameters: dict[str, ParameterInfo] = field(default_factory=dict)
    checkpoint_names: dict[str, str] = field(default_factory=dict)
    checkpoint_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def experts(self) -> dict:
        """``{per-expert module: ExpertSlot}`` (empty without fused experts)."""
        return dict(self.description.experts) if self.description is not None else {}


def open_base(source: PathLike, task_type: Optional[str] = None) -> BaseModel:
    """Describe the checkpoint at ``source`` (a path or hub id) from its headers and config.json, in the model's
    namespace (module docstring).

    Raises:
        InputError: the checkpoint cannot be opened (see :meth:`~lorasurg.io.checkpoint.Checkpoint.open`).
    """
    with Checkpoint.open(source) as ckpt:
        description = ckpt.describe(task_type)
        stored = {name: tuple(ckpt.shape(name)) for name in ckpt.names()}
        model_type = (ckpt.config or {}).get("model_type")
    for alias, canonical in description.tied.items():
        if alias not in stored and canonical in stored:
            stored[alias] = stored[canonical]
    name = _namer(description)
    shapes = {name(key): shape for key, shape in stored.items()}
    tied = {name(alias): name(canonical) for alias, canonical in description.tied.items()}
    modules = {description.model_name(m): info for m, info in description.modules.items()}
    buffers = {name(key) for key in stored if key in description.buffers}
    return BaseModel(
        os.fspath(source), modules, {description.model_name(m) for m in description.output_layers}, shapes,
        description.source.startswith("architecture:"), tied, description,
        model_type if isinstance(model_type, str) else None,
        _parameters(description, modules, {k: s for k, s in shapes.items() if k not in buffers}),
        {c: m for c, m in description.names.items() if c not in description.experts}, stored,
    )


def _namer(description: ModelDescription):
    """Checkpoint tensor key -> the model's name for it (its module renamed, the leaf kept)."""

    def name(key: str) -> str:
        module, _, leaf = key.rpartition(".")
        return f"{description.model_name(module)}.{leaf}" if module else key

    return name


def _parameters(description: ModelDescription, modules: dict[str, ModuleInfo],
                shapes: dict[str, tuple[int, ...]]) -> dict[str, ParameterInfo]:
    """Every 2-D ``.weight`` of a model module (an expert's per-expert matrix is not a model parameter) and every
    3-D expert parameter."""
    found: dict[str, ParameterInfo] = {}
    for key, shape in shapes.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and len(shape) == 2 and module in modules and module not in description.experts:
            found[key] = ParameterInfo(key, module, 0, 1, int(shape[1]), int(shape[0]))
    for param in description.parameters.values():
        found[param.name] = ParameterInfo(param.name, param.module, param.position, param.experts,
                                          param.in_features, param.out_features)
    return found
