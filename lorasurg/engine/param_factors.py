"""LoRA on a bare parameter (PEFT's ``target_parameters``): one 2-D matrix, or a 3-D stack of expert matrices.

PEFT 0.21.2's ``lora.ParamWrapper`` reads a parameter as ``E`` matrices ``M_e: (out, in)``:

==================  =====================  ======================================================================
parameter           E, in, out             where it occurs
==================  =====================  ======================================================================
``(out, in)``       1, shape[1], shape[0]  any 2-D weight (an ``nn.Linear`` weight, a MoE router's ``weight``)
``(E, out, in)``    shape[0], [2], [1]     transformers 5's fused experts: ``gate_up_proj (E, 2I, H)``,
                                           ``down_proj (E, H, I)`` (Qwen3-MoE, Mixtral, DeepSeek, ...)
``(E, in, out)``    shape[0], [1], [2]     experts stored input-major, marked ``is_transposed`` on the experts
                                           module (gpt-oss: ``gate_up_proj (E, H, 2I)``, ``down_proj (E, I, H)``)
==================  =====================  ======================================================================

and gives every expert a rank-``r`` LoRA in the layout of :mod:`lorasurg.engine.experts` (``A (r*E, in)`` with
expert-major rows, ``B (out, r*E)`` with rank-major columns, converted by its ``split_experts``/``join_experts``):

    delta[e] = scale * B_e @ A_e            (out, r) @ (r, in) -> (out, in); transposed for (E, in, out)

With ``E = 1`` A and B are a plain LoRA's matrices and ``delta = scale * B @ A``.

Every function is pure (tensors in, new tensors out). :func:`param_delta`, :func:`param_merged` and
:func:`param_unmerged` compute in float32 (float64 if an input is) and cast at the end; :func:`param_adapted` is the
forward-pass form, in the parameter's own dtype and differentiable, as PEFT computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import ShapeMismatchError, UnsupportedError
from .experts import expert_deltas, split_experts
from .factors import compute_dtype

__all__ = ["ParamLayout", "param_layout", "param_delta", "param_adapted", "param_merged", "param_unmerged"]


@dataclass(frozen=True)
class ParamLayout:
    """How a parameter reads as ``experts`` matrices ``(out_features, in_features)`` (see the module docstring).

    Attributes:
        shape: the parameter's shape.
        experts: E (1 for a 2-D parameter).
        in_features, out_features: of each expert's matrix.
        transposed: a 3-D parameter stored ``(E, in, out)``.
    """

    shape: tuple[int, ...]
    experts: int
    in_features: int
    out_features: int
    transposed: bool = False

    def factor_shapes(self, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(A shape, B shape)`` of a rank-``r`` LoRA: ``(r*E, in)``, ``(out, r*E)``."""
        return (r * self.experts, self.in_features), (self.out_features, r * self.experts)


def param_layout(shape: Sequence[int], transposed: bool = False) -> ParamLayout:
    """The layout of a parameter of ``shape``; ``transposed`` (the experts module's ``is_transposed``) applies to
    3-D parameters only, as in PEFT.

    Raises:
        UnsupportedError: the parameter is not 2-D or 3-D (PEFT refuses those too).
    """
    dims = tuple(int(d) for d in shape)
    if len(dims) == 2:
        return ParamLayout(dims, 1, dims[1], dims[0], False)
    if len(dims) == 3:
        E, d1, d2 = dims
        return ParamLayout(dims, E, d1, d2, True) if transposed else ParamLayout(dims, E, d2, d1, False)
    raise UnsupportedError(
        f"LoRA on a {len(dims)}-D parameter (shape {dims}) is not possible: only 2-D (out, in) and 3-D "
        "(experts, out, in) parameters can be targeted (PEFT refuses the others too); leave it out of target_parameters"
    )


def _split(A: Tensor, B: Tensor, layout: ParamLayout) -> tuple[Tensor, Tensor]:
    """Per-expert ``A (E, r, in)``, ``B (E, out, r)`` of factors on ``layout``; raises if their shapes do not fit."""
    rows = int(A.shape[0])
    if A.dim() != 2 or B.dim() != 2 or rows % layout.experts or tuple(A.shape) != (rows, layout.in_features) \
            or tuple(B.shape) != (layout.out_features, rows):
        E = layout.experts
        raise ShapeMismatchError(
            f"LoRA factors A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a parameter of shape {layout.shape} "
            f"({E} expert(s) of (out, in) = ({layout.out_features}, {layout.in_features})): expected A (r*{E}, "
            f"{layout.in_features}) and B ({layout.out_features}, r*{E})"
        )
    return split_experts(A, B, layout.experts)  # (E, r, in), (E, out, r)


def param_delta(A: Tensor, B: Tensor, scale: float, layout: ParamLayout,
                dtype: Optional[torch.dtype] = None) -> Tensor:
    """``delta[e] = scale * B_e @ A_e`` in the parameter's layout ``layout.shape`` (float32 unless ``dtype``).

    Raises:
        ShapeMismatchError: the factors do not fit ``layout``.
    """
    work = compute_dtype(A, B)
    A3, B3 = _split(A.to(work), B.to(work), layout)
    delta = expert_deltas(A3, B3, scale, layout.transposed)  # (E, out, in), or (E, in, out)
    delta = delta.reshape(layout.shape)  # 2-D: (1, out, in) -> (out, in)
    return delta if dtype is None else delta.to(dtype)


def param_adapted(weight: Tensor, A: Tensor, B: Tensor, scale: float, layout: ParamLayout) -> Tensor:
    """``weight + delta`` for a forward pass: in ``weight``'s dtype, differentiable in all three tensors.

    As PEFT 0.21.2 computes it: 2-D ``W + (B @ A) * scale``; 3-D one ``baddbmm`` that adds ``scale * lhs @ rhs`` to
    ``W`` without forming the delta (lhs, rhs = ``B_e, A_e``, or ``A_e^T, B_e^T`` for the transposed layout).

    Raises:
        ShapeMismatchError: the factors do not fit ``layout``.
    """
    A, B = A.to(weight.dtype), B.to(weight.dtype)
    A3, B3 = _split(A, B, layout)  # (E, r, in), (E, out, r)
    if weight.dim() == 2:
        return weight + (B @ A) * scale  # (out, r) @ (r, in) -> (out, in)
    if layout.transposed:  # (E, in, r) @ (E, r, out) -> (E, in, out)
        return torch.baddbmm(weight, A3.transpose(1, 2), B3.transpose(1, 2), alpha=scale)
    return torch.baddbmm(weight, B3, A3, alpha=scale)  # (E, out, r) @ (E, r, in) -> (E, out, in)


def param_merged(weight: Tensor, A: Tensor, B: Tensor, scale: float, layout: ParamLayout) -> Tensor:
    """``weight + delta``, computed in float32 (float64 if an input is) and cast to ``weight``'s dtype."""
    work = compute_dtype(weight, A, B)
    return (weight.to(work) + param_delta(A, B, scale, layout, work)).to(weight.dtype)


def param_unmerged(merged: Tensor, A: Tensor, B: Tensor, scale: float, layout: ParamLayout) -> Tensor:
    """Inverse of :func:`param_merged`: ``merged - delta``, in ``merged``'s dtype."""
    work = compute_dtype(merged, A, B)
    return (merged.to(work) - param_delta(A, B, scale, layout, work)).to(merged.dtype)
