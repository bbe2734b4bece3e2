"""LoRA on fused expert parameters: PEFT's ``target_parameters`` layout and the per-expert view of it.

A mixture-of-experts layer in transformers 5 holds its ``E`` experts' matrices as one 3-D parameter, ``(E, out,
in)`` (Qwen3-MoE, Mixtral: ``gate_up_proj`` is ``(E, 2I, H)``) or ``(E, in, out)`` for classes marked
``is_transposed`` (gpt-oss). PEFT 0.21.2 adapts such a parameter with one rank-``r`` LoRA per expert (its
``ParamWrapper``) and stores all of them as two matrices:

* ``lora_A``: ``(r E, in)``, rows grouped by expert: ``lora_A.reshape(E, r, in)[e] = A_e``;
* ``lora_B``: ``(out, r E)``, columns interleaved: ``lora_B.reshape(out, r, E)[:, :, e] = B_e``;

and expert ``e``'s delta is ``scale * B_e @ A_e``, ``(out, in)`` (its transpose for an ``(E, in, out)``
parameter). :func:`join_experts` and :func:`split_experts` convert between that layout and the per-expert factors
``A (E, r, in)``, ``B (E, out, r)``.

A parameter that fuses several projections along ``out`` (``gate_up_proj = [gate; up]``, each ``(I, H)``) is
adapted by one LoRA per expert whose factors are the parts' factors stacked: ``A = [A_gate; A_up]`` (``(r_g +
r_u, in)``) and ``B = blockdiag(B_gate, B_up)`` (``(I_g + I_u, r_g + r_u)``), so that ``B @ A = [B_g A_g; B_u A_u]``
(:func:`stack_parts`; :func:`unstack_parts` reads the parts back from such block-diagonal factors). This is how PEFT
converts per-expert ``gate_proj``/``up_proj`` adapters for transformers 5 (``PeftConcatenate``), and why the fused
rank is the sum of the parts' ranks.

:func:`merged_experts` adds the deltas of a run of experts to those experts' weights (``fuse`` of a 3-D expert tensor
a checkpoint stores whole, gpt-oss's, in blocks of experts).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .factors import compute_dtype

__all__ = ["join_experts", "split_experts", "stack_parts", "unstack_parts", "expert_deltas", "merged_experts"]


def join_experts(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Per-expert factors ``A (E, r, in)``, ``B (E, out, r)`` as PEFT's ``(lora_A (r E, in), lora_B (out, r E))``."""
    experts, rank, in_f = A.shape
    if B.dim() != 3 or B.shape[0] != experts or B.shape[2] != rank:
        raise ValueError(f"join_experts: A {tuple(A.shape)} and B {tuple(B.shape)} are not (E, r, in), (E, out, r)")
    lora_A = A.reshape(experts * rank, in_f)  # (E, r, in) -> (E r, in): expert-major rows
    lora_B = B.permute(1, 2, 0).reshape(B.shape[1], rank * experts)  # (E, out, r) -> (out, r, E) -> (out, r E)
    return lora_A.contiguous(), lora_B.contiguous()


def split_experts(lora_A: Tensor, lora_B: Tensor, experts: int) -> tuple[Tensor, Tensor]:
    """PEFT's ``lora_A (r E, in)``, ``lora_B (out, r E)`` as per-expert ``A (E, r, in)``, ``B (E, out, r)``.

    Raises:
        ValueError: the shapes are not ``(r E, in)`` and ``(out, r E)`` for this ``experts``.
    """
    rows = lora_A.shape[0]
    if lora_A.dim() != 2 or lora_B.dim() != 2 or rows % experts or lora_B.shape[1] != rows:
        raise ValueError(f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} are not (r*{experts}, in) "
                         f"and (out, r*{experts})")
    rank = rows // experts
    A = lora_A.reshape(experts, rank, lora_A.shape[1])  # (E r, in) -> (E, r, in)
    B = lora_B.reshape(lora_B.shape[0], rank, experts).permute(2, 0, 1)  # (out, r E) -> (out, r, E) -> (E, out, r)
    return A, B


def stack_parts(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Factors of projections fused along ``out``: ``[(A_j (E, r_j, in), B_j (E, out_j, r_j)), ...]`` ->
    ``A (E, sum r_j, in)``, ``B (E, sum out_j, sum r_j)`` with ``B[e]`` block-diagonal (module docstring)."""
    A = torch.cat([a for a, _ in parts], dim=1)  # (E, sum r_j, in)
    experts = A.shape[0]
    outs = [b.shape[1] for _, b in parts]
    ranks = [b.shape[2] for _, b in parts]
    B = A.new_zeros(experts, sum(outs), sum(ranks), dtype=parts[0][1].dtype)
    row = col = 0
    for (_, b), out_f, rank in zip(parts, outs, ranks):
        B[:, row:row + out_f, col:col + rank] = b  # (E, out_j, r_j) block on the diagonal
        row, col = row + out_f, col + rank
    return A, B


def unstack_parts(A: Tensor, B: Tensor, outs: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """The parts of fused factors ``A (E, R, in)``, ``B (E, sum outs, R)`` (the inverse of :func:`stack_parts`).

    Each part ``j`` (rows ``outs[j]`` of ``B``) gets the columns of ``B`` that are nonzero in its rows, and the
    matching rows of ``A``; when ``B`` is block-diagonal (as PEFT's conversion and :func:`stack_parts` make it),
    ``B_j @ A_j`` is exactly part ``j`` of ``B @ A``. Otherwise part ``j`` keeps every column, which is exact too
    (``B[rows_j] @ A``) at the full rank ``R``.
    """
    parts: list[tuple[Tensor, Tensor]] = []
    row = 0
    for out_f in outs:
        rows = B[:, row:row + out_f, :]  # (E, out_j, R)
        used = rows.ne(0).any(dim=1).any(dim=0)  # (R,): columns any expert uses in these rows
        if not bool(used.any()):
            used[:1] = True  # a part with no delta keeps one (zero) column, so it has factors
        parts.append((A[:, used, :], rows[:, :, used]))
        row += out_f
    return parts


def expert_deltas(A: Tensor, B: Tensor, scale: float, transposed: bool = False) -> Tensor:
    """``scale * B_e @ A_e`` for every expert: ``(E, out, in)``, or ``(E, in, out)`` when ``transposed``."""
    delta = torch.bmm(B, A) * scale  # (E, out, r) @ (E, r, in) -> (E, out, in)
    return delta.transpose(1, 2) if transposed else delta


def merged_experts(A: Tensor, B: Tensor, scale: float, weight: Tensor, start: int = 0,
                   transposed: bool = False) -> Tensor:
    """Experts ``[start, start + n)`` of a 3-D expert weight with their LoRA merged in.

    ``weight[i] + scale * B_e @ A_e`` for ``e = start + i`` (``+ (scale * B_e @ A_e).T`` when ``transposed``:
    ``weight`` is ``(n, in, out)``), computed in float32 (float64 stays float64), cast to ``weight``'s dtype.

    Args:
        A: ``(E, r, in)``; B: ``(E, out, r)``: every expert's factors.
        weight: ``(n, out, in)``, or ``(n, in, out)`` when ``transposed``: the stored rows of experts ``start..``.
    """
    n = weight.shape[0]
    work = compute_dtype(weight, A)
    delta = expert_deltas(A[start:start + n].to(work), B[start:start + n].to(work), scale, transposed)  # like weight
    return (weight.to(work) + delta).to(weight.dtype)
