"""``lorasurg merge``: several adapters into one, by any of PEFT's ``add_weighted_adapter`` combination types, on the
adapter files alone (no base model).

Per module, every adapter that has it contributes ``(w_i, s_i, B_i, A_i)`` with its own scale ``s_i`` (``alpha / r``
or ``alpha / sqrt(r)`` with rsLoRA, from its own config and patterns); an adapter without the module counts as zero.
:func:`lorasurg.engine.combine.combine` does the math (formulas there); ``svd`` and ``cat`` are the exact weighted
sum of the deltas (``svd`` then truncated optimally), computed from the factors without forming a dense matrix.

The merged adapter has scale 1 on every module (``lora_alpha = r``, per module through anchored
``rank_pattern``/``alpha_pattern`` keys where ranks differ) and no rsLoRA, so it means the same whatever the inputs
used. Beyond PEFT:

* rsLoRA inputs: PEFT copies ``use_rslora`` to its merged adapter but computes factors for scale 1, so its merge is
  ``sqrt(r)`` times too large; here each input's own scale is used and the result is right.
* ``lora_bias``: bias deltas add with the same weights, ``lora_B.bias = sum_i w_i s_i b_i`` (PEFT leaves them out).
* Conv1d/Conv3d: the svd methods work on every conv layout (PEFT reshapes only Conv2d).
* DoRA is refused (:func:`lorasurg.surgery.merge.checks.check_adapters` says why).
* One adapter: the method asked for is applied (PEFT silently switches to ``linear``).
* Mixtures of experts (:mod:`lorasurg.surgery.expert_ranks`): every method applies expert by expert, a
  target_parameters LoRA split per expert and joined back at one rank, per-expert modules at one rank and scale,
  the config's global ``r`` and ``lora_alpha``; one layer's experts in two layouts across the inputs are refused.

``modules_to_save`` copies and trainable tokens carry over from the one adapter that has them (values that replace
the base's, not deltas: refused when two adapters differ there); ``layer_replication`` must be the same for all. (A
full copy cannot be weighted without the base model; two different copies of one module are refused, as PEFT does.)

``consumers`` (``--for``): the merged adapter is then rewritten by :func:`lorasurg.consumers.prepare_for` so that each
named consumer computes PEFT's per-module delta; what one cannot carry is left out and listed with its share of the
merged delta's energy. An output layer tied to the input embedding in any input is tied in the result.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ...consumers import parse_consumers, prepare_for, tied_modules
from ...consumers.reading import Consumers
from ...engine.combine import MergeSettings, Term, combine
from ...engine.factors import factors_from_matrices, lora_scale
from ...engine.lowrank import lowrank_norm_sq
from ...engine.threads import threads_for
from ...io.adapter import Adapter, AdapterModule
from ..export.output import WithGguf, check_output, output_consumers, output_path, write_output
from ..expert_ranks import ExpertLayout, SplitAdapter, peft_experts, refuse_consumers, split_parameter_loras
from ..patterns import derive_config, rank_scale_fields
from ..sources import AdapterSource, open_adapter, refuse_grouped, source_name
from .checks import Options, check_adapters, check_expert_layouts, check_options, default_rank, plan_modules
from .report import InputSummary, MergeReport, ModuleMerge

__all__ = ["merge_adapters", "merge_to_dir", "default_merge_path"]

_TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


def default_merge_path(adapters: Sequence[AdapterSource], method: str) -> Path:
    """``./<name1>+<name2>...-<method>`` in the working directory."""
    names = "+".join(source_name(a, f"adapter{i}") for i, a in enumerate(adapters))
    return Path(f"{names[:80]}-{method}")


def merge_to_dir(adapters: Sequence[AdapterSource], output: Union[str, os.PathLike, None] = None,
                 weights: Optional[Sequence[float]] = None, *, force: bool = False, method: str = "svd",
                 consumers: Consumers = "peft", to: str = "peft", base=None, outtype: str = "f32",
                 **options: Any) -> MergeReport:
    """:func:`merge_adapters`, then write the result to ``output`` (default :func:`default_merge_path`) atomically.

    The options and the output are checked before any adapter is read: an existing non-empty directory is refused
    without ``force``. ``to="gguf"``: written for llama.cpp as a GGUF LoRA file (``base``: the base model, only its
    config.json read; ``outtype``), and the report gains the export's (:mod:`lorasurg.surgery.export.output`).

    Raises:
        OutputExistsError: ``output`` exists, is not empty, and ``force`` is false; and everything
            :func:`merge_adapters` raises.
    """
    check_options(method, len(adapters), weights, options.get("r"), options.get("density"),
                  options.get("majority_sign"), options.get("seed", 0))
    names = output_consumers(consumers, to)
    output = output_path(default_merge_path(adapters, method), to) if output is None else output
    check_output(output, to, force, base)
    merged, report = merge_adapters(adapters, weights, method=method, consumers=names, **options)
    gguf = write_output(merged, output, to=to, force=force, base=base, outtype=outtype)
    report.output = str(output)
    return report if gguf is None else WithGguf(report, gguf)


def merge_adapters(
    adapters: Sequence[AdapterSource],
    weights: Optional[Sequence[float]] = None,
    *,
    method: str = "svd",
    r: Optional[int] = None,
    density: Optional[float] = None,
    majority_sign: Optional[str] = None,
    seed: int = 0,
    consumers: Consumers = "peft",
) -> tuple[Adapter, MergeReport]:
    """Merge ``adapters`` with ``weights`` by ``method`` (see the module docstring); nothing is written.

    Args:
        adapters: :class:`Adapter` objects, or directories / hub repo ids ``Adapter.load`` reads.
        weights: one per adapter, any sign; default ``1/n`` each (the mean).
        method: one of PEFT's combination types: ``svd`` (default), ``linear``, ``cat``, ``ties``, ``ties_svd``,
            ``dare_linear``, ``dare_ties``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune``,
            ``magnitude_prune_svd`` (:data:`lorasurg.engine.combine.METHODS`).
        r: the new rank of the svd methods; default PEFT's, the largest ``r``/``rank_pattern`` value of the inputs.
            Capped per module at ``min(out, in)`` (said in the report); zero-padded where the merged delta has a
            lower rank, so every module has rank r.
        density: the fraction each adapter keeps, in (0, 1]; required by ties, dare and magnitude_prune.
        majority_sign: ``total`` (default) or ``frequency``, for ties and dare_ties.
        seed: seeds the dare methods (per module, independent of order: ``seed + crc32(module name)``).
        consumers: who will load the result (``--for``): ``peft`` (default), ``vllm``, ``llama.cpp``, ``all`` or
            several; see the module docstring.

    Returns:
        ``(merged adapter, report)``.

    Raises:
        ConfigError: options that do not fit the method or the adapters (see :func:`checks.check_options`),
            unequal ranks for a factor-wise method, an unknown consumer.
        UnsupportedError: DoRA adapters, a LoRA on a grouped convolution; ``consumers`` other than PEFT for
            target_parameters LoRAs.
        InputError: unreadable adapters, adapters for different bases, clashing modules_to_save copies or
            trainable tokens, different layer_replication, nothing left that the named consumers can carry.
    """
    options = check_options(method, len(adapters), weights, r, density, majority_sign, seed)
    names_for = parse_consumers(consumers)
    opened = [open_adapter(a, f"adapter {i}") for i, a in enumerate(adapters)]
    originals, names = [a for a, _ in opened], [n for _, n in opened]
    splits = [split_parameter_loras(a) for a in originals]
    for split, name in zip(splits, names):
        refuse_consumers(split, names_for, name)
    check_expert_layouts(splits, originals, names)
    inputs = [s.adapter for s in splits]  # target_parameters LoRAs as one module per expert
    plan = plan_modules(inputs)
    for adapter, name in zip(inputs, names):
        refuse_grouped(adapter, name, "merged")
    check_adapters(inputs, names, options, plan)
    spec = options.method
    new_rank = (options.r or default_rank(inputs)) if spec.takes_rank else None
    report = MergeReport(
        spec.name, spec.formula, list(options.weights), new_rank, options.density,
        options.majority_sign if spec.uses_sign else None, options.seed if spec.random else None,
        consumers=list(names_for),
    )
    for adapter, name, weight in zip(originals, names, options.weights):
        cfg = adapter.config
        report.inputs.append(InputSummary(name, weight, cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.lora_bias,
                                          len(adapter.modules)))
    use_bias = any(a.config.lora_bias for a in inputs)
    modules: dict[str, AdapterModule] = {}
    for module, entries in plan.items():
        merged, row = _merge_module(module, entries, inputs, options, new_rank, use_bias)
        modules[module] = merged
        report.modules.append(row)
    loras = {path: lora for split in splits for path, lora in split.loras.items()}
    source = {name: mod for adapter in reversed(originals) for name, mod in adapter.modules.items()}
    layout = peft_experts(modules, {m: (mod.rank, 1.0) for m, mod in modules.items()},
                          SplitAdapter(inputs[0], loras), source)
    modules = layout.modules
    report.notes += layout.notes
    config = _config(originals, layout, use_bias)
    extra: dict[str, torch.Tensor] = {}
    for adapter in originals:
        for key, tensor in adapter.extra.items():
            extra.setdefault(key, tensor)
    result = Adapter(config, modules, extra)
    problems = result.problems()
    if problems:  # a bug here, not in the user's input
        raise AssertionError("merge built an inconsistent adapter: " + "; ".join(problems))
    _notes(report, originals, names, extra)
    tied = set().union(*(tied_modules(a) for a in originals)) & set(result.modules)
    result, report.for_report = prepare_for(result, names_for, tied=tied)
    report.adapter_parameters = result.num_parameters()
    report.adapter_bytes = sum(t.numel() * t.element_size() for t in result.to_state_dict().values())
    return result, report


def _merge_module(module: str, entries: list[tuple[int, AdapterModule]], inputs: Sequence[Adapter],
                  options: Options, new_rank: Optional[int], use_bias: bool) -> tuple[AdapterModule, ModuleMerge]:
    """One module's merged factors and bias, and its report row."""
    terms = []
    for index, mod in entries:
        rank, alpha = inputs[index].rank_alpha(module)
        scale = lora_scale(rank, alpha, inputs[index].config.use_rslora)
        terms.append(Term(options.weights[index], scale, mod.B.reshape(mod.B.shape[0], -1),  # (out, r)
                          mod.A.reshape(mod.A.shape[0], -1)))  # (r, in)
    out_f, in_f = terms[0].B.shape[0], terms[0].A.shape[1]
    generator = None
    if options.method.random:
        generator = torch.Generator().manual_seed(options.seed + zlib.crc32(module.encode()))
    settings = MergeSettings(rank=new_rank, density=options.density, majority_sign=options.majority_sign,
                             generator=generator, scale=1.0)
    width = sum(t.A.shape[0] for t in terms) + (new_rank or 0)
    work = out_f * in_f * min(out_f, in_f) if options.method.family == "dense" else (out_f + in_f) * width**2
    with threads_for(work):
        return _finish_module(module, entries, inputs, options, new_rank, use_bias, terms, settings)


