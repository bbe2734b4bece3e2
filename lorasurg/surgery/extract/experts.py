"""The experts of a mixture-of-experts checkpoint: every expert of one projection and layer fitted by one batched
randomized SVD, at one rank per group.

Groups. transformers 5 fuses a MoE layer's experts into 3-D parameters (:mod:`lorasurg.io.keymap`); the LoRA
targets among them fall into *groups*, the experts of one projection in one layer (:func:`expert_groups`):

* per-expert checkpoint keys (Qwen-MoE ``mlp.experts.3.gate_proj.weight``, Mixtral ``…experts.3.w1.weight``): one
  group per fused parameter and part (``gate_up_proj`` fuses two: gate and up are two groups), expert ``e``'s matrix
  ``(out, in)`` as stored;
* a 3-D expert parameter the checkpoint stores fused (gpt-oss's ``mlp.experts.gate_up_proj``, ``(E, in, out)`` when
  its module says ``is_transposed``, else ``(E, out, in)``): one group, expert ``e``'s matrix ``stored[e].T``
  (resp. ``stored[e]``).

Fit (:func:`fit_group`). A group's deltas are read into one float32 batch ``(n, out, in)`` — the whole group, or
chunks of ``n`` experts when the memory budget cannot hold it (:func:`group_needs`) — and factored by one batched
randomized SVD (:func:`lorasurg.engine.sketch.operator_svd` with ``batch=n``: the 4-pass scheme of :mod:`.fit`, each
expert with its own seeded test matrix, so the result does not depend on the chunking), or one batched exact SVD for
``--svd exact`` and policies that need the whole spectrum. Unchanged experts are not fitted (the layout gives them
zero factors). The factors ``A = sqrt(S/s) Vh``, ``B = U sqrt(S/s)`` are kept at the cap rank ``k = min(r, out,
in)`` until every group is fitted, with each expert's ``S``, ``||dW_e||^2`` and residual at ``k``.

Rank (:func:`finish_experts`). PEFT reads one rank for all experts of a fused parameter (``target_parameters``) and,
in the per-expert form, one rank for every expert of the model (the config's global ``r``,
:mod:`lorasurg.consumers.experts`). Without a rank policy that is ``k``. With one, the policy chooses a rank for each
expert and the group is fitted at the largest of them — in the per-expert form the largest over all groups —, which
keeps more of every expert's delta than zero-padding its own policy rank would, at the same size. Truncating the
factors at ``j <= k`` is their first ``j`` rows of ``A`` and columns of ``B`` (the split is per singular value), with
error ``||dW_e||^2 - sum(S[:j]^2)`` (the fit is an orthogonal projection of ``dW_e``, :mod:`.fit`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from ...engine.ranks import RankPolicy
from ...engine.sketch import operator_svd, sketch_matrix
from ...engine.svd import split_factors
from ...engine.threads import one_thread
from ...io.adapter import AdapterModule
from ...io.architecture import ModelDescription
from ...io.checkpoint import Checkpoint
from ...io.model_layout import ExpertParameter
from ..adapter_layout import ExpertStack
from .build import Collected
from .fit import MEASURE_BELOW, PASSES, Fit, oversample, sketch_size
from .plan import TensorRole, split_tensor_name
from .report import ModuleFit
from .stream import check_delta, memory_needs

__all__ = ["ExpertGroup", "GroupFit", "expert_groups", "group_needs", "fit_group", "finish_experts"]


@dataclass(frozen=True)
class ExpertGroup:
    """The experts of one projection in one MoE layer that are LoRA targets.

    Attributes:
        name: the fused parameter, with ``[part]`` for a parameter that fuses several projections
            (``model.layers.0.mlp.experts.gate_up_proj[1]``: the up projections).
        members: the checkpoint keys read, one per expert (per-expert keys) or the one stored 3-D key.
        experts: the expert index of each member (per-expert keys), or ``0 .. E-1`` (stored).
        shape: ``(out, in)`` of one expert's matrix.
        stored: the stored 3-D parameter, or None for per-expert keys.
    """

    name: str
    members: tuple[str, ...]
    experts: tuple[int, ...]
    shape: tuple[int, int]
    stored: Optional[ExpertParameter] = None

    @property
    def count(self) -> int:
        """The number of expert matrices."""
        return len(self.experts)

    def module(self, i: int) -> str:
        """The checkpoint module of member ``i`` (per-expert keys), or ``"<stored key>[e]"``."""
        if self.stored is not None:
            return f"{self.members[0]}[{self.experts[i]}]"
        return split_tensor_name(self.members[i])[0]


@dataclass
class GroupFit:
    """The factors of a group's changed experts at the cap rank, and what choosing a lower rank needs.

    Attributes:
        group: the group; positions: the fitted members' positions in it.
        A: ``(n, k, in)``; B: ``(n, out, k)``; S: ``(n, k)`` (float32, CPU).
        energy: ``||dW_e||_F^2`` per fitted expert; residual: ``||dW_e - s B_e A_e||_F^2`` at rank ``k``.
        ranks: the rank policy's choice per fitted expert (``k`` without a policy).
        cap: ``k = min(r, out, in)``; clamped: ``r > min(out, in)``.
    """

    group: ExpertGroup
    positions: list[int]
    A: Tensor
    B: Tensor
    S: Tensor
    energy: list[float]
    residual: list[float]
    ranks: list[int]
    cap: int
    clamped: bool


def expert_groups(roles: Mapping[str, TensorRole], description: ModelDescription) -> dict[str, ExpertGroup]:
    """The groups of the ``lora`` roles that are experts (module docstring), in the order of their first member."""
    stored = {p.stored: p for p in description.parameters.values() if p.stored}
    whole: dict[str, ExpertGroup] = {}
    per_expert: dict[str, list[tuple[int, str]]] = {}
    order: list[str] = []
    for name, role in roles.items():
        if role.role != "lora":
            continue
        if name in stored:
            p = stored[name]
            whole[p.name] = ExpertGroup(p.name, (name,), tuple(range(p.experts)), (p.out_features, p.in_features), p)
            order.append(p.name)
            continue
        slot = description.experts.get(role.module)
        if slot is not None:
            label = slot.parameter if slot.parts == 1 else f"{slot.parameter}[{slot.part}]"
            if label not in per_expert:
                order.append(label)
            per_expert.setdefault(label, []).append((slot.expert, name))
    for label, members in per_expert.items():
        members.sort()
        out_f, in_f = description.modules[split_tensor_name(members[0][1])[0]].weight_shape
        whole[label] = ExpertGroup(label, tuple(n for _, n in members), tuple(e for e, _ in members),
                                   (int(out_f), int(in_f)))
    return {label: whole[label] for label in order}


def group_needs(group: ExpertGroup, base: Checkpoint, tuned: Checkpoint, *, r: int, whole: bool) -> int:
    """Bytes to fit one expert of ``group`` held in memory (its delta, read buffers and SVD arrays); a batch of
    ``n`` needs ``n`` times that."""
    key = group.members[0]
    return memory_needs(group.shape, tuned.dtype(key), base.dtype(key), sketch=sketch_size(r, group.shape),
                        exact=whole)[0]


def fit_group(base: Checkpoint, tuned: Checkpoint, group: ExpertGroup, roles: Mapping[str, TensorRole],
              run: Collected, device: torch.device, *, r: int, policy: Optional[RankPolicy], svd: str, seed: int,
              chunk: int) -> Optional[GroupFit]:
    """Read, compare and fit every expert of ``group``, ``chunk`` experts at a time (module docstring); record the
    changes in ``run`` and return the factors at the cap rank (None when no expert changed or one is not finite)."""
    out_f, in_f = group.shape
    cap = min(r, out_f, in_f)
    whole = svd == "exact" or (policy is not None and policy.needs_full_spectrum)
    pieces: list[GroupFit] = []
    stored_energy, stored_bad = 0.0, False
    for key in group.members:
        run.tuned_dtype[key] = tuned.dtype(key)
    for start in range(0, group.count, max(1, chunk)):
        stop = min(group.count, start + max(1, chunk))
        batch = torch.empty(stop - start, out_f, in_f, dtype=torch.float32, device=device)  # (n, out, in)
        _read(base, tuned, group, start, stop, batch, device)
        changed: list[int] = []
        energies: list[float] = []
        for i in range(stop - start):
            is_changed, finite, energy = check_delta(batch[i])
            key = group.members[0 if group.stored is not None else start + i]
            if group.stored is not None:
                stored_bad = stored_bad or not finite
                stored_energy += energy if finite else 0.0
            elif not finite:
                run.non_finite.append(f"{key} (shape {tuple(base.shape(key))})")
            elif is_changed:
                run.record_change(roles[key], base.shape(key), energy)
            else:
                run.unchanged += 1
            if finite and is_changed:
                changed.append(i)
                energies.append(energy)
        if changed and not stored_bad:
            for j, i in enumerate(changed):  # the changed experts to the front, in place
                if i != j:
                    batch[j].copy_(batch[i])
            pieces.append(_fit_batch(batch[:len(changed)], [start + i for i in changed], energies, group, run.scale,
                                     cap, r > min(out_f, in_f), whole, policy, seed, device))
        del batch
    if group.stored is not None:
        key = group.members[0]
        if stored_bad:
            run.non_finite.append(f"{key} (shape {tuple(base.shape(key))})")
            return None
        if not pieces:
            run.unchanged += 1
            return None
        run.record_change(roles[key], base.shape(key), stored_energy)
    if not pieces:
        return None
    if len(pieces) == 1:
        return pieces[0]
    return GroupFit(group, [i for p in pieces for i in p.positions], torch.cat([p.A for p in pieces]),
                    torch.cat([p.B for p in pieces]), torch.cat([p.S for p in pieces]),
                    [e for p in pieces for e in p.energy], [e for p in pieces for e in p.residual],
                    [k for p in pieces for k in p.ranks], cap, pieces[0].clamped)


def _read(base: Checkpoint, tuned: Checkpoint, group: ExpertGroup, start: int, stop: int, batch: Tensor,
          device: torch.device) -> None:
    """``batch[i] = float32(tuned) - float32(base)`` for members (or stored experts) ``start .. stop-1``, each as
    its ``(out, in)`` matrix."""
    if group.stored is None:
        for i, key in enumerate(group.members[start:stop]):  # float32 copies of one expert's inputs at a time
            with one_thread():
                torch.sub(tuned.get(key, torch.float32, device), base.get(key, torch.float32, device), out=batch[i])
        return
    key, (_, d1, d2) = group.members[0], group.stored.shape
    tuned_rows, base_rows = (_stored_rows(ckpt, key, start, stop) for ckpt in (tuned, base))  # (n, d1 d2) as stored
    for i in range(stop - start):  # expert i: (d1, d2), i.e. (in, out) when transposed
        tuned_e, base_e = (rows[i].view(d1, d2).to(device, torch.float32) for rows in (tuned_rows, base_rows))
        with one_thread():
            torch.sub(tuned_e.mT if group.stored.transposed else tuned_e,
                      base_e.mT if group.stored.transposed else base_e, out=batch[i])


def _stored_rows(ckpt: Checkpoint, key: str, start: int, stop: int) -> Tensor:
    """Experts ``start .. stop-1`` of a stored 3-D tensor, flattened ``(n, d1 * d2)``: read alone from a safetensors
    file, sliced from the whole tensor of a ``.bin`` one."""
    reader = ckpt.row_reader(key)
    if reader is None:
        return ckpt.get(key)[start:stop].reshape(stop - start, -1)
    try:
        return reader.rows(start, stop)
    finally:
        reader.close()


def _fit_batch(M: Tensor, positions: list[int], energies: list[float], group: ExpertGroup, scale: float, cap: int,
               clamped: bool, whole: bool, policy: Optional[RankPolicy], seed: int, device: torch.device) -> GroupFit:
    """One batched SVD of changed experts ``M: (n, out, in)`` (members ``positions`` of the group, overwritten):
    their factors at the cap rank (CPU) and figures."""
    shape = group.shape
    if whole:
        U, S_all, Vh = torch.linalg.svd(M, full_matrices=False)  # (n, out, p), (n, p), (n, p, in)
        U, S, Vh = U[..., :cap], S_all[..., :cap], Vh[..., :cap, :]
    else:
        with one_thread():  # many small draws
            omega = torch.stack([sketch_matrix(shape, cap, oversample(cap), _generator(group.module(i), seed, device),
                                               device) for i in positions])  # (n, in, l): expert i's own draw
        U, S, Vh = operator_svd(lambda X: M @ X, lambda Y: M.mT @ Y, shape, cap, oversample=oversample(cap),
                                passes=PASSES, device=device, batch=M.shape[0], sketch=M @ omega)  # (n, out, in) @ ...
        S_all = S
    A, B = split_factors(U, S, Vh, scale)  # (n, k, in), (n, out, k)
    left = [energy - float(s.double().pow(2).sum()) for energy, s in zip(energies, S)]
    if any(x < MEASURE_BELOW * e for x, e in zip(left, energies)):
        measured = torch.baddbmm(M, B, A, alpha=-scale)  # dW - s (n, out, k) @ (n, k, in)
        left = [float(torch.linalg.vector_norm(d)) ** 2 if x < MEASURE_BELOW * e else x
                for d, x, e in zip(measured, left, energies)]
    ranks = ([int(policy.choose(S_all[i], cap, total_sq=energies[i])) for i in range(len(positions))]
             if policy is not None else [cap] * len(positions))
    return GroupFit(group, positions, A.cpu(), B.cpu(), S.cpu(), energies, [max(x, 0.0) for x in left], ranks, cap,
                    clamped)


def _generator(module: str, seed: int, device: torch.device) -> torch.Generator:
    """Seeded by ``seed`` and the expert's name, as every other module's (the order and the chunking do not matter)."""
    return torch.Generator(device=device).manual_seed(seed + zlib.crc32(module.encode()))


def finish_experts(run: Collected, fits: Sequence[GroupFit], roles: Mapping[str, TensorRole], *, one_rank: bool,
                   policy: Optional[RankPolicy]) -> None:
    """Choose each group's rank (module docstring; ``one_rank``: one for every expert, the per-expert form) and put
    the truncated factors into ``run``: per-expert modules into ``run.factors``, stored parameters as
    :class:`ExpertStack` into ``run.stacks``, their figures into ``run.fits``."""
    if not fits:
        return
    chosen = {f.group.name: min(f.cap, max(f.ranks)) for f in fits}
    if one_rank:
        top = max(chosen.values())
        chosen = {f.group.name: min(f.cap, top) for f in fits}
    raised = 0
    for fit in fits:
        rank = chosen[fit.group.name]
        raised += sum(1 for k in fit.ranks if k < rank)
        _store(run, fit, rank, roles)
    if policy is not None and raised:
        ranks = [k for f in fits for k in f.ranks]
        where = "every expert of the model (PEFT reads all of them at the config's r)" if one_rank else \
            "the experts of each projection in a layer (PEFT reads one rank per fused parameter)"
        run.notes.append(
            f"rank policy {policy}: the policy gave the {len(ranks)} changed expert matrices ranks {min(ranks)} to "
            f"{max(ranks)}; one rank is fitted for {where}, the largest the policy gives among them "
            f"({', '.join(sorted({str(v) for v in chosen.values()}))}), which keeps more of {raised} expert(s)' delta "
            "than zero-padding their own rank would, at the same size")


def _store(run: Collected, fit: GroupFit, rank: int, roles: Mapping[str, TensorRole]) -> None:
    """The factors of one group at ``rank`` into ``run`` (see :func:`finish_experts`)."""
    group = fit.group
    out_f, in_f = group.shape
    errors = [max(fit.residual[i], e - float(fit.S[i, :rank].double().pow(2).sum())) if rank < fit.cap
              else fit.residual[i] for i, e in enumerate(fit.energy)]
    kept = [min(1.0, float(fit.S[i, :rank].double().pow(2).sum()) / e) for i, e in enumerate(fit.energy)]
    dtype = run.out_dtype or run.tuned_dtype.get(group.members[0], torch.float32)
    A, B = fit.A[:, :rank].to(dtype), fit.B[:, :, :rank].to(dtype)  # (n, rank, in), (n, out, rank)
    if group.stored is None:
        for i, position in enumerate(fit.positions):
            module = group.module(position)
            if rank == 0:
                run.zero_rank[module] = Fit(None, None, 0, fit.cap, fit.clamped, fit.energy[i], 0.0, 1.0)
                continue
            run.factors[module] = AdapterModule(module, A[i].contiguous(), B[i].contiguous())
            run.fits[module] = ModuleFit(module, "expert", [out_f, in_f], rank, fit.cap, run.scale * rank,
                                         math.sqrt(errors[i] / fit.energy[i]), kept[i], fit.clamped)
        return
    key, total = group.members[0], sum(fit.energy)
    if rank == 0:
        run.zero_rank[key] = Fit(None, None, 0, fit.cap, fit.clamped, total, 0.0, 1.0)
        return
    stack_A = torch.zeros(group.count, rank, in_f, dtype=dtype)  # (E, rank, in): unchanged experts stay zero
    stack_B = torch.zeros(group.count, out_f, rank, dtype=dtype)  # (E, out, rank)
    stack_A[fit.positions], stack_B[fit.positions] = A, B
    run.stacks[key] = ExpertStack(stack_A, stack_B, rank, run.scale * rank)
    run.fits[key] = ModuleFit(key, f"experts x{group.count}", list(group.stored.shape), rank, fit.cap,
                              run.scale * rank, math.sqrt(sum(errors) / total),
                              sum(k * e for k, e in zip(kept, fit.energy)) / total, fit.clamped)
