"""LoRA wrappers for ``nn.Linear`` (and GPT-2's ``Conv1D``), ``nn.Conv1d/2d/3d`` and ``nn.Embedding``.

Forward of one active adapter (Hu et al. 2021, https://arxiv.org/abs/2106.09685, eq. 3):

    linear / conv:  y = base(x) + scale * B(A(dropout(x)))        A: (r, in[, k...]), B: (out, r[, 1...])
    embedding:      y = base(x) + scale * onehot(x) @ A.T @ B.T    A: (r, num_embeddings), B: (dim, r)

and with DoRA (:mod:`lorasurg.runtime.dora`), with ``f = m / ||W + delta||_row`` per output:

    linear / conv:  y = base(x) + (f - 1) * (W x) + f * scale * B(A(x))
    embedding:      y = f * base(x) + f * scale * onehot(x) @ A.T @ B.T

For a conv layer, ``A`` is a conv with the base layer's kernel, stride, padding and dilation and ``B`` a 1x1 conv,
so ``B(A(x))`` is the conv whose kernel is ``B @ A`` flattened. GPT-2's ``Conv1D`` stores its weight ``(in, out)``;
LoRA's ``A``/``B`` keep the ``nn.Linear`` orientation and only merging and DoRA's norm see the transpose.
Inputs are cast to the LoRA parameters' dtype and the result back to the base output's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init

from ..engine.factors import weight_to_matrix
from ..errors import UnsupportedError
from ..modules import ModuleInfo, describe_module
from .base import LoraLayer
from .dora import dora_factor

__all__ = ["LoraLinear", "LoraConv", "LoraEmbedding", "wrap_layer", "expected_shapes"]

_CONV_TYPES = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}


class _ModuleLora(LoraLayer):
    """Linear and conv LoRA: ``lora_A``/``lora_B`` are modules, ``y = base(x) + scale * B(A(dropout(x)))``."""

    def _channel_shape(self, result: Tensor) -> tuple[int, ...]:
        """Shape that broadcasts a per-output ``(out,)`` tensor over the layer's output."""
        raise NotImplementedError

    def _base_without_bias(self, x: Tensor) -> Tensor:
        """``W x`` without the base bias (DoRA with dropout in training)."""
        raise NotImplementedError

    def _dora_factor(self, name: str, dtype: torch.dtype) -> Tensor:
        """DoRA's ``m / ||W + delta||_row``, shape ``(out,)``."""
        return dora_factor(self.factors(name), self.base_layer.weight, self.lora_magnitude_vector[name].weight, dtype)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self._skip_lora():
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            xa = x.to(lora_A.weight.dtype)
            if name in self.lora_magnitude_vector:
                result = result + _dora_delta(self, name, xa, result, self._channel_shape(result))
            else:
                result = result + lora_B(lora_A(self.lora_dropout[name](xa))) * self.scaling[name]
        return result.to(out_dtype)


class LoraLinear(_ModuleLora):
    """LoRA on ``nn.Linear`` or transformers' ``Conv1D`` (``fan_in_fan_out``); ``lora_A``/``lora_B`` are ``nn.Linear``."""

    def __init__(self, base_layer: nn.Module, info: ModuleInfo) -> None:
        super().__init__(base_layer, info)
        rows, cols = info.weight_shape
        self.in_features, self.out_features = (rows, cols) if info.fan_in_fan_out else (cols, rows)

    def _allocate(self, name: str, r: int, lora_bias: bool) -> None:
        weight = self.base_layer.weight
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A[name] = skip_init(nn.Linear, self.in_features, r, bias=False, **kw)
        self.lora_B[name] = skip_init(nn.Linear, r, self.out_features, bias=lora_bias, **kw)

    def _base_without_bias(self, x: Tensor) -> Tensor:
        matrix = weight_to_matrix(self.base_layer.weight, "linear", self.info.fan_in_fan_out)  # (out, in)
        return F.linear(x, matrix.to(x.dtype))  # (..., in) @ (in, out) -> (..., out)

    def _channel_shape(self, result: Tensor) -> tuple[int, ...]:
        return (-1,)  # outputs are the last dimension