def _finish_module(module: str, entries: list[tuple[int, AdapterModule]], inputs: Sequence[Adapter],
                   options: Options, new_rank: Optional[int], use_bias: bool, terms: list[Term],
                   settings: MergeSettings) -> tuple[AdapterModule, ModuleMerge]:
    """The merge of one module's terms, its bias, the layout, and the report row."""
    first = entries[0][1]
    out_f, in_f = terms[0].B.shape[0], terms[0].A.shape[1]
    merged = combine(options.method.name, terms, settings)
    dtype = _promoted([m.A for _, m in entries] + [m.B for _, m in entries])
    f = factors_from_matrices(merged.A, merged.B, first.kind, (out_f, *first.A.shape[1:]), 1.0)
    bias = None
    if use_bias and not first.embedding:
        bias = torch.zeros(out_f, dtype=torch.float64)
        for term, (_, mod) in zip(terms, entries):
            if mod.bias is not None:
                bias += term.coefficient * mod.bias.double()  # sum_i w_i s_i b_i (new scale 1)
        biases = [m.bias for _, m in entries if m.bias is not None]
        bias = bias.to(_promoted(biases) if biases else dtype)
    result = AdapterModule(module, f.A.to(dtype).contiguous(), f.B.to(dtype).contiguous(), bias, None, first.embedding)
    if options.method.family == "exact":  # svd: Eckart-Young, ||E - E_k||^2 = (1 - kept) ||E||^2; cat: exact
        rel_diff = max(1.0 - merged.energy_kept, 0.0) ** 0.5
    else:
        exact = [(t.coefficient, t.B, t.A) for t in terms]
        exact_sq = lowrank_norm_sq(exact)
        diff_sq = lowrank_norm_sq([(1.0, merged.B, merged.A)] + [(-c, B, A) for c, B, A in exact])
        rel_diff = (diff_sq / exact_sq) ** 0.5 if exact_sq > 0 else (0.0 if diff_sq == 0 else float("inf"))
    ranks: list[Optional[int]] = [None] * len(inputs)
    for index, mod in entries:
        ranks[index] = mod.rank
    k = merged.A.shape[0]
    row = ModuleMerge(
        module, first.kind, [out_f, in_f], ranks, k, merged.energy_kept, rel_diff,
        padded=k - merged.rank if options.method.takes_rank else 0,
        clamped=new_rank is not None and new_rank > min(out_f, in_f),
    )
    return result, row


