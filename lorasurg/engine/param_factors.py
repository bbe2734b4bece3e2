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

and gives every expert a rank-``r`` LoRA, stored as two ``nn.Linear``-shaped matrices:

    A: (r*E, in)     expert-major: rows [e*r, (e+1)*r) are expert e's    A_e = A.reshape(E, r, in)[e]
    B: (out, r*E)    rank-major: column k*E + e is column k of B_e       B_e = B.reshape(out, r, E)[:, :, e]

    delta[e] = scale * B_e @ A_e            (out, r) @ (r, in) -> (out, in); transposed for (E, in, out)

The two factors interleave experts differently (A by expert, B by rank); a file written with B expert-major loads
without an error and is wrong. With ``E = 1`` A and B are a plain LoRA's matrices and ``delta = scale * B @ A``.

A transformers-5 checkpoint fuses several ``nn.Linear`` weights into one parameter (``gate_up_proj`` is every
expert's ``[gate_proj; up_proj]`` stacked along experts). Their LoRAs fuse exactly: :func:`concat_outputs` gives the
LoRA of matrices stacked along their outputs (A concatenated along r, B block-diagonal) and :func:`stack_experts`
the layout above from per-expert factors.

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
from .factors import compute_dtype

__all__ = [
    "ParamLayout",
    "param_layout",
    "expert_factors",
    "param_delta",
    "param_adapted",
    "param_merged",
    "param_unmerged",
    "stack_experts",
    "concat_outputs",
]


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


def _check(A: Tensor, B: Tensor, layout: ParamLayout) -> int:
    """The per-expert rank of ``A``/``B`` on ``layout``; raises if their shapes do not fit."""
    E = layout.experts
    rows = int(A.shape[0])
    if A.dim() != 2 or B.dim() != 2 or rows % E or tuple(A.shape) != (rows, layout.in_features) \
            or tuple(B.shape) != (layout.out_features, rows):
        raise ShapeMismatchError(
            f"LoRA factors A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a parameter of shape {layout.shape} "
            f"({E} expert(s) of (out, in) = ({layout.out_features}, {layout.in_features})): expected A (r*{E}, "
            f"{layout.in_features}) and B ({layout.out_features}, r*{E})"
        )
    return rows // E


def expert_factors(A: Tensor, B: Tensor, layout: ParamLayout) -> tuple[Tensor, Tensor]:
    """Per-expert views ``(A_e, B_e)`` stacked: ``(E, r, in)`` and ``(E, out, r)`` (no copy of A; B permuted).

    Raises:
        ShapeMismatchError: the factors do not fit ``layout``.
    """
    r = _check(A, B, layout)
    A3 = A.reshape(layout.experts, r, layout.in_features)  # (r*E, in) -> (E, r, in)
    B3 = B.reshape(layout.out_features, r, layout.experts).permute(2, 0, 1)  # (out, r*E) -> (out, r, E) -> (E, out, r)
    return A3, B3


def param_delta(A: Tensor, B: Tensor, scale: float, layout: ParamLayout,
                dtype: Optional[torch.dtype] = None) -> Tensor:
    """``delta[e] = scale * B_e @ A_e`` in the parameter's layout ``layout.shape`` (float32 unless ``dtype``).

    Raises:
        ShapeMismatchError: the factors do not fit ``layout``.
    """
    work = compute_dtype(A, B)
    A3, B3 = expert_factors(A.to(work), B.to(work), layout)
    delta = torch.bmm(B3, A3) * scale  # (E, out, r) @ (E, r, in) -> (E, out, in)
    if layout.transposed:
        delta = delta.transpose(1, 2)  # (E, out, in) -> (E, in, out)
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
    if weight.dim() == 2:
        _check(A, B, layout)
        return weight + (B @ A) * scale  # (out, r) @ (r, in) -> (out, in)
    A3, B3 = expert_factors(A, B, layout)
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


def stack_experts(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-expert factors ``A_e: (r, in)``, ``B_e: (out, r)`` (expert order) in the fused layout: ``A: (r*E, in)``
    expert-major and ``B: (out, r*E)`` rank-major, so ``expert_factors`` gives them back. Exact (copies only).

    Raises:
        ShapeMismatchError: the experts' factors differ in shape (every expert needs the same rank).
    """
    shapes = {(tuple(a.shape), tuple(b.shape)) for a, b in zip(As, Bs)}
    if len(As) != len(Bs) or not As or len(shapes) != 1:
        raise ShapeMismatchError(f"experts' LoRA factors must all have one shape, got {sorted(shapes)}")
    A = torch.cat(list(As), dim=0)  # E x (r, in) -> (E*r, in)
    B = torch.stack(list(Bs), dim=2)  # E x (out, r) -> (out, r, E)
    return A, B.reshape(B.shape[0], -1)  # (out, r, E) -> (out, r*E): column k*E + e


def concat_outputs(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The LoRA of matrices stacked along their outputs, ``[M_1; M_2; ...]``, from theirs (one scale for all):
    ``A = [A_1; A_2; ...]`` (ranks add up) and ``B = blockdiag(B_1, B_2, ...)``, since
    ``blockdiag(B_i) @ [A_i] = [B_1 A_1; B_2 A_2; ...]``. Exact (copies only).

    Raises:
        ShapeMismatchError: the matrices do not share their input size, or an A and its B disagree in rank.
    """
    if len(As) != len(Bs) or len({int(a.shape[1]) for a in As}) != 1 or any(
            a.shape[0] != b.shape[1] for a, b in zip(As, Bs)):
        raise ShapeMismatchError(
            f"cannot stack LoRAs along outputs: A shapes {[tuple(a.shape) for a in As]}, B shapes "
            f"{[tuple(b.shape) for b in Bs]} (every A needs the same input size and its B's rank)"
        )
    return torch.cat(list(As), dim=0), torch.block_diag(*Bs)  # (sum r, in), (sum out, sum r)
