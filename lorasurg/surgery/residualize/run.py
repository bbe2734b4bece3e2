"""``lorasurg residualize``: a PiSSA/OLoRA starting point, offline: the residual base and the initial adapter.

For each target weight ``W`` (matrix view ``(out, in)``, see :mod:`lorasurg.engine.factors`) and scale
``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), :func:`lorasurg.engine.init.init_factors` gives PEFT's
initial factors and residual:

* PiSSA (Meng et al. 2024): ``W = U S Vh``; ``A0 = sqrt(S_r / s) Vh_r``, ``B0 = U_r sqrt(S_r / s)`` (exact SVD, or
  ``torch.svd_lowrank(W, q=r, niter=N)`` for ``pissa_niter_N``);
* OLoRA (Büyükakyüz 2024): ``W = Q R``; ``B0 = Q[:, :r]``, ``A0 = R[:r]``;
* residual ``W_res = W - s * B0 @ A0``, stored in the weight's dtype,

so ``W_res + s * B0 @ A0 == W`` up to the storage dtype's rounding: ``OUT/model`` (BASE with every target weight
replaced by its residual) plus ``OUT/adapter`` (the factors) computes what BASE computes, and training the adapter
starts from the weight's principal part. Embeddings keep their weight and get PEFT's default embedding init (PEFT
does the same); conv layers use the flattened kernel (PEFT refuses them); both are said in the report.

Mixtures of experts and multimodal models (:mod:`.targets`): every expert matrix of a selected projection is factored
on its own, under its checkpoint key where the checkpoint stores experts one by one, and expert by expert in the 3-D
tensor where it stores them fused (gpt-oss, ``(E, in, out)``: expert ``e`` is ``W[e].T``); ``OUT/model`` keeps
BASE's layout and keys. The initial adapter is laid out as PEFT loads it on transformers 5
(:func:`lorasurg.surgery.adapter_layout.peft_layout`: the model's names for renamed towers, experts per expert or as
``target_parameters``; per expert whenever a consumer other than PEFT is named and the checkpoint stores them so;
experts stored fused stay ``target_parameters``, which vLLM reads for its 3-D MoE classes and llama.cpp refuses).
PEFT 0.21.2 itself cannot initialise PiSSA/OLoRA on fused experts (its ``ParamWrapper`` reads the ``weight`` of an
experts module, which has none), so there the invariant ``OUT/model + OUT/adapter == BASE`` is the check.

The adapter's config says ``init_lora_weights: true``: PEFT re-runs the init named in a config when it loads it, so
``"pissa"`` there would decompose the residual a second time. Where it came from (method, r, alpha, BASE,
lorasurg's version) is in ``OUT/README.md`` and in the adapter file's safetensors metadata.

``consumers`` (``--for``) applies to the initial adapter only, and only losslessly: ``OUT/model`` has the adapter's
delta already taken out of its weights, so leaving any part of the adapter out for a consumer would break
``OUT/model + OUT/adapter == BASE``. A consumer that cannot carry the whole initial adapter (vLLM: embedding or
``lm_head`` LoRA, conv LoRA; llama.cpp: GPT-2 ``Conv1D`` LoRA, conv LoRA, fused-expert LoRA) is refused before any
work, naming the modules, so the user can leave them out of the targets. Otherwise
:func:`lorasurg.consumers.prepare_for` only rewrites how the scale is written: for ``llama.cpp`` no
``alpha_pattern``/rsLoRA, the factors of a module whose written scale differs multiplied by ``sqrt(c)`` each (exact
to float32 rounding); for ``all`` every module zero-padded to one rank (exact; the padded rows and columns get zero
gradients in training and stay zero). Each module's ``scale * B0 @ A0``, and so ``OUT/model``, is the same for every
``--for``.

Streaming: :func:`lorasurg.io.rewrite.rewrite_checkpoint` reads BASE one tensor at a time in shard order; only a
target weight is converted (to float32 for the factorisation); every other tensor is copied through as stored.
Memory: ``max_memory`` (:class:`~lorasurg.surgery.budget.MemoryBudget`, default half the available memory) bounds
the tensors held at once, besides the adapter being built: a target is factored whole, and one whose working set does
not fit is refused before anything is written; other tensors larger than the budget are copied in row blocks
(:mod:`.memory`).

Randomness (``pissa_niter_N`` and embedding inits) comes from one CPU generator seeded with ``seed`` and is drawn as
PEFT draws it, module by module in the model's ``named_modules()`` order (not the file's order): after
``torch.manual_seed(seed)`` PEFT's ``get_peft_model`` on the same model makes the same draws.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ...consumers import ForReport, blocked_parts, prepare_for
from ...io.gguf import tensor_type
from ..export.output import WithGguf, output_consumers, write_output
from ..export.run import check_gguf_base
from ...consumers.reading import Consumers
from ...engine.factors import compute_dtype, delta_frobenius_sq, factor_shapes
from ...engine.init import InitMethod, init_factors, make_init_draws, parse_init_method
from ...errors import ConfigError, InputError, LorasurgError, option
from ...io.adapter import Adapter, AdapterModule
from ...io.checkpoint import Checkpoint
from ...io.meta_facts import module_order
from ...io.rewrite import TensorSource, rewrite_checkpoint
from ...io.values import all_finite, describe_nonfinite
from ...io.writer import atomic_output_dir, check_output_dir
from ..adapter_layout import ExpertStack, form_for_consumers
from ..options import Progress, Source, default_output, dtype_problem, open_checkpoint, output_dtype, parse_device
from ..options import short_list, source_name
from ..budget import MemoryBudget, Size
from ..provenance import lorasurg_version, provenance_lines, provenance_metadata
from ..rewrite_memory import MemoryUse, place_rewrite
from .memory import adapter_bytes, residualize_works
from .report import ResidualizeReport, ResidualModule
from .targets import Target, initial_adapter, plan_targets

__all__ = ["residualize", "INIT_CHOICES", "ResidualizeReport"]

INIT_CHOICES = "pissa, pissa_niter_N (N >= 0) or olora"
#: Exact PiSSA's SVD: the Gram eigendecomposition (engine.svd.gram_svd), several times faster than LAPACK's SVD on
#: the CPU and at least as accurate for the residual's dtype (float64 Gram for float32 residuals).
EXACT_SVD = "gram"


def residualize(
    base: Source,
    output: Union[str, os.PathLike, None] = None,
    *,
    init: str = "pissa",
    r: int = 16,
    alpha: Optional[float] = None,
    use_rslora: bool = False,
    target_modules: Union[str, Sequence[str], None] = None,
    exclude_modules: Union[str, Sequence[str], None] = None,
    dtype: str = "auto",
    device: str = "auto",
    seed: int = 0,
    force: bool = False,
    progress: Optional[Progress] = None,
    consumers: Consumers = "peft",
    max_memory: Optional[Size] = None,
    to: str = "peft",
    outtype: str = "f32",
) -> ResidualizeReport:
    """Write ``output/model`` (BASE with residual target weights) and ``output/adapter`` (the initial adapter).

    Args:
        base: a checkpoint (anything :meth:`Checkpoint.open` reads, or an open checkpoint); a ``.bin`` BASE is read
            with ``torch.load(weights_only=True)`` and written as safetensors.
        output: the directory to write (``model/``, ``adapter/``, ``README.md``); default
            ``./<BASE name>-<init>-r<r>``. Checked before any work; replaced only with ``force``.
        init: ``pissa``, ``pissa_niter_N`` or ``olora``.
        r: the rank; clamped per module to ``min(out, in)`` (the module keeps the scale), and said so.
        alpha: ``lora_alpha``; default ``r``.
        use_rslora: scale ``alpha / sqrt(r)`` instead of ``alpha / r``.
        target_modules / exclude_modules: PEFT's selection (names or ``.``-suffixes, or one regex); default every
            linear layer except the output head (``all-linear``).
        dtype: dtype of the written model's floating tensors but buffers (copied as stored); ``auto`` keeps each
            tensor's. The adapter is float32 (float64 for a float64 BASE), as PEFT's ``get_peft_model`` keeps adapter
            weights.
        device: where the factorisations run (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
        seed: seeds ``pissa_niter_N``'s random sketches and embedding inits.
        force: replace an existing non-empty ``output``.
        progress: called as ``progress(done, total, tensor name)`` in elements.
        consumers: who will load the initial adapter (``--for``): ``peft`` (default), ``vllm``, ``llama.cpp``, ``all``
            or several; the adapter is rewritten losslessly for them, or refused (see the module docstring).
        max_memory: the memory budget for the tensors processed at once, besides the adapter being built (bytes, or
            text such as ``"2GB"``, ``"500MB"``, ``"50%"``); None: half the available memory.
        to: ``peft`` (``output/adapter``) or ``gguf``: the initial adapter as ``output/adapter.gguf``, a llama.cpp
            GGUF LoRA file for the residual model (converted to GGUF in turn), written losslessly as for ``--for
            llama.cpp``; the report gains the export's.
        outtype: the GGUF tensor type (``f32``, ``f16``, ``bf16``, ``q8_0``).

    Returns:
        :class:`ResidualizeReport`.

    Raises:
        OutputExistsError: ``output`` exists and is not empty, without ``force``.
        ConfigError: an invalid option; a target selection that matches nothing; a named consumer that cannot
            carry the whole initial adapter; a ``max_memory`` that is not a size, or too small to hold a target whole
            or one row of another tensor (the message names the tensor, its working set and the smallest workable
            budget). All checked before any work; nothing is written then.
        InputError: a target is an output layer tied to the input embedding; BASE cannot be read; a target weight
            holds NaN or inf (named; nothing is written).
    """
    method = _check_options(init, r, alpha, dtype)
    names = output_consumers(consumers, to)
    tensor_type(outtype, (1, 1))
    work_device = parse_device(device)
    budget = MemoryBudget.resolve(max_memory, work_device)
    alpha = float(alpha if alpha is not None else r)
    if output is None:
        output = default_output(base, f"-{method.config_value}-r{r}")
    check_output_dir(output, force)
    report = ResidualizeReport(base=source_name(base), init=str(method.config_value), r=r, alpha=alpha,
                               use_rslora=use_rslora, device=str(work_device), dtype=dtype, output=str(output),
                               consumers=list(names))
    with contextlib.ExitStack() as opened:
        ckpt = open_checkpoint(base, opened)
        if to == "gguf":
            check_gguf_base(ckpt)
        targets = plan_targets(ckpt, r, alpha, use_rslora, target_modules, exclude_modules, report)
        form = form_for_consumers(ckpt.describe(), names)
        _check_consumers(ckpt, targets, use_rslora, names, form)
        works, reserved = residualize_works(ckpt, targets, method, output_dtype(dtype)), adapter_bytes(targets, ckpt)
        places = place_rewrite(budget, ckpt, works, reserved=reserved, reserved_for="the adapter being built")
        report.memory = MemoryUse.of(budget, reserved, "the adapter being built", places, works, ckpt)
        generator = torch.Generator().manual_seed(seed)
        if _uses_rng(method, targets):
            reading = TensorSource(ckpt, output_dtype(dtype))  # the dtype each target weight is read in
            states = _draw_states(ckpt, method, targets, generator,
                                  {m: reading.output_dtype(t.key) for m, t in targets.items()})
        else:
            states = {}
        factors: dict[str, AdapterModule] = {}
        stacks: dict[str, ExpertStack] = {}
        by_key = {t.key: t for t in targets.values()}

        def edit(name: str, source: TensorSource):
            target = by_key.get(name)
            if target is None:
                return None
            if target.module in states:
                generator.set_state(states[target.module])
            weight = source.read(name, work_device)
            if target.info.kind != "embedding" and not all_finite(weight):  # factored; an embedding keeps its weight
                raise InputError(
                    f"{name} holds {describe_nonfinite(weight)}: {method.config_value} factors each target weight and "
                    "needs finite values, and nothing was written. Fix the checkpoint, or leave the module out with "
                    f"{option('--exclude-modules ' + target.module, f'exclude_modules=[{target.module!r}]')}"
                )
            residual = _residualize_one(target, method, weight, generator, factors, stacks, report)
            return None if residual is None else [(name, residual)]

        with atomic_output_dir(output, force) as tmp:
            written = rewrite_checkpoint(ckpt, tmp / "model", edit, dtype=output_dtype(dtype), progress=progress,
                                         copy_blocks={n: p.block_rows for n, p in places.items() if not p.hold})
            adapter = initial_adapter(ckpt, targets, factors, stacks, use_rslora, Path(output) / "model", report.notes,
                                      form)
            adapter, report.for_report = _for_consumers(adapter, names, (ckpt.config or {}).get("model_type"))
            meta = dict(method=method.config_value, r=r, alpha=f"{alpha:g}", use_rslora=use_rslora or None,
                        base=report.base, seed=seed if _uses_rng(method, targets) else None)
            gguf = write_output(adapter, tmp / ("adapter" if to == "peft" else "adapter.gguf"), to=to, base=ckpt,
                                outtype=outtype, metadata=provenance_metadata(**meta))
            (tmp / "README.md").write_text(_readme(meta, report), encoding="utf-8")
    report.model = written
    report.adapter_parameters = adapter.num_parameters()
    report.adapter_bytes = adapter.num_bytes()
    if gguf is not None:
        gguf.output = str(Path(output) / "adapter.gguf")
        return WithGguf(report, gguf)
    return report


# ------------------------------------------------------------------------------------------------ steps


def _check_options(init: str, r: int, alpha: Optional[float], dtype: str) -> InitMethod:
    problems = []
    method = None
    try:
        method = parse_init_method(init)
        if not method.modifies_base:
            problems.append(f"init must be {INIT_CHOICES} (methods that leave a residual base), got {init!r}")
    except LorasurgError as err:
        problems.append(f"init must be {INIT_CHOICES}, got {init!r} ({err})")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"r must be a positive integer, got {r!r}")
    if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
        problems.append(f"alpha must be a positive number, got {alpha!r}")
    if dtype_problem(dtype):
        problems.append(dtype_problem(dtype))
    if problems:
        raise ConfigError("; ".join(problems))
    return method


def _check_consumers(ckpt: Checkpoint, targets: dict[str, Target], use_rslora: bool, names: tuple[str, ...],
                     form: Optional[str]) -> None:
    """Refuse, before any work, consumers that cannot carry the whole initial adapter (see the module docstring).

    The adapter is built with placeholder factors on the meta device, its experts in ``form`` (per expert for a
    consumer other than PEFT, where the checkpoint stores them one by one; experts stored fused, as gpt-oss's, as
    ``target_parameters`` stacks): which parts a consumer cannot carry depends on the modules' names, kinds and
    layouts and on the model type (vLLM reads fused-expert LoRA only for its 3-D MoE classes) only.
    """
    if names == ("peft",):
        return
    probe, stacks = {}, {}
    for m, t in targets.items():
        if t.parameter is not None:  # one expert's (out, in), E times
            out_f, in_f = t.info.weight_shape
            E = t.parameter.experts
            stacks[m] = ExpertStack(torch.empty(E, t.rank, in_f, device="meta"),
                                    torch.empty(E, out_f, t.rank, device="meta"), t.rank, t.alpha)
            continue
        a_shape, b_shape, _ = factor_shapes(t.info.kind, t.info.weight_shape, t.rank, t.info.fan_in_fan_out)
        probe[m] = AdapterModule(m, torch.empty(a_shape, device="meta"), torch.empty(b_shape, device="meta"),
                                 embedding=t.info.kind == "embedding")
    blocked = blocked_parts(initial_adapter(ckpt, targets, probe, stacks, use_rslora, Path("model"), form=form),
                            names, tied=(), model_type=(ckpt.config or {}).get("model_type"))
    if not blocked:
        return
    lines, modules = [], []
    for feature, (items, blockers) in blocked.items():
        modules.extend(_target_names(items, targets))
        says = "; ".join(f"{c.title} {c.rules[feature].says}" for c in blockers)
        lines.append(f"{short_list(items)}: {says}")
    raise ConfigError(
        f"--for {','.join(names)}: the initial adapter cannot be written whole for these consumers, and residualize "
        "leaves nothing out (OUT/model has the adapter's part taken out of its weights, so a part left out of "
        "OUT/adapter would no longer add back to BASE):\n  - " + "\n  - ".join(lines)
        + f"\nLeave those modules out of the targets (--exclude-modules {','.join(sorted(set(modules)))}), or write "
        "the adapter for consumers that carry them. Nothing was written."
    )


def _target_names(items: list[str], targets: dict[str, Target]) -> list[str]:
    """The target names ``--exclude-modules`` takes for the adapter paths ``items``: a fused experts module's path
    (``mlp.experts``, ``mlp.experts.base_layer``: PEFT nests one wrapper per parameter) stands for its targeted
    parameters (``mlp.experts.gate_up_proj``); any other path is its own name."""
    names = []
    for item in items:
        path = item.replace(".base_layer", "")
        names.extend([m for m in targets if m.startswith(path + ".") and targets[m].parameter is not None] or [path])
    return names


def _for_consumers(adapter: Adapter, names: tuple[str, ...], model_type: Optional[str]) -> tuple[Adapter, ForReport]:
    """:func:`prepare_for` of the initial adapter: a lossless rewrite of how its scales are written, never a part left
    out (:func:`_check_consumers` refused that before any work)."""
    written, for_report = prepare_for(adapter, names, tied=(), model_type=model_type)
    if for_report.left_out or set(written.modules) != set(adapter.modules):  # a bug, not the user's input
        raise AssertionError("residualize would leave part of the initial adapter out for "
                             + ", ".join(names) + ": " + ", ".join(x.name for x in for_report.left_out))
    return written, for_report


def _draw_states(ckpt: Checkpoint, method: InitMethod, targets: dict[str, Target], generator: torch.Generator,
                 weight_dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The generator's state at the start of each target, were the targets initialised in PEFT's order.

    PEFT initialises modules in ``named_modules()`` order (:func:`lorasurg.io.meta_facts.module_order`); BASE is
    streamed in file order. :func:`~lorasurg.engine.init.make_init_draws` makes exactly each init's random draws
    and no arithmetic (for a weight in the dtype it will be read in), so the states come at almost no cost; each
    target then restarts from its own state. Experts (which PEFT cannot initialise this way) take the place of the
    module holding them, in expert order.
    """
    shapes = {n: ckpt.shape(n) for n in ckpt.names()}
    position = {m: i for i, m in enumerate(module_order(ckpt.config, shapes, dict.fromkeys(t.order for t in
                                                                                         targets.values())))}
    states = {}
    for name in sorted(targets, key=lambda n: position[targets[n].order]):
        t = targets[name]
        states[name] = generator.get_state()
        for _ in range(t.parameter.experts if t.parameter is not None else 1):
            make_init_draws(method, t.info.kind, tuple(t.info.weight_shape), t.rank, weight_dtype=weight_dtypes[name],
                            fan_in_fan_out=t.info.fan_in_fan_out, generator=generator)
    return states


def _residualize_one(target: Target, method: InitMethod, weight: torch.Tensor, generator: torch.Generator,
                     factors: dict[str, AdapterModule], stacks: dict[str, ExpertStack],
                     report: ResidualizeReport) -> Optional[torch.Tensor]:
    """Factor one target weight, or each expert of a stored 3-D expert tensor (``(E, in, out)`` when transposed:
    expert ``e``'s matrix is ``weight[e].T``); record its adapter tensors (``factors``, ``stacks``) and report row;
    return the residual in ``weight``'s layout (None: unchanged)."""
    info, parameter = target.info, target.parameter
    adapter_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    flip = parameter is not None and parameter.transposed
    matrices = [weight] if parameter is None else [w.T if flip else w for w in weight]  # each (out, in)
    results = [init_factors(method, info.kind, tuple(m.shape), target.rank, target.scale, weight=m,
                            fan_in_fan_out=info.fan_in_fan_out, generator=generator, dtype=adapter_dtype,
                            exact_svd=EXACT_SVD) for m in matrices]
    if parameter is None:
        f, residual = results[0].factors, results[0].residual_weight
        factors[target.module] = AdapterModule(target.module, f.A.cpu(), f.B.cpu(), embedding=info.kind == "embedding")
    else:
        A = torch.stack([res.factors.A for res in results]).cpu()  # (E, r, in)
        B = torch.stack([res.factors.B for res in results]).cpu()  # (E, out, r)
        stacks[target.module] = ExpertStack(A, B, target.rank, target.alpha)
        residual = torch.stack([res.residual_weight.T if flip else res.residual_weight for res in results])  # like weight
    if results[0].note:
        report.notes.append(f"{target.module}: {results[0].note}")
    work = compute_dtype(weight)  # norms reduced in float32 (float64 stays), without a converted copy
    total = float(torch.linalg.vector_norm(weight, dtype=work)) ** 2
    res_norm = float(torch.linalg.vector_norm(residual if residual is not None else weight, dtype=work))
    report.modules.append(ResidualModule(
        target.module, "experts" if parameter is not None else info.kind, list(weight.shape), target.rank,
        target.clamped, energy_taken=sum(delta_frobenius_sq(res.factors) for res in results) / total if total > 0
        else 0.0, residual_norm=res_norm, relative_residual=res_norm / math.sqrt(total) if total > 0 else 0.0,
    ))
    return None if residual is None else residual.cpu()


def _uses_rng(method: InitMethod, targets: dict[str, Target]) -> bool:
    return method.niter is not None or any(t.info.kind == "embedding" for t in targets.values())


def _readme(meta: dict, report: ResidualizeReport) -> str:
    lines = [
        "# PiSSA/OLoRA starting point written by lorasurg residualize",
        "",
        "- `model/`: the base model with each target weight replaced by its residual `W - scale * B0 @ A0`.",
        "- `adapter/`: the initial PEFT adapter (`B0`, `A0`); `model/` + `adapter/` compute what the base computes.",
        "",
        "Train `adapter/` on `model/`. Its config says `init_lora_weights: true` on purpose: PEFT re-runs the init",
        "a config names when it loads an adapter, and would decompose the residual a second time.",
        "To use the trained adapter on the original base, convert it:",
        "",
        "    lorasurg convert TRAINED_ADAPTER --initial adapter -o plain-lora",
        "",
        "Provenance (also in the safetensors metadata of `adapter/adapter_model.safetensors`, keys `lorasurg.*`):",
        "",
        *provenance_lines({**meta, "version": lorasurg_version(), "modules": len(report.modules)}),
        "",
    ]
    return "\n".join(lines)