def _promoted(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _config(inputs: Sequence[Adapter], layout: ExpertLayout, use_bias: bool):
    """Adapter 0's config with the merged ranks at scale 1, the union of targets and modules_to_save, no DoRA/rsLoRA;
    per-expert modules at the global r (:mod:`lorasurg.surgery.expert_ranks`)."""
    base = inputs[0].config
    changes: dict[str, Any] = dict(rank_scale_fields(layout.ranks, base=layout.base))
    same_targets = all(
        set(a.modules) == set(inputs[0].modules)
        and all(getattr(a.config, f) == getattr(base, f) for f in _TARGETING + ("target_parameters",))
        for a in inputs
    )
    if not same_targets:
        changes.update(target_modules=sorted(m for m in layout.modules if m not in layout.paths) or None,
                       target_parameters=sorted(layout.parameters) or None, exclude_modules=None,
                       layers_to_transform=None, layers_pattern=None)
    saved = list(dict.fromkeys(m for a in inputs for m in (a.config.modules_to_save or [])))
    tokens = {m: i for a in inputs for m, i in a.token_indices().items()}  # each module's from its one owner
    changes.update(use_rslora=False, use_dora=False, lora_bias=use_bias, modules_to_save=saved or None,
                   init_lora_weights=True, trainable_token_indices=tokens or None)
    return derive_config(base, **changes)


def _notes(report: MergeReport, inputs: Sequence[Adapter], names: Sequence[str], extra: dict) -> None:
    notes = report.notes
    missing = [m for m in report.modules if None in m.ranks]
    if missing:
        notes.append(f"{len(missing)} module(s) are missing from some inputs and count as zero there: "
                     + ", ".join(m.module for m in missing[:6]) + (" ..." if len(missing) > 6 else ""))
    clamped = [m for m in report.modules if m.clamped]
    if clamped:
        notes.append(f"r={report.r} exceeds min(out, in) of {len(clamped)} module(s); their rank was clamped to it: "
                     + ", ".join(f"{m.module} (r={m.rank})" for m in clamped[:6]))
    padded = [m for m in report.modules if m.padded]
    if padded:
        notes.append(f"{len(padded)} module(s) have a merged delta of lower rank than r: zero-padded to r (lossless), "
                     "so every module has the same rank")
    if report.method == "linear" or report.method in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        notes.append(f"{report.method} combines lora_A and lora_B separately (PEFT's definition), so B @ A has cross "
                     "terms B_i A_j; 'vs exact sum' shows how far that is from the weighted sum of the deltas "
                     "(svd and cat are exact)")
    if any(a.config.use_rslora for a in inputs):
        notes.append("rsLoRA inputs: each is read at its own scale alpha/sqrt(r); the merged adapter uses plain scale "
                     "alpha/r = 1 (PEFT's add_weighted_adapter keeps use_rslora and is off by sqrt(r) here)")
    if any(a.config.lora_bias for a in inputs):
        notes.append("lora_B.bias deltas added with the same weights: sum_i w_i s_i b_i (PEFT's add_weighted_adapter "
                     "leaves them out)")
    if len(inputs) == 1:
        notes.append(f"one adapter: {report.method} applied to it (PEFT's add_weighted_adapter would switch to linear)")
    owners: dict[str, list[str]] = {}
    for key in extra:
        owners.setdefault(next(n for a, n in zip(inputs, names) if key in a.extra), []).append(key)
    for owner, keys in owners.items():
        if len(inputs) > 1:
            notes.append(f"{len(keys)} full tensor(s) (modules_to_save, ...) taken unchanged from {owner}: "
                         f"{', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} (weights do not apply to full copies)")
    bases = {a.config.base_model_name_or_path for a in inputs if a.config.base_model_name_or_path}
    if len(bases) > 1:
        notes.append(f"the inputs name different base models ({', '.join(sorted(bases))}); their shapes agree, so "
                     "they were merged")
