"""One tensor pair of ``extract``: compare, and fit LoRA factors when its role says so.

Tensors are read in row blocks from their safetensors files (:mod:`lorasurg.surgery.extract.stream`): the float32
delta is formed once per block, and the pass that forms it also finds whether the tensor changed, its norm and
the randomized SVD's first product. A LoRA target's delta is then held in memory or streamed from disk, as its
:class:`~lorasurg.surgery.budget.Placement` says (:func:`placements`). Small tensors that are not LoRA targets
(norms, biases), and tensors of ``.bin`` checkpoints, are read whole (:func:`compare`). Either way the result
goes into the run's :class:`~lorasurg.surgery.extract.build.Collected`.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from ...engine.factors import factors_from_matrices, weight_to_matrix
from ...engine.ranks import RankPolicy
from ...engine.sketch import sketch_matrix
from ...errors import InputError
from ...io.adapter import AdapterModule
from ...io._memory import return_freed_memory as _return_freed_memory
from ...io.checkpoint import Checkpoint
from ...modules import ModuleInfo
from ..budget import MemoryBudget, Placement, format_size
from .build import Collected
from .fit import Fit, fit_delta, fit_operator, oversample, sketch_size
from .plan import TensorRole
from .report import ModuleFit
from .stream import DeltaOperator, Workspace, block_rows, max_abs, memory_needs, open_delta

__all__ = ["compare", "process_tensor", "placements", "subtract_into"]

#: Tensors that are not LoRA targets and have at most this many elements are read whole (norms, biases).
_READ_WHOLE = 2**16


def placements(base: Checkpoint, tuned: Checkpoint, roles: Mapping[str, TensorRole], modules, budget: MemoryBudget,
               *, r: int, svd: str, policy: Optional[RankPolicy], out_dtype: Optional[torch.dtype],
               groups: Optional[Mapping[str, tuple[Sequence[str], int, int]]] = None) -> dict[str, Placement]:
    """Where each LoRA target's delta lives while it is fitted: held in memory or streamed (see
    :meth:`MemoryBudget.place`), decided from the shapes before any tensor is read.

    The output being built (every LoRA factor, and every tensor a changed module would copy whole) is reserved
    from the budget first. Deltas that need the whole matrix (``--svd exact``, a policy needing the whole
    spectrum) are never streamed; tensors of ``.bin`` files cannot be.

    ``groups``: ``{group: (member tensors, experts, bytes to fit one expert)}`` for the experts fitted together
    (:mod:`.experts`); a group gets a placement under its name whose "rows" are experts: held whole, or fitted in
    batches of ``block_rows`` experts. Its members get none.

    Raises:
        ConfigError: the budget is below the smallest workable one (one row block of the most demanding tensor,
            with the SVD's working memory and the reserved output), or below what an exact SVD needs.
    """
    reserved = _reserved_bytes(base, roles, modules, r, out_dtype)
    whole = svd == "exact" or (policy is not None and policy.needs_full_spectrum)
    needs, result = [], {}
    grouped = {member for members, _, _ in (groups or {}).values() for member in members}
    for group, (members, count, per_expert) in (groups or {}).items():
        needs.append((group, reserved + per_expert, f"{format_size(per_expert)} to fit one expert's delta"
                      + _plus(reserved)))
        result[group] = budget.place(group, hold_bytes=per_expert * count, row_bytes=per_expert, fixed_bytes=0,
                                     rows=count, reserved=reserved, max_block_rows=count)
    for name, role in roles.items():
        if role.role not in ("lora", "rows") or name in grouped:  # an embedding layer's rows may become a LoRA
            continue
        shape = tuple(base.shape(name))
        rows, cols = (shape[0] if shape else 1), math.prod(shape[1:])
        matrix = (cols, rows) if _transposed(role, modules) else (rows, cols)
        hold, row, fixed = memory_needs(shape, tuned.dtype(name), base.dtype(name), sketch=sketch_size(r, matrix),
                                        exact=whole)
        streamable = not whole and _safetensors(base, tuned, name)
        if whole:
            needs.append((name, reserved + hold, f"{format_size(hold)} to hold its delta for an exact SVD "
                          f"(--svd exact or a rank policy that needs the whole spectrum; --svd randomized streams)"
                          + _plus(reserved)))
        elif streamable:
            needs.append((name, reserved + fixed + row, f"one row of {format_size(row)} and "
                          f"{format_size(fixed)} of SVD working memory to stream its {shape[0]} rows"
                          + _plus(reserved)))
        result[name] = budget.place(
            name, hold_bytes=hold, row_bytes=row, fixed_bytes=fixed, rows=rows, reserved=reserved,
            max_block_rows=block_rows(cols), can_stream=streamable,
            cannot_stream_reason="the exact SVD needs the whole delta" if whole else
            ".bin checkpoints cannot be read in row blocks (convert them to safetensors to stream)")
    budget.require(needs)
    return result


def _plus(reserved: int) -> str:
    return f", plus {format_size(reserved)} reserved for the adapter being built" if reserved else ""


def _reserved_bytes(base: Checkpoint, roles: Mapping[str, TensorRole], modules, r: int,
                    out_dtype: Optional[torch.dtype]) -> int:
    """An upper bound of the adapter held in memory: every LoRA target's factors and every tensor saved whole."""
    total = 0
    size = 4 if out_dtype is None else out_dtype.itemsize  # factors are cast to the output dtype (<= float32)
    for name, role in roles.items():
        shape = tuple(base.shape(name))
        if role.role == "lora" and role.kind == "experts":  # (E, d1, d2): one LoRA per expert
            total += shape[0] * min(r, shape[1], shape[2]) * (shape[1] + shape[2]) * size
        elif role.role in ("lora", "rows"):
            rows, cols = (shape[0] if shape else 1), math.prod(shape[1:])
            total += min(r, rows, cols) * (rows + cols) * size
        elif role.role in ("save", "bias"):
            total += math.prod(shape) * base.dtype(name).itemsize
    return total


def _safetensors(base: Checkpoint, tuned: Checkpoint, name: str) -> bool:
    return base.shard_of(name).suffix == ".safetensors" and tuned.shard_of(name).suffix == ".safetensors"


def process_tensor(
    base: Checkpoint, tuned: Checkpoint, role: TensorRole, modules: Mapping[str, ModuleInfo], run: Collected,
    device: torch.device, *, r: int, policy: Optional[RankPolicy], svd: str, seed: int, work: Workspace,
    placement: Optional[Placement] = None,
) -> None:
    """Compare one tensor pair and, for a ``lora`` role, fit and store its factors in ``run``.

    ``placement``: for a LoRA target, whether its delta is held or streamed and in what blocks (default: held).
    """
    fit_args = dict(r=r, policy=policy, svd=svd, seed=seed)
    lora = role.role == "lora"
    op = None
    if lora or (role.role != "bias" and math.prod(base.shape(role.name)) > _READ_WHOLE):
        hold = lora and (placement is None or placement.hold)
        if lora and not hold:
            work.release_matrix()  # the streaming budget does not include a held matrix
        op = open_delta(base, tuned, role.name, _transposed(role, modules), device, work, hold=hold,
                        rows_per_block=placement.block_rows if placement is not None else None)
    if op is not None:
        with contextlib.closing(op):
            _from_blocks(op, tuned, role, modules, run, **fit_args)
    else:
        delta = compare(base, tuned, role, run, device)
        if delta is not None and lora:
            matrix = weight_to_matrix(delta, role.kind, bool(modules[role.module].fan_in_fan_out))  # (out, in) view
            energy = run.changed[role.name][1]
            _store_fit(_fit(matrix, role, run, energy=energy, **fit_args), role, modules, run, tuple(delta.shape))
        del delta
        _return_freed_memory()


def compare(base: Checkpoint, tuned: Checkpoint, role: TensorRole, run: Collected,
            device: torch.device) -> Optional[Tensor]:
    """Read one tensor pair whole; record what changed; return the float32 delta (on ``device``) or None.

    Memory: the float32 delta is built in place from the tuned tensor, then the base tensor is subtracted from it
    in chunks (:func:`subtract_into`), so at most the delta and one input are held at once (the tuned tensor is kept
    only when its module is saved whole). ``x - y == 0`` exactly iff
    ``x == y`` in floating point, so a zero delta means an unchanged tensor.
    """
    w1 = tuned.get(role.name, device=device)
    run.tuned_dtype[role.name] = w1.dtype
    delta = w1.to(torch.float32, copy=True)
    keep = w1 if role.role == "save" else None
    del w1
    subtract_into(delta, base.get(role.name, device=device))
    peak = max_abs(delta)
    if peak == 0.0:
        run.unchanged += 1
        return None
    if not math.isfinite(peak):
        run.non_finite.append(f"{role.name} (shape {tuple(delta.shape)})")
        return None
    energy = float(torch.linalg.vector_norm(delta)) ** 2
    run.record_change(role, tuple(delta.shape), energy, delta=delta, tuned=keep)
    return delta


def subtract_into(delta: Tensor, w0: Tensor, chunk: int = 2**18) -> None:
    """``delta -= w0`` in place, converting ``w0`` to float32 a chunk at a time (a mixed-dtype ``sub_`` is
    several times slower on CPU, and a whole float32 copy of ``w0`` would double the memory)."""
    if w0.dtype == delta.dtype or w0.numel() <= chunk:
        delta.sub_(w0)
        return
    flat, other = delta.view(-1), w0.reshape(-1)
    for start in range(0, flat.numel(), chunk):
        flat[start:start + chunk].sub_(other[start:start + chunk].to(delta.dtype))


def _from_blocks(op: DeltaOperator, tuned: Checkpoint, role: TensorRole, modules, run: Collected, *, r: int,
                 policy, svd: str, seed: int) -> None:
    """:func:`compare` and the fit for a tensor read in row blocks (held after the read, or streamed)."""
    run.tuned_dtype[role.name] = op.tuned.dtype
    lora = role.role == "lora"
    whole = svd == "exact" or (policy is not None and policy.needs_full_spectrum)
    generator = _generator(role, seed, op.device) if lora else None
    k = min(r, *op.shape)
    omega = sketch_matrix(op.shape, k, oversample(k), generator, op.device) if lora and not whole else None
    changed, finite, energy, sketch = op.stats(omega)  # one pass: changed? finite? norm, and M @ omega
    del omega
    if not finite:
        run.non_finite.append(f"{role.name} (shape {op.tuned.shape})")
        return
    if not changed:
        run.unchanged += 1
        return
    keep = tuned.get(role.name) if role.role == "save" else None
    run.record_change(role, op.tuned.shape, energy, tuned=keep)
    if not lora:
        return
    if whole:
        matrix = op.view()
        if matrix.dim() != 2 or 0 in matrix.shape:
            raise InputError(f"{role.name}: cannot fit LoRA to a weight whose matrix view is {tuple(matrix.shape)}")
        fit = fit_delta(matrix, r=r, scale=run.scale, policy=policy, method=svd, generator=generator, energy=energy)
    else:
        fit = fit_operator(op, r=r, scale=run.scale, energy=energy, sketch=sketch, policy=policy, generator=generator)
    _store_fit(fit, role, modules, run, op.tuned.shape)


def _transposed(role: TensorRole, modules) -> bool:
    """Whether the stored weight's rows are columns of its matrix view (embedding, fan_in_fan_out)."""
    info = modules.get(role.module)
    return role.kind == "embedding" or bool(info is not None and info.fan_in_fan_out)


def _generator(role: TensorRole, seed: int, device) -> torch.Generator:
    """A generator seeded by ``seed`` and the module name, so results do not depend on the order."""
    return torch.Generator(device=device).manual_seed(seed + zlib.crc32(role.module.encode()))


def _fit(matrix, role: TensorRole, run: Collected, *, r: int, policy, svd: str, seed: int, energy: float) -> Fit:
    if matrix.dim() != 2 or 0 in matrix.shape:
        raise InputError(f"{role.name}: cannot fit LoRA to a weight whose matrix view is {tuple(matrix.shape)}")
    return fit_delta(matrix, r=r, scale=run.scale, policy=policy, method=svd,
                     generator=_generator(role, seed, matrix.device), energy=energy)


def _store_fit(fit: Fit, role: TensorRole, modules, run: Collected, shape: Sequence[int]) -> None:
    """Put a module's fitted factors (PEFT layout, output dtype, on CPU) and its figures into ``run``."""
    if fit.rank == 0:
        run.rank_zero(role, fit)
        return
    fan = bool(modules[role.module].fan_in_fan_out)
    target_dtype = run.out_dtype or run.tuned_dtype.get(role.name, torch.float32)
    factors = factors_from_matrices(fit.A.to("cpu", target_dtype), fit.B.to("cpu", target_dtype), role.kind,
                                    tuple(shape), run.scale, fan_in_fan_out=fan)
    run.factors[role.module] = AdapterModule(role.module, factors.A, factors.B, embedding=role.kind == "embedding")
    run.fits[role.module] = ModuleFit(
        module=role.module, kind=role.kind, shape=list(shape), rank=fit.rank, max_rank=fit.max_rank,
        alpha=run.scale * fit.rank, rel_error=fit.rel_error, energy_kept=fit.energy_kept, clamped=fit.clamped,
    )
