"""``lorasurg extract``: a PEFT LoRA adapter that approximates a full fine-tune as ``base + adapter``.

For every linear/conv/embedding weight that changed, the delta ``dW = W_tuned - W_base`` (matrix view ``(out,
in)``, see :mod:`lorasurg.engine.factors`) is replaced by its truncated SVD, ``scale * B @ A`` with
``A = sqrt(S/scale) Vh`` and ``B = U sqrt(S/scale)`` (:mod:`lorasurg.surgery.extract.fit`). Everything else
that changed is carried exactly (``lora_B.bias``, ``modules_to_save``) or listed as dropped
(:mod:`lorasurg.surgery.extract.plan` has the rules). Nothing changes silently: the report lists every tensor
that differs and what became of it.

Scale and alpha. The intended scale is ``alpha / r`` (``alpha`` defaults to ``r``, i.e. scale 1). Every module
keeps exactly that scale: a module fitted with rank ``r_m`` gets ``rank_pattern[m] = r_m`` and
``alpha_pattern[m] = scale * r_m`` (anchored keys, one module each), and the config's own ``r``/``lora_alpha``
are the largest rank used and ``scale`` times it. Tools that ignore the patterns (some servers) then still apply
the right scale.

Bias deltas. PEFT adds ``scale * lora_B.bias`` to a layer's output, so ``lora_B.bias = db / scale``.
``lora_bias`` is one flag for every target: targets whose bias did not change, or that have none, get a zero
``lora_B.bias`` so PEFT loads without missing keys. PEFT cannot *merge* ``lora_bias`` into a layer without a
bias (``merge_and_unload`` raises); the report says which layers those are. By default (``lora_bias=None``)
``lora_bias`` is on exactly when some LoRA target's bias changed.

Tied embeddings (``lm_head`` sharing the input embedding's weight): the shared tensor is read and decomposed
once; the adapter then carries the change for both modules, since PEFT adapts them separately:
``lora_embedding_A/B`` on the embedding and the same factors, transposed, as ``lm_head``'s ``lora_A/B`` (with
``--embeddings full``, a saved copy for each).

Mixtures of experts: every expert's delta is fitted as its own LoRA, the experts of one projection and layer
together by one batched randomized SVD, at one rank per group (:mod:`lorasurg.surgery.extract.experts`), and the
adapter is laid out as PEFT loads it on the model transformers builds (per expert, or ``target_parameters`` on the
fused parameters: :mod:`lorasurg.surgery.adapter_layout`). A changed tensor the adapter cannot carry for a reason
other than the user's choice is refused unless ``allow_dropped`` (:mod:`lorasurg.surgery.extract.plan`).

Memory: tensors are read one base/tuned pair at a time in shard order, in row blocks. ``max_memory`` (a
:class:`~lorasurg.surgery.budget.MemoryBudget`; default half the available memory) decides per LoRA target whether
its float32 delta is held in memory after one read or streamed from disk in row blocks over several passes
(:func:`lorasurg.surgery.extract.process.placements`), so memory is about the budget plus the interpreter and
torch, whatever the model's size; the report lists the streamed tensors and why.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ...consumers.rules import CONSUMERS, with_serving
from ...engine.factors import lora_scale
from ...engine.ranks import parse_rank_policy
from ...errors import ConfigError, UnsupportedError
from ...io.adapter import Adapter
from ...io.checkpoint import Checkpoint
from ..export.output import WithGguf, check_output, output_consumers, output_path, write_output
from ..budget import MemoryBudget, Size, format_size
from ..options import DTYPES, Progress, Source, dtype_problem, numel as _numel, open_checkpoint as _open
from ..adapter_layout import expert_form, parameter_targets
from ..options import parse_device as _device, short_list as _short, source_name as _source_name
from .build import Collected, build_adapter
from .experts import expert_groups, finish_experts, fit_group, group_needs
from .pair import buffer_names, check_pair
from .plan import EMBEDDING_MODES, blocker, plan_roles, split_tensor_name
from .report import ExtractReport, StreamedTensor
from .process import compare, placements, process_tensor
from .stream import Workspace
from .tokens import extract_rows

__all__ = ["extract", "extract_to_dir", "default_output_path", "ExtractReport", "SVD_METHODS", "DTYPES"]

SVD_METHODS = ("randomized", "exact")


def default_output_path(tuned: Union[str, os.PathLike], r: int, rank_policy: Optional[str] = None) -> Path:
    """``./<tuned name>-lora-r<r>`` (``-<policy>`` appended for a rank policy), in the working directory."""
    name = Path(os.fspath(tuned).rstrip("/")).name or "model"
    suffix = f"-{rank_policy.replace(':', '')}" if rank_policy else ""
    return Path(f"{name}-lora-r{r}{suffix}")


def extract_to_dir(
    base: Source, tuned: Source, output: Union[str, os.PathLike, None] = None, *, force: bool = False,
    to: str = "peft", outtype: str = "f32", **options,
) -> ExtractReport:
    """:func:`extract`, then write the adapter to ``output`` (default :func:`default_output_path`) atomically.

    The output is checked before any work: an existing non-empty directory is refused without ``force``.
    Nothing is written when extraction fails or is interrupted. ``to="gguf"``: extracted for llama.cpp and written
    as a GGUF LoRA file (BASE's config.json gives its architecture; ``outtype``), and the report gains the export's
    (:mod:`lorasurg.surgery.export.output`).

    Raises:
        OutputExistsError: ``output`` exists, is not empty, and ``force`` is false.
        and everything :func:`extract` raises.
    """
    if to != "peft":
        named = with_serving(options.get("consumers"), options.pop("serving", False))
        options["consumers"] = output_consumers(named, to)
    if output is None:
        default = default_output_path(_source_name(tuned), options.get("r", 16), options.get("rank_policy"))
        output = output_path(default, to)
    check_output(output, to, force, base)
    adapter, report = extract(base, tuned, **options)
    gguf = write_output(adapter, output, to=to, force=force, base=base, outtype=outtype)
    report.output = str(output)
    return report if gguf is None else WithGguf(report, gguf)


def extract(
    base: Source,
    tuned: Source,
    *,
    r: int = 16,
    alpha: Optional[float] = None,
    rank_policy: Optional[str] = None,
    target_modules: Union[str, Sequence[str], None] = None,
    exclude_modules: Union[str, Sequence[str], None] = None,
    embeddings: str = "auto",
    lora_bias: Optional[bool] = None,
    svd: str = "randomized",
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    consumers: Union[str, Sequence[str], None] = "peft",
    serving: bool = False,
    allow_empty: bool = False,
    progress: Optional[Progress] = None,
    max_memory: Optional[Size] = None,
    allow_dropped: bool = False,
) -> tuple[Adapter, ExtractReport]:
    """Extract a LoRA adapter approximating ``tuned`` as ``base + adapter`` (see the module docstring).

    Args:
        base, tuned: checkpoints (anything :meth:`Checkpoint.open` reads, or open checkpoints).
        r: the LoRA rank (the cap for a rank policy); clamped per module to ``min(out, in)``, and said so.
        alpha: ``lora_alpha`` for rank ``r``; default ``r`` (scale 1). Every module keeps scale ``alpha / r``.
        rank_policy: ``energy:F``, ``sv_ratio:X``, ``sv_fro:F``, ``sv_cumulative:F``, ``sv_epsilon:E`` or a
            fixed integer (:func:`lorasurg.engine.ranks.parse_rank_policy`); None keeps ``r`` everywhere.
        target_modules / exclude_modules: PEFT-style selection of the layers to fit (names or ``.``-suffixes,
            or one regex); default every LoRA-able layer.
        embeddings: what a changed embedding layer (input embedding, output head) becomes: ``auto`` (trainable
            tokens when they are no larger than its LoRA, else the LoRA), ``tokens`` (``trainable_token_indices``:
            the rows that changed, exact), ``lora`` (embedding LoRA), ``full`` (modules_to_save) or ``skip``
            (dropped, listed); see :mod:`lorasurg.surgery.extract.tokens`. TUNED may have more rows than BASE there
            (added tokens) except with ``lora``.
        lora_bias: carry bias deltas of LoRA targets as ``lora_B.bias``; None: on iff one changed.
        svd: ``randomized`` (seeded, within 1% of optimal) or ``exact``.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``: where the arithmetic runs.
        dtype: dtype of the written tensors; ``auto`` follows the tuned checkpoint.
        seed: seeds the randomized SVD (per module, independent of order).
        consumers: who will read the adapter (``--for``): ``peft`` (default), ``vllm``, ``llama.cpp``, ``all``, or
            several (``"vllm,llama.cpp"`` or a list). What one of them cannot carry is left out and listed with
            its share of the delta energy, and the scale is written so that each computes PEFT's delta
            (:func:`lorasurg.consumers.prepare_for`).
        serving: an alias of adding ``vllm`` to ``consumers`` (``--serving``).
        allow_empty: for identical checkpoints, return a no-op adapter (all factors zero) instead of raising.
        progress: called as ``progress(done, total, tensor name)`` in elements after each tensor.
        max_memory: the memory budget for the tensors being processed (bytes, or text such as ``"2GB"``,
            ``"500MB"``, ``"50%"``: :func:`lorasurg.surgery.budget.parse_size`); None: half the available memory.
            A LoRA target whose delta fits is fitted in memory from one read, a larger one is streamed from disk
            in row blocks (4 passes); the report says which and why. Python and torch themselves are not counted,
            except with :class:`~lorasurg.surgery.budget.WholeProcess` (what ``--max-memory`` passes): then the
            memory the process holds at the start counts against the size too.
        allow_dropped: write the adapter although changed tensors are left out for a reason other than the user's
            own choice (a key the model has no place for, a bias PEFT cannot load beside ``target_parameters``):
            they are then listed (``report.lost()``); without it such a run raises before anything is written.

    Returns:
        ``(adapter, report)``; save the adapter with :meth:`Adapter.save` (or use :func:`extract_to_dir`).

    Raises:
        ShapeMismatchError: the checkpoints differ in architecture, weight names or shapes (all listed); buffers
            on one side only or that differ are ignored and listed in the report (:mod:`.pair`).
        InputError: a delta holds NaN/inf (tensors named); the checkpoints are identical (without
            ``allow_empty``); nothing LoRA-able changed; a checkpoint cannot be read; ``embeddings="lora"`` on a
            resized vocabulary; a changed tensor would be left out, not by the user's choice, without
            ``allow_dropped`` (tensors and shares named).
        UnsupportedError: ``lora_bias=True`` for an adapter PEFT can only load through ``target_parameters``.
        ConfigError: an invalid option value; a ``max_memory`` that is not a size, or below the smallest
            workable budget for these checkpoints (the message says what that is).
    """
    policy = _check_options(r, alpha, rank_policy, svd, dtype, embeddings)
    for_names = with_serving(consumers, serving)
    work_device = _device(device)
    budget = MemoryBudget.resolve(max_memory, work_device)
    report = ExtractReport(
        base=_source_name(base), tuned=_source_name(tuned), r=r, alpha=float(alpha if alpha is not None else r),
        rank_policy=str(policy) if policy else f"fixed:{r}", svd=svd, device=str(work_device), dtype=dtype,
        lora_bias=False, serving="vllm" in for_names, consumers=list(for_names), max_memory=budget.total,
        memory_budget=budget.description, memory_in_use=budget.in_use,
    )
    with contextlib.ExitStack() as opened:
        base_ckpt, tuned_ckpt = _open(base, opened), _open(tuned, opened)
        report.buffers = check_pair(base_ckpt, tuned_ckpt, _embedding_weights(base_ckpt))
        adapter = _run(
            base_ckpt, tuned_ckpt, report, work_device, policy=policy, seed=seed, lora_bias=lora_bias,
            allow_empty=allow_empty, allow_dropped=allow_dropped, progress=progress, out_dtype=DTYPES.get(dtype),
            budget=budget,
            plan=dict(target_modules=target_modules, exclude_modules=exclude_modules, embeddings=embeddings,
                      consumers=for_names),
        )
    return adapter, report


def _run(base: Checkpoint, tuned: Checkpoint, report: ExtractReport, device: torch.device, *, policy, seed: int,
         lora_bias: Optional[bool], allow_empty: bool, allow_dropped: bool, progress: Optional[Progress], out_dtype,
         plan: dict, budget: MemoryBudget) -> Adapter:
    """The two passes over the tensors, then the adapter; fills ``report``."""
    r = report.r
    no_bias = blocker([CONSUMERS[c] for c in report.consumers], "lora_bias")
    scale = lora_scale(r, report.alpha)
    skip = buffer_names(base, tuned)  # not weights: listed by check_pair, never compared or carried
    names = [n for n in base.names() if n not in skip]
    modules = base.module_infos()
    aliases = base.tied_weights()
    description = base.describe()
    model_type = (base.config or {}).get("model_type")
    embed = _input_embedding(base, modules, aliases)
    stored = [p.stored for p in description.parameters.values() if p.stored]
    plan = dict(plan, input_embedding=embed, output_layers=base.output_layer_names(), aliases=aliases,
                stored_experts=stored, unplaced=description.unplaced)
    run = Collected(scale=scale, out_dtype=out_dtype, aliases=aliases, input_embedding=embed)
    total = sum(_numel(base.shape(n)) for n in names if n not in aliases)
    done = 0

    # Pass 1: bias deltas of LoRA targets (small), which decide lora_bias before any embedding is fitted.
    with_bias = plan_roles(names, modules, lora_bias=True, **plan)
    targets = [role.name if role.kind == "experts" else role.module for role in with_bias.values()
               if role.role == "lora"]
    compared = [n for n, role in with_bias.items() if role.role == "bias"]
    for name in compared:
        compare(base, tuned, with_bias[name], run, device)
        done += _numel(base.shape(name))
    use_bias = bool(run.bias_deltas) if lora_bias is None else bool(lora_bias)
    if no_bias and lora_bias:
        run.notes.append(f"--lora-bias ignored: {no_bias.title} {no_bias.rules['lora_bias'].says}")
    use_bias = use_bias and not no_bias
    wrapped = parameter_targets(description, targets, model_type=model_type) if use_bias else []
    if wrapped and lora_bias:
        raise UnsupportedError(
            f"--lora-bias: PEFT loads this adapter through target_parameters ({_short(wrapped, 3)}; per-expert LoRA "
            "is converted to them), and its ParamWrapper refuses lora_bias. Leave --lora-bias out (the bias deltas "
            "are then listed), or exclude the experts with --exclude-modules")
    bias_blocked = (f"PEFT cannot load lora_bias in this adapter: it needs target_parameters "
                    f"({_short(wrapped, 3)}), whose ParamWrapper refuses lora_bias") if wrapped else None
    use_bias = use_bias and not wrapped
    roles = with_bias if use_bias else plan_roles(names, modules, lora_bias=False, bias_blocked=bias_blocked, **plan)

    # Pass 2: everything else, in shard order, one tensor pair at a time, each LoRA target held or streamed; the
    # experts of one projection and layer together, when the first of them comes.
    whole = report.svd == "exact" or (policy is not None and policy.needs_full_spectrum)
    groups = expert_groups(roles, description)
    member_of = {member: group for group in groups.values() for member in group.members}
    places = placements(base, tuned, roles, modules, budget, r=r, svd=report.svd, policy=policy, out_dtype=out_dtype,
                        groups={g.name: (g.members, g.count, group_needs(g, base, tuned, r=r, whole=whole))
                                for g in groups.values()})
    tokens_blocked = [CONSUMERS[c] for c in report.consumers if not CONSUMERS[c].carries("trainable_tokens")]
    resized = {n for n in names if n in tuned and tuple(tuned.shape(n)) != tuple(base.shape(n))}
    work = Workspace(device)
    fits, fitted_groups = [], set()
    try:
        for name, role in roles.items():
            group = member_of.get(name)
            if role.role == "alias" or name in compared or (group is not None and group.name in fitted_groups):
                continue
            if group is not None:
                work.release_matrix()  # the batch's budget does not include a held matrix
                fitted = fit_group(base, tuned, group, roles, run, device, r=r, policy=policy, svd=report.svd,
                                   seed=seed, chunk=places[group.name].block_rows)
                fits += [fitted] if fitted is not None else []
                fitted_groups.add(group.name)  # its other members are done too
                done += sum(_numel(base.shape(m)) for m in group.members)
            else:
                if role.role == "rows" or name in resized:
                    role = extract_rows(base, tuned, role, run, device, mode=plan["embeddings"], r=r,
                                        lora_bias=use_bias, has_bias=modules[role.module].has_bias,
                                        blocked=tokens_blocked)
                if role is not None:
                    process_tensor(base, tuned, role, modules, run, device, r=r, policy=policy, svd=report.svd,
                                   seed=seed, work=work, placement=places.get(name))
                done += _numel(base.shape(name))
            if progress is not None:
                progress(done, total, name)
    finally:
        work.release()
    run.raise_non_finite()
    lora = {n for n, role in roles.items() if run.row_roles.get(n, role).role == "lora"}  # rows resolved
    _report_placements(report, base, {n: p for n, p in places.items() if n in lora or n in groups}, groups)
    finish_experts(run, fits, roles, policy=policy,
                   one_rank=expert_form(description, model_type, stored) == "per-expert"
                   or any(c != "peft" for c in report.consumers))

    report.lora_bias = use_bias
    report.tensors_compared = len([n for n in names if n not in aliases])
    return build_adapter(
        run, report, base, tuned, modules, roles, use_bias=use_bias, r=r, allow_empty=allow_empty,
        base_name=report.base, allow_dropped=allow_dropped,
    )


# ------------------------------------------------------------------------------------------------ helpers


def _report_placements(report: ExtractReport, base: Checkpoint, places, groups) -> None:
    """The streamed LoRA targets into the report, a note on those held above the budget (they cannot be
    streamed: .bin files), and one on expert groups fitted in batches of fewer experts than they have."""
    over = []
    for name, place in places.items():
        if name in groups:
            if not place.hold:
                report.notes.append(f"{name}: {groups[name].count} experts fitted in batches of {place.block_rows} "
                                    f"(holding all needs {format_size(place.hold_bytes)}, above the memory budget)")
        elif not place.hold:
            report.streamed.append(StreamedTensor(name, list(base.shape(name)), place.hold_bytes, place.block_rows,
                                                  place.reason))
        elif place.over_budget:
            over.append(place)
    if over:
        largest = max(over, key=lambda place: place.hold_bytes)
        report.notes.append(f"{len(over)} LoRA target(s) held in memory above the memory budget; the largest, "
                            f"{largest.name}: {largest.reason}")


def _check_options(r: int, alpha, rank_policy, svd: str, dtype: str, embeddings: str):
    problems = []
    if not isinstance(r, int) or r < 1:
        problems.append(f"r must be a positive integer, got {r!r}")
    if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
        problems.append(f"alpha must be a positive number, got {alpha!r}")
    if svd not in SVD_METHODS:
        problems.append(f"svd must be one of {', '.join(SVD_METHODS)}, got {svd!r}")
    if dtype_problem(dtype):
        problems.append(dtype_problem(dtype))
    if embeddings not in EMBEDDING_MODES:
        problems.append(f"embeddings must be one of {', '.join(EMBEDDING_MODES)}, got {embeddings!r}")
    if problems:
        raise ConfigError("; ".join(problems))
    return parse_rank_policy(rank_policy) if rank_policy else None










def _embedding_weights(ckpt: Checkpoint) -> set[str]:
    """The weights of the input embedding and the output layers (the tensors a resized vocabulary grows)."""
    modules = ckpt.module_infos()
    layers = {_input_embedding(ckpt, modules, ckpt.tied_weights()), *ckpt.output_layer_names()}
    return {f"{m}.weight" for m in layers if m}


def _input_embedding(ckpt: Checkpoint, modules, aliases) -> Optional[str]:
    """The input (token) embedding module: the model's own (its ``get_input_embeddings()``, when the architecture
    is known), else the canonical side of a tied output layer, else the first embedding whose row count is the
    config's ``vocab_size``, else the first embedding."""
    known = ckpt.describe().input_embedding
    if known is not None and modules.get(known) is not None and modules[known].kind == "embedding":
        return known
    for canonical in aliases.values():
        module = split_tensor_name(canonical)[0]
        if modules.get(module) is not None and modules[module].kind == "embedding":
            return module
    vocab = (ckpt.config or {}).get("vocab_size")
    embeddings = [m for m, info in modules.items() if info.kind == "embedding"]
    for m in embeddings:
        if vocab is not None and (modules[m].weight_shape or (None,))[0] == vocab:
            return m
    return embeddings[0] if embeddings else None