class LoraConv(_ModuleLora):
    """LoRA on ``nn.Conv1d/2d/3d``: ``lora_A`` is a conv with the base kernel, ``lora_B`` a 1x1 conv.

    Grouped convolutions are :class:`~lorasurg.runtime.grouped_conv.GroupedLoraConv`.
    """

    def __init__(self, base_layer: nn.Module, info: ModuleInfo) -> None:
        super().__init__(base_layer, info)
        if base_layer.groups != 1:
            raise UnsupportedError(
                f"LoRA on a grouped convolution (groups={base_layer.groups}, {type(base_layer).__name__}) is not "
                "supported; leave this module out of target_modules"
            )
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels

    def _allocate(self, name: str, r: int, lora_bias: bool) -> None:
        base = self.base_layer
        conv = _CONV_TYPES[self.info.kind]
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A[name] = skip_init(conv, self.in_features, r, base.kernel_size, stride=base.stride,
                                      padding=base.padding, dilation=base.dilation, padding_mode=base.padding_mode,
                                      bias=False, **kw)
        self.lora_B[name] = skip_init(conv, r, self.out_features, 1, groups=base.groups, bias=lora_bias, **kw)

    def _base_without_bias(self, x: Tensor) -> Tensor:
        return self.base_layer._conv_forward(x, self.base_layer.weight.to(x.dtype), None)

    def _channel_shape(self, result: Tensor) -> tuple[int, ...]:
        return (1, -1) + (1,) * (result.dim() - 2)  # outputs are dim 1 of (N, out, *spatial)


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: ``lora_embedding_A: (r, num_embeddings)``, ``lora_embedding_B: (dim, r)``.

    Like PEFT, no dropout is applied and ``lora_bias`` is refused. A base layer with a scalar ``embed_scale``
    (e.g. Gemma's scaled embeddings) has the LoRA term scaled by it too.
    """

    def __init__(self, base_layer: nn.Module, info: ModuleInfo) -> None:
        super().__init__(base_layer, info)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    def _allocate(self, name: str, r: int, lora_bias: bool) -> None:
        if lora_bias:
            raise UnsupportedError("lora_bias is not supported on embedding layers (PEFT refuses it too)")
        weight = self.base_layer.weight
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(self.out_features, r, **kw))

    def _embed(self, x: Tensor, table: Tensor) -> Tensor:
        base = self.base_layer
        return F.embedding(x, table, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
                           scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    def _embed_scale(self) -> Any:
        scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(scale, (int, float)) or (isinstance(scale, Tensor) and scale.numel() == 1):
            return scale
        return None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self._skip_lora():
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        embed_scale = self._embed_scale()
        for name in self.active_adapters:
            if name not in self.lora_embedding_A:
                continue
            A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            after_A = self._embed(x, A.T)  # (..., ) -> (..., r): rows of A.T: (num, r)
            lora = (after_A @ B.T) * self.scaling[name]  # (..., r) @ (r, dim) -> (..., dim)
            if embed_scale is not None:
                lora = lora * embed_scale
            if name in self.lora_magnitude_vector:
                factor = dora_factor(self.factors(name), self.base_layer.weight,
                                     self.lora_magnitude_vector[name].weight, lora.dtype)  # (dim,)
                result = factor * result + factor * lora
            else:
                result = result + lora
        return result.to(out_dtype)


def _dora_delta(layer: _ModuleLora, name: str, x: Tensor, result: Tensor, bias_shape: tuple[int, ...]) -> Tensor:
    """DoRA's addition to ``result = base(x)``: ``(f - 1) * (W x) + f * scale * B(A(x))`` (dropout on x in training)."""
    factor = layer._dora_factor(name, x.dtype).reshape(bias_shape)  # (out,) -> broadcastable over the output
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, nn.Identity) or not layer.training:
        bias = layer.base_layer.bias
        base_out = result if bias is None else result - bias.reshape(bias_shape)  # (out,) -> broadcastable
    else:
        x = dropout(x)
        base_out = layer._base_without_bias(x)
    lora = layer.lora_B[name](layer.lora_A[name](x)) * layer.scaling[name]
    return (factor - 1) * base_out + factor * lora


_WRAPPERS = {"linear": LoraLinear, "embedding": LoraEmbedding, "conv1d": LoraConv, "conv2d": LoraConv,
             "conv3d": LoraConv}


def wrap_layer(module: nn.Module) -> LoraLayer:
    """A LoRA wrapper (with no adapter yet) around ``module``.

    Raises:
        UnsupportedError: LoRA does not apply to this module type.
    """
    info = describe_module(module)
    if isinstance(module, nn.MultiheadAttention):
        from .attention import LoraMultiheadAttention

        return LoraMultiheadAttention(module)
    if info.groups != 1:
        from .grouped_conv import GroupedLoraConv

        return GroupedLoraConv(module, info)
    wrapper = _WRAPPERS.get(info.kind)
    if wrapper is None:
        raise UnsupportedError(
            f"LoRA cannot wrap a {type(module).__name__}; supported: nn.Linear, transformers Conv1D, nn.Embedding, "
            "nn.Conv1d/2d/3d (grouped too), nn.MultiheadAttention. Leave this module out of target_modules"
        )
    return wrapper(module, info)


def expected_shapes(info: ModuleInfo, r: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """``(A shape, B shape, out)`` that a rank-``r`` LoRA on a layer described by ``info`` stores (PEFT layout)."""
    return info.lora_shapes(r)
