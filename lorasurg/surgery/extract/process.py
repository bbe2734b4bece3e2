"""One tensor pair of ``extract``: compare, and fit LoRA factors when its role says so.

Small tensors are read whole (:func:`compare`: the float32 delta is built in place, so about one input plus the
delta are held); tensors above :data:`~lorasurg.surgery.extract.stream.STREAM_ABOVE` elements are streamed from
disk in row blocks (:mod:`lorasurg.surgery.extract.stream`) and never held whole. Either way the result goes into
the run's :class:`~lorasurg.surgery.extract.build.Collected`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import zlib
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from ...engine.factors import factors_from_matrices, weight_to_matrix
from ...engine.ranks import RankPolicy
from ...errors import InputError
from ...io.adapter import AdapterModule
from ...io.checkpoint import Checkpoint
from ...modules import ModuleInfo
from .build import Collected
from .fit import Fit, fit_delta, fit_operator, oversample
from .plan import TensorRole
from .report import ModuleFit
from .stream import STREAM_ABOVE, DeltaOperator, max_abs, open_delta, sketch_matrix

__all__ = ["compare", "process_tensor"]


def process_tensor(
    base: Checkpoint, tuned: Checkpoint, role: TensorRole, modules: Mapping[str, ModuleInfo], run: Collected,
    device: torch.device, *, r: int, policy: Optional[RankPolicy], svd: str, seed: int,
) -> None:
    """Compare one tensor pair and, for a ``lora`` role, fit and store its factors in ``run``."""
    fit_args = dict(r=r, policy=policy, svd=svd, seed=seed)
    whole_spectrum = policy is not None and policy.needs_full_spectrum
    streamed = math.prod(base.shape(role.name)) > STREAM_ABOVE and (
        role.role != "lora" or (svd == "randomized" and not whole_spectrum))
    op = open_delta(base, tuned, role.name, _transposed(role, modules), device) if streamed else None
    if op is not None:
        with contextlib.closing(op):
            _stream(op, tuned, role, modules, run, **fit_args)
    else:
        delta = compare(base, tuned, role, run, device)
        if delta is not None and role.role == "lora":
            matrix = weight_to_matrix(delta, role.kind, bool(modules[role.module].fan_in_fan_out))  # (out, in) view
            _store_fit(_fit(matrix, role, run, **fit_args), role, modules, run, tuple(delta.shape))
        del delta
    _return_freed_memory()


def compare(base: Checkpoint, tuned: Checkpoint, role: TensorRole, run: Collected,
            device: torch.device) -> Optional[Tensor]:
    """Read one tensor pair; record what changed; return the float32 delta (on ``device``) or None.

    Memory: the float32 delta is built in place from the tuned tensor, then the base tensor is subtracted
    from it, so at most one input and the delta are held at once (the tuned tensor is kept only when its
    module is saved whole). ``x - y == 0`` exactly iff ``x == y`` in floating point, so a zero delta means
    an unchanged tensor.
    """
    w1 = tuned.get(role.name, device=device)
    run.tuned_dtype[role.name] = w1.dtype
    delta = w1.to(torch.float32, copy=True)
    keep = w1 if role.role == "save" else None
    del w1
    w0 = base.get(role.name, device=device)
    delta.sub_(w0)  # promotes w0 element by element; no float32 copy of it
    del w0
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


def _stream(op: DeltaOperator, tuned: Checkpoint, role: TensorRole, modules, run: Collected, *, r: int, policy,
            svd: str, seed: int) -> None:
    """:func:`compare` and the fit for a tensor streamed from disk in row blocks (never held whole)."""
    run.tuned_dtype[role.name] = op.tuned.dtype
    generator = _generator(role, seed, op.device)
    k = min(r, *op.shape)
    omega = sketch_matrix(op.shape, k, oversample(k), generator, op.device) if role.role == "lora" else None
    peak, energy, sketch = op.stats(omega)  # one pass: changed? finite? norm, and M @ omega
    if peak == 0.0:
        run.unchanged += 1
        return
    if not math.isfinite(peak):
        run.non_finite.append(f"{role.name} (shape {op.tuned.shape})")
        return
    keep = tuned.get(role.name) if role.role == "save" else None
    run.record_change(role, op.tuned.shape, energy, tuned=keep)
    if role.role == "lora":
        fit = fit_operator(op, r=r, scale=run.scale, energy=energy, sketch=sketch, policy=policy, generator=generator)
        _store_fit(fit, role, modules, run, op.tuned.shape)


def _return_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Tensors of a few tens of MB are allocated and freed once per module; glibc keeps such freed chunks in the
    heap, so without this the resident size creeps up by a few hundred MB over a model.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def _transposed(role: TensorRole, modules) -> bool:
    """Whether the stored weight's rows are columns of its matrix view (embedding, fan_in_fan_out)."""
    info = modules.get(role.module)
    return role.kind == "embedding" or bool(info is not None and info.fan_in_fan_out)


def _generator(role: TensorRole, seed: int, device) -> torch.Generator:
    """A generator seeded by ``seed`` and the module name, so results do not depend on the order."""
    return torch.Generator(device=device).manual_seed(seed + zlib.crc32(role.module.encode()))


def _fit(matrix, role: TensorRole, run: Collected, *, r: int, policy, svd: str, seed: int) -> Fit:
    if matrix.dim() != 2 or 0 in matrix.shape:
        raise InputError(f"{role.name}: cannot fit LoRA to a weight whose matrix view is {tuple(matrix.shape)}")
    return fit_delta(matrix, r=r, scale=run.scale, policy=policy, method=svd,
                     generator=_generator(role, seed, matrix.device))


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
