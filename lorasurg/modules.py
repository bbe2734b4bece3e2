"""What kind of layer a torch module is, as far as LoRA is concerned.

LoRA applies to five kinds of layer (see :mod:`lorasurg.engine.factors`): ``linear`` (``nn.Linear`` and
transformers' GPT-2 ``Conv1D``, whose weight is stored ``(in, out)``, i.e. ``fan_in_fan_out``), ``embedding``
and ``conv1d``/``conv2d``/``conv3d``. Everything else is described with ``kind=None``.

These descriptions are plain data, so targeting (:mod:`lorasurg.targeting`) works the same on a live model,
on a model instantiated on the meta device, and on a checkpoint read from disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

__all__ = ["ModuleInfo", "describe_module", "describe_model", "output_layer_names", "SEQ_CLS_HEAD_NAMES"]

# Attribute names of classification heads, excluded from "all-linear" for SEQ_CLS models without output
# embeddings (PEFT does the same).
SEQ_CLS_HEAD_NAMES: tuple[str, ...] = ("score", "classifier")

_CONV_KINDS = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}


@dataclass(frozen=True)
class ModuleInfo:
    """One module of a model, described without its tensors.

    Attributes:
        type_name: the class name (``"Linear"``, ``"Conv1D"``, ``"LlamaAttention"``, ...).
        kind: ``"linear"``, ``"embedding"``, ``"conv1d"``, ``"conv2d"``, ``"conv3d"``, or None when LoRA does not
            apply to it.
        fan_in_fan_out: the weight is stored ``(in, out)`` (transformers ``Conv1D``).
        weight_shape: shape of ``.weight``, or None.
        has_bias: the module has a ``.bias`` tensor.
        groups: convolution groups (1 for everything else).
    """

    type_name: str
    kind: Optional[str] = None
    fan_in_fan_out: bool = False
    weight_shape: Optional[tuple[int, ...]] = None
    has_bias: bool = False
    groups: int = 1

    @property
    def is_linear_like(self) -> bool:
        """True for ``nn.Linear`` and GPT-2 ``Conv1D``: what ``target_modules="all-linear"`` selects."""
        return self.kind == "linear"

    def lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        """``(A shape, B shape, out)`` that a rank-``r`` LoRA on this layer stores, in PEFT's file layout.

        (:func:`lorasurg.engine.factors.factor_shapes` of this layer's kind, weight shape and layout; for a grouped
        convolution PEFT's grouped ``lora_B``, :func:`lorasurg.engine.grouped_conv.grouped_factor_shapes`.)

        Raises:
            ValueError: the layer has no LoRA kind or no weight shape.
        """
        if self.kind is None or self.weight_shape is None:
            raise ValueError(f"a {self.type_name} layer has no LoRA layout (kind {self.kind}, weight {self.weight_shape})")
        from .engine.factors import factor_shapes

        if self.groups != 1:
            from .engine.grouped_conv import grouped_factor_shapes

            A, B = grouped_factor_shapes(tuple(self.weight_shape), self.groups, r)
            return A, B, B[0]
        return factor_shapes(self.kind, tuple(self.weight_shape), r, self.fan_in_fan_out)


def _gpt2_conv1d_class() -> Optional[type]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep this module usable without it
        return None
    return Conv1D


def describe_module(module: nn.Module) -> ModuleInfo:
    """Describe one module (its own parameters only, not its children)."""
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    shape = tuple(weight.shape) if isinstance(weight, nn.Parameter) or hasattr(weight, "shape") else None
    has_bias = bias is not None and hasattr(bias, "shape")
    type_name = type(module).__name__
    conv1d_cls = _gpt2_conv1d_class()
    if isinstance(module, nn.Linear):
        return ModuleInfo(type_name, "linear", False, shape, has_bias)
    if conv1d_cls is not None and isinstance(module, conv1d_cls):
        return ModuleInfo(type_name, "linear", True, shape, has_bias)
    if isinstance(module, nn.Embedding):
        return ModuleInfo(type_name, "embedding", False, shape, False)
    for cls, kind in _CONV_KINDS.items():
        if isinstance(module, cls):
            return ModuleInfo(type_name, kind, False, shape, has_bias, int(module.groups))
    return ModuleInfo(type_name, None, False, shape, has_bias)


def describe_model(model: nn.Module) -> dict[str, ModuleInfo]:
    """``{module name: ModuleInfo}`` for every named submodule except the root, in ``named_modules`` order."""
    return {name: describe_module(module) for name, module in model.named_modules() if name}


def output_layer_names(model: nn.Module, task_type: Optional[str] = None) -> set[str]:
    """Names of the layers ``"all-linear"`` must leave out: the output embedding (``lm_head``), or for
    sequence classification models without one, the classifier head (``score``/``classifier``).
    """
    names: set[str] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        names.update(name for name, module in model.named_modules() if module is output)
    elif task_type == "SEQ_CLS":
        for attr in SEQ_CLS_HEAD_NAMES:
            head = getattr(model, attr, None)
            if isinstance(head, nn.Module):
                names.update(name for name, module in model.named_modules() if module is head)
                break
    return names
