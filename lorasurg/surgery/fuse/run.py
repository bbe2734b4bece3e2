"""``lorasurg fuse``: BASE with an adapter merged in, written as a checkpoint laid out like BASE.

For each LoRA module with weight ``W`` (matrix view ``(out, in)``, see :mod:`lorasurg.engine.factors`) and scale
``s`` (``alpha / r`` or ``alpha / sqrt(r)``, per module from the config's patterns):

* LoRA: ``W' = W + s * B @ A``;
* DoRA (Liu et al. 2024, eq. 5): ``W' = m / ||W + s * B @ A||_row * (W + s * B @ A)``;
* ``lora_B.bias``: ``b' = b + s * b_B`` (a layer without a bias gets one where the config can say so, see
  :mod:`.plan`);
* ``modules_to_save``: the adapter's copy replaces the module's tensors;
* trainable tokens: their rows replace the weight's rows (the vocabulary grows when the indices say so), and a
  replicated stack of layers is written out one copy each, renumbered (:mod:`.layout`);
* a ``target_parameters`` LoRA on 3-D experts (PEFT's ``ParamWrapper``): expert ``e`` gains ``s * B_e @ A_e``, in the
  checkpoint keys that hold it (per-expert keys: their rows of it) or in the expert's slice of the 3-D tensor BASE
  stores (gpt-oss ``(E, in, out)``: transposed), see :mod:`.place`;

computed by :func:`lorasurg.engine.factors.merged_weight` and :func:`~lorasurg.engine.factors.delta_bias` (the
functions the runtime's merge uses), in float32, cast to the tensor's dtype. Embedding LoRA, conv layers (Conv3d
included, where PEFT fails) and GPT-2 ``Conv1D`` (``fan_in_fan_out``) are merged in their own layouts. Tied weights
are handled once (see :mod:`.plan`).

Everything is checked before anything is written (:func:`.plan.plan_fuse`); then BASE is streamed through the shared
checkpoint rewriter (:func:`lorasurg.io.rewrite.rewrite_checkpoint`): one module in memory, every untouched tensor
copied as stored, non-weight files copied, config.json updated only where the plan says.

Memory: ``max_memory`` (a :class:`~lorasurg.surgery.budget.MemoryBudget`; default half the available memory) bounds
the tensors held at once, besides the adapter (held throughout). A tensor whose work does not fit is read, merged
and written in row blocks sized from the budget (:mod:`.blocks`), copied tensors included; a budget below one row of
the widest tensor is refused before any work, naming the smallest workable one. The report lists the tensors
processed in row blocks and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional, Union

import torch
from torch import Tensor

from ...engine.experts import merged_experts
from ...engine.factors import LoraFactors, delta_bias, factor_shapes, merged_weight
from ...errors import ConfigError
from ...io.adapter import Adapter
from ...io.rewrite import TensorSource, rewrite_checkpoint
from ...io.writer import atomic_output_dir, check_output_dir
from ..options import Progress, Source, default_output, dtype_problem, open_checkpoint, output_dtype, parse_device
from ..budget import MemoryBudget, Size
from ..options import source_name
from ..rewrite_memory import MemoryUse, place_rewrite
from .blocks import fuse_works, merged_blocks, touched
from .layout import replicated, with_rows
from .plan import ExpertFactors, FusePlan, plan_fuse
from .report import FusedModule, FuseReport

__all__ = ["fuse", "FuseReport"]

AdapterSource = Union[str, os.PathLike, Adapter]


def fuse(
    base: Source,
    adapter: AdapterSource,
    output: Union[str, os.PathLike, None] = None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    drop_unfusable_bias: bool = False,
    force: bool = False,
    progress: Optional[Progress] = None,
    max_memory: Optional[Size] = None,
) -> FuseReport:
    """Write BASE with ``adapter`` merged in to ``output`` (see the module docstring).

    Args:
        base: a checkpoint (anything :meth:`Checkpoint.open` reads, or an open checkpoint); ``.bin`` is read with
            ``torch.load(weights_only=True)`` and written as safetensors.
        adapter: a PEFT adapter directory (or hub repo id), or an :class:`Adapter`.
        output: the model directory to write; default ``./<BASE name>-fused``. Checked before any work; replaced
            only with ``force`` (it may be BASE itself: BASE is replaced after the last tensor is read).
        dtype: dtype of the written floating tensors but buffers (copied as stored); ``auto`` keeps each tensor's own.
        device: where the merges run (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
        drop_unfusable_bias: leave out lora_B biases on layers the architecture cannot give a bias (listed with
            their norms) instead of refusing.
        force: replace an existing non-empty ``output``.
        progress: called as ``progress(done, total, tensor name)`` in elements.
        max_memory: the memory budget for the tensors processed at once, besides the adapter (bytes, or text such
            as ``"2GB"``, ``"500MB"``, ``"50%"``: :func:`lorasurg.surgery.budget.parse_size`); None: half the
            available memory. A tensor whose work does not fit is processed in row blocks.

    Returns:
        :class:`FuseReport`.

    Raises:
        OutputExistsError: ``output`` exists and is not empty, without ``force``.
        ShapeMismatchError: the adapter was made for another base (modules and both shapes named).
        InputError: unfusable lora_B biases (without ``drop_unfusable_bias``); adapter tensors BASE has no place
            for (trainable tokens that do not fit it included); a layer_replication BASE has no stack for;
            unreadable inputs.
        UnsupportedError: LoRA on a grouped convolution or an nn.MultiheadAttention; a lora_B bias that needs a new
            bias together with replicated layers.
        ConfigError: a ``max_memory`` that is not a size, or below the smallest workable budget (one row of the
            widest tensor besides the adapter; the message says what that is).
    """
    problem = dtype_problem(dtype)
    if problem:
        raise ConfigError(problem)
    work_device = parse_device(device)
    budget = MemoryBudget.resolve(max_memory, work_device)
    if output is None:
        output = default_output(base, "-fused")
    check_output_dir(output, force)
    loaded = adapter if isinstance(adapter, Adapter) else Adapter.load(adapter)
    report = FuseReport(base=source_name(base), adapter="<Adapter>" if isinstance(adapter, Adapter) else
                        os.fspath(adapter), device=str(work_device), dtype=dtype, output=str(output))
    with contextlib.ExitStack() as opened:
        ckpt, updates, notes = replicated(open_checkpoint(base, opened), loaded)
        plan = plan_fuse(ckpt, loaded, drop_unfusable_bias=drop_unfusable_bias)
        plan.config_updates.update(updates)
        plan.notes[:0] = notes
        works = fuse_works(ckpt, plan, output_dtype(dtype))
        reserved = loaded.num_bytes()
        places = place_rewrite(budget, ckpt, works, reserved=reserved, reserved_for="the adapter")
        blocks = {name: p.block_rows for name, p in places.items() if not p.hold}
        edit = _editor(ckpt.module_infos(), plan, work_device, blocks)
        with atomic_output_dir(output, force) as tmp:
            written = rewrite_checkpoint(ckpt, tmp, edit, dtype=output_dtype(dtype), config_updates=plan.config_updates,
                                         progress=progress, copy_blocks=blocks)
    _fill(report, plan, written)
    report.memory = MemoryUse.of(budget, reserved, "the adapter", places, works, ckpt)
    return report


def _editor(modules, plan: FusePlan, device: torch.device, blocks: dict[str, int]):
    """The rewrite callback: the merged/replaced tensors for a BASE tensor the plan touches (None: copy it); a tensor
    in ``blocks`` is computed in row blocks of that many rows."""

    def final(name: str, stored: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        value = plan.replace[name].to(device, dtype) if name in plan.replace else stored
        module = plan.module_of.get(name)
        f = plan.factors.get(module) if module is not None else None
        if name in plan.stacked:
            e = _on(plan.stacked[name], device)
            value = merged_experts(e.A, e.B, e.scale, value, 0, e.transposed)
        elif f is not None and name == f"{module}.weight":
            value = merged_weight(_on(f, device), value)
        elif f is not None and name == f"{module}.bias" and f.bias is not None:
            value = value + delta_bias(_on(f, device), value.dtype)
        if name in plan.rows:
            value = with_rows(value, *plan.rows[name])
        return value

    def edit(name: str, source: TensorSource):
        if not touched(plan, name):
            return None
        if name in blocks:
            return _blocked(name, source)
        dtype = source.output_dtype(name)
        needs_base = name not in plan.replace or name in plan.untie
        stored = source.read(name, device) if needs_base else None
        out = [(name, final(name, stored, dtype))] + _extras(name, dtype)
        if name in plan.untie:
            out.append((plan.untie[name], final(plan.untie[name], stored, dtype)))
        return [(key, tensor.to("cpu")) for key, tensor in out]

    def on_device(f):
        return _on(f, device)

    def _blocked(name: str, source: TensorSource):
        """Tensor ``name`` (and its untied alias) merged or copied in row blocks, then its biases."""
        dtype = source.output_dtype(name)
        out = [(name, merged_blocks(name, name, plan, source, blocks[name], device, on_device))]
        out += [(key, tensor.to("cpu")) for key, tensor in _extras(name, dtype)]
        if name in plan.untie:
            alias = plan.untie[name]
            out.append((alias, merged_blocks(alias, name, plan, source, blocks[name], device, on_device)))
        return out

    def _extras(name: str, dtype: torch.dtype):
        """The biases written after weight ``name``: a lora_B bias as a new bias, or a zero bias a flag needs."""
        out = []
        if name in plan.new_bias:
            f = plan.factors[plan.new_bias[name]]
            out.append((f"{plan.new_bias[name]}.bias", delta_bias(_on(f, device), dtype)))
        if name in plan.zero_bias:
            info = modules[plan.zero_bias[name]]
            _, _, features = factor_shapes(info.kind, tuple(info.weight_shape), 1, info.fan_in_fan_out)
            out.append((f"{plan.zero_bias[name]}.bias", torch.zeros(features, dtype=dtype)))
        return out

    return edit


def _on(f: Union[LoraFactors, ExpertFactors], device: torch.device) -> Union[LoraFactors, ExpertFactors]:
    """The factors on ``device`` (the same object when they are there already)."""
    if f.A.device == device:
        return f
    move = {k: getattr(f, k).to(device) for k in ("A", "B", "bias", "magnitude") if getattr(f, k, None) is not None}
    return dataclasses.replace(f, **move)


def _fill(report: FuseReport, plan: FusePlan, written) -> None:
    new = set(plan.new_bias.values())
    dropped = {d.module: d.norm for d in plan.dropped}
    for name, f in plan.factors.items():
        if name in dropped:
            bias = "dropped"
        elif name in new:
            bias = "new bias"
        elif f.bias is not None and f"{name}.bias" in plan.bias_of:
            bias = "added to BASE's bias"
        elif f.bias is not None:
            bias = "zero (not needed)"
        else:
            bias = "none"
        report.modules.append(FusedModule(name, f.kind, f.rank, f.scale, f.magnitude is not None, bias,
                                          plan.sources.get(name)))
    for name, e in plan.stacked.items():
        report.modules.append(FusedModule(name, "experts", e.rank, e.scale, False, "none", plan.sources.get(name)))
    report.replaced = sorted(plan.replace)
    report.dropped_biases = dropped
    report.config_updates = dict(written.config_updates)
    report.notes = list(plan.notes)
    report.model = written
