"""Assemble the extracted adapter and its report from what the streaming pass collected.

:class:`Collected` is the state of one ``extract`` run (factors fitted so far, changed tensors, copies for
``modules_to_save``, bias deltas); :func:`build_adapter` turns it into an :class:`~lorasurg.io.adapter.Adapter`
whose config selects exactly the modules with factors, and fills the report. See
:mod:`lorasurg.surgery.extract` for the conventions (scale, lora_bias, tied embeddings).

The factors are fitted under the checkpoint's names, one module each, experts included; the adapter is laid out
by :func:`lorasurg.surgery.adapter_layout.peft_layout`, the one writer of what PEFT loads on the model transformers
builds: the model's module names (multimodal towers renamed), experts per expert or as ``target_parameters`` on
their fused parameters (every expert present, at one rank), ``target_modules`` selecting exactly the adapted
modules among every module of the model.

Nothing is left out silently: a changed tensor dropped for a reason other than the user's choice (a *lost* one,
:mod:`.plan`) makes :func:`build_adapter` refuse, naming each with its share of the delta, unless ``allow_dropped``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from torch import Tensor

from ...config import LoraConfig
from ...consumers.prepare import prepare_for
from ...consumers.rules import CONSUMERS, Consumer
from ...errors import InputError, option
from ...io.adapter import TOKENS_PART, Adapter, AdapterModule
from ...io.architecture import ModelDescription
from ...io.checkpoint import Checkpoint
from ...modules import ModuleInfo
from ..adapter_layout import ExpertStack, form_for_consumers, model_tensor_name, peft_layout
from ..options import short_list, task_type_of
from .fit import Fit
from .plan import TensorRole, split_tensor_name
from .report import ExtractReport, TensorOutcome

__all__ = ["Collected", "build_adapter"]


@dataclass
class Collected:
    """What the streaming pass found, tensor by tensor."""

    scale: float
    out_dtype: Optional[torch.dtype]
    aliases: Mapping[str, str]
    input_embedding: Optional[str]
    unchanged: int = 0
    non_finite: list[str] = field(default_factory=list)
    changed: dict[str, tuple[list[int], float]] = field(default_factory=dict)  # name -> (shape, energy)
    tuned_dtype: dict[str, torch.dtype] = field(default_factory=dict)
    bias_deltas: dict[str, Tensor] = field(default_factory=dict)
    saved: dict[str, Tensor] = field(default_factory=dict)
    factors: dict[str, AdapterModule] = field(default_factory=dict)
    stacks: dict[str, ExpertStack] = field(default_factory=dict)  # stored 3-D expert key -> factors of its experts
    fits: dict = field(default_factory=dict)
    zero_rank: dict[str, Fit] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tokens: dict[str, tuple[list[int], Tensor]] = field(default_factory=dict)  # module -> (indices, tuned rows)
    embedding_choices: list = field(default_factory=list)  # tokens.EmbeddingChoice per embedding-layer weight
    resized: dict[str, tuple[int, int]] = field(default_factory=dict)  # tensor -> (BASE rows, TUNED rows)
    row_roles: dict[str, TensorRole] = field(default_factory=dict)  # what a ``rows`` role became

    def record_change(self, role: TensorRole, shape, energy: float, *, delta: Optional[Tensor] = None,
                      tuned: Optional[Tensor] = None) -> None:
        """Remember a changed tensor; keep a bias delta, or the tuned tensor for a module saved whole."""
        self.changed[role.name] = (list(shape), energy)
        if role.role == "bias" and delta is not None:
            self.bias_deltas[role.name] = delta.to("cpu")
        elif role.role == "save" and tuned is not None:
            self.saved[role.name] = self._cast(tuned.to("cpu"))

    def rank_zero(self, role: TensorRole, fit: Fit) -> None:
        self.zero_rank[role.module] = fit

    def raise_non_finite(self) -> None:
        if self.non_finite:
            raise InputError(
                f"NaN or inf in the delta (tuned - base) of {len(self.non_finite)} tensor(s): "
                + ", ".join(self.non_finite)
                + ". One of the checkpoints is corrupt or overflowed; check the tuned checkpoint (and its dtype)."
            )

    def _cast(self, tensor: Tensor) -> Tensor:
        if self.out_dtype is not None and tensor.is_floating_point():
            return tensor.to(self.out_dtype)
        return tensor


def build_adapter(
    run: Collected,
    report: ExtractReport,
    base: Checkpoint,
    tuned: Checkpoint,
    modules: Mapping[str, ModuleInfo],
    roles: Mapping[str, TensorRole],
    *,
    use_bias: bool,
    r: int,
    allow_empty: bool,
    base_name: str,
    allow_dropped: bool = False,
) -> Adapter:
    """The adapter for what ``run`` collected; fills ``report`` (outcomes, fits, notes, totals).

    Raises:
        InputError: the checkpoints are identical (without ``allow_empty``), no LoRA-able weight changed, or a
            changed tensor is lost (not carried, not by the user's choice) without ``allow_dropped``.
    """
    roles = {**roles, **run.row_roles}
    if not run.changed:
        if not allow_empty:
            raise InputError(
                f"{report.base} and {report.tuned} are identical ({report.tensors_compared} tensors compared): "
                f"there is nothing to extract and nothing was written. Pass {option('--allow-empty', 'allow_empty=True')}"
                " to write a no-op adapter anyway."
            )
        _zero_factors(run, modules, roles, r)
        report.notes.append("the checkpoints are identical: wrote a no-op adapter (every factor is zero)")
    elif run.tokens and not run.factors and allow_empty:
        _zero_factors(run, modules, roles, r)
        report.notes.append("only trainable-token rows changed: wrote zero LoRA factors beside them (PEFT's LoraConfig "
                            "needs a LoRA target; --allow-empty)")
    save_blocked = [c for c in (CONSUMERS[n] for n in report.consumers) if not c.carries("modules_to_save")]
    save_modules = _outcomes(run, report, roles, use_bias, save_blocked)
    _refuse_lost(report, allow_dropped)
    _complete_saved(run, tuned, save_modules)
    tied = _tie(run, save_modules)
    if use_bias:
        _bias_factors(run, report, modules, roles)
    if not run.factors and not run.stacks and run.tokens:
        raise InputError(
            f"only the rows of {', '.join(run.tokens)} changed between {report.base} and {report.tuned}: PEFT's "
            "LoraConfig needs at least one LoRA target beside trainable_token_indices, and no other LoRA-able weight "
            "changed. Pass --allow-empty to add zero LoRA factors on the other layers (a no-op beside the tokens), "
            "or use --embeddings lora or full."
        )
    if not run.factors and not run.stacks:
        kept = ", ".join(f"{o.name} ({o.outcome})" for o in report.outcomes[:10])
        raise InputError(
            f"no LoRA-able weight changed between {report.base} and {report.tuned} (or every one was excluded or "
            f"got rank 0), so there is no adapter to write. Changed tensors: {kept}. Check --target-modules, "
            "--exclude-modules, --embeddings and --rank-policy." + _for_hint(report)
        )
    description = base.describe()
    layout = peft_layout(
        description, run.factors, {m: (f.rank, run.scale * f.rank) for m, f in run.factors.items()},
        model_type=(base.config or {}).get("model_type"), extra=run.saved, modules_to_save=save_modules,
        stacks={_stored_parameter(description, key): stack for key, stack in run.stacks.items()},
        refused=["lora_bias"] if use_bias else [], form=form_for_consumers(description, report.consumers),
    )
    tokens = {description.model_name(m): (i, rows) for m, (i, rows) in run.tokens.items()}  # the model's names
    config = LoraConfig(
        **layout.fields,
        lora_bias=use_bias,
        trainable_token_indices={m: list(i) for m, (i, _) in tokens.items()} or None,
        fan_in_fan_out=any(modules[m].fan_in_fan_out for m in run.factors if m in modules),
        init_lora_weights=True,
        task_type=task_type_of(base.config),
        base_model_name_or_path=base_name,
    )
    extra = {**layout.extra, **{f"{m}.{TOKENS_PART}": rows for m, (_, rows) in tokens.items()}}
    adapter = Adapter(config, layout.modules, extra)
    _token_notes(run, report)
    problems = adapter.problems()
    if problems:  # a bug in extract, not in the user's input
        raise AssertionError("extract built an inconsistent adapter: " + "; ".join(problems))
    stored = {model_tensor_name(description, k): k for k in run.saved}
    tied_pair = [*tied, run.input_embedding] if tied else []  # a tied head and the embedding it shares a weight with
    adapter, report.for_report = prepare_for(
        adapter, report.consumers, tied=[description.model_name(t) for t in tied_pair], total_energy=report.total_energy,
        delta_energy={k: run.changed[stored[k]][1] if stored.get(k) in run.changed else 0.0 for k in adapter.extra},
        model_type=(base.config or {}).get("model_type"),
    )
    report.fits = [f for m, f in run.fits.items() if m in run.stacks or description.model_name(m) in adapter.modules]
    renamed = [m for m in run.factors if description.model_name(m) != m]
    if renamed:
        run.notes.append(
            f"the model names {len(renamed)} of the adapted modules otherwise than the checkpoint (transformers' "
            f"conversion rules for this architecture): the adapter uses the model's names, which PEFT loads, e.g. "
            f"{renamed[0]} -> {description.model_name(renamed[0])}")
    run.notes.extend(layout.notes)
    report.notes[:0] = run.notes
    report.adapter_parameters = adapter.num_parameters()
    report.adapter_bytes = adapter.num_bytes()
    return adapter


def _stored_parameter(description: ModelDescription, key: str) -> str:
    """The model's name of the 3-D expert parameter stored under checkpoint key ``key``."""
    return next(p.name for p in description.parameters.values() if p.stored == key)


def _refuse_lost(report: ExtractReport, allow_dropped: bool) -> None:
    """Refuse (exit 2, nothing written) when a changed tensor is lost, unless ``allow_dropped``: then say so."""
    lost = report.lost()
    if not lost:
        return
    share = sum(report.share(o) for o in lost)
    listed = short_list([f"{o.name} ({100 * report.share(o):.3f}%: {o.reason})" for o in lost], limit=8)
    if allow_dropped:
        report.notes.append(f"--allow-dropped: {len(lost)} changed tensor(s) that the adapter cannot carry are left "
                            f"out ({100 * share:.3f}% of the delta energy): {listed}")
        return
    raise InputError(
        f"{len(lost)} changed tensor(s) would be left out of the adapter, not by your choice ({100 * share:.3f}% of "
        f"the delta energy): {listed}. Nothing was written. Pass --allow-dropped (allow_dropped=True) to write the "
        "adapter without them (the report lists them), or leave them out yourself (--exclude-modules, "
        "--no-lora-bias).")


# ------------------------------------------------------------------------------------------------ steps


def _for_hint(report: ExtractReport) -> str:
    """What ``--for`` left out, when it did: the distinct reasons, for the "nothing to write" error."""
    reasons = sorted({o.reason for o in report.outcomes if o.reason.startswith("--for ")})
    if not reasons:
        return ""
    return (f" --for {','.join(report.consumers)} left out what its consumers cannot carry: " + "; ".join(reasons)
            + ". Name fewer consumers (--for peft keeps everything).")


def _zero_factors(run: Collected, modules: Mapping[str, ModuleInfo], roles: Mapping[str, TensorRole], r: int) -> None:
    """A no-op adapter: zero factors of rank ``min(r, out, in)`` on every non-embedding LoRA target."""
    from ...engine.factors import factors_from_matrices

    for role in roles.values():
        info = modules.get(role.module)
        if role.role != "lora" or info is None or info.kind == "embedding" or not info.weight_shape:
            continue
        shape = tuple(info.weight_shape)
        out_f, in_f = (shape[1], shape[0]) if info.fan_in_fan_out else (shape[0], int(torch.Size(shape[1:]).numel()))
        rank = min(r, out_f, in_f)
        dtype = run.out_dtype or torch.float32
        f = factors_from_matrices(torch.zeros(rank, in_f, dtype=dtype), torch.zeros(out_f, rank, dtype=dtype),
                                  info.kind, shape, run.scale, fan_in_fan_out=info.fan_in_fan_out)
        run.factors[role.module] = AdapterModule(role.module, f.A, f.B)


def _outcomes(run: Collected, report: ExtractReport, roles: Mapping[str, TensorRole], use_bias: bool,
              save_blocked: list[Consumer]) -> list[str]:
    """Fill ``report.outcomes`` in shard order; returns the modules_to_save module names."""
    save: dict[str, None] = {}
    for name, (shape, energy) in run.changed.items():
        role = roles[name]
        outcome, reason = "dropped", role.reason
        if role.role == "lora":
            if role.module in run.factors or name in run.stacks:
                outcome, reason = "lora", ""
            else:
                outcome, reason = "rank0", "the rank policy keeps no singular value: left out of target_modules"
        elif role.role == "bias":
            if role.module in run.factors:
                outcome, reason = "lora_bias", ""
            elif not save_blocked:
                outcome, reason = "modules_to_save", "bias changed but the weight has no LoRA factors: module saved whole"
            else:
                reason = (f"--for {', '.join(c.name for c in save_blocked)}: {save_blocked[0].title} "
                          + save_blocked[0].rules["modules_to_save"].says)
        elif role.role == "save":
            outcome = "modules_to_save"
        elif role.role == "tokens":
            outcome = "trainable_tokens"
        if outcome == "modules_to_save":
            save[role.module] = None
        report.outcomes.append(TensorOutcome(name, shape, outcome, reason, energy, lost=role.lost))
    report.tensors_unchanged = run.unchanged
    zero = sorted(run.zero_rank)
    if zero:
        run.notes.append(f"{len(zero)} module(s) got rank 0 from the rank policy and are not targeted: {', '.join(zero)}")
    clamped = sorted(m for m, f in run.fits.items() if f.clamped)
    if clamped:
        run.notes.append(
            f"r={report.r} exceeds min(out, in) of {len(clamped)} module(s); their rank was clamped to it: "
            + ", ".join(f"{m} (r={run.fits[m].rank})" for m in clamped)
        )
    left = [o for o in report.outcomes if o.outcome in ("dropped", "rank0") and not o.lost]
    if left:
        share = sum(report.share(o) for o in left)
        run.notes.append(f"{len(left)} changed tensor(s) are not in the adapter ({100 * share:.3f}% of the delta energy)")
    return list(save)


def _complete_saved(run: Collected, tuned: Checkpoint, save_modules: list[str]) -> None:
    """modules_to_save copies the whole module: read its tensors that did not change, from tuned."""
    wanted = set(save_modules)
    for name in tuned.names():
        module, _ = split_tensor_name(name)
        if module in wanted and name not in run.saved and name not in run.aliases:
            run.saved[name] = run._cast(tuned.get(name))


def _tie(run: Collected, save_modules: list[str]) -> list[str]:
    """Carry a tied output layer with the input embedding whose weight it shares.

    The shared delta was read and fitted once (as the embedding); the output layer gets the same change as its
    own PEFT entry: the embedding's factors transposed (``lm_head`` is linear, weight ``(vocab, dim)``:
    ``A = B_emb.T (r, dim)``, ``B = A_emb.T (vocab, r)``), or a second saved copy with ``--embeddings full``.
    Both modules are listed explicitly (PEFT's ``ensure_weight_tying`` only recognises the names
    ``embed_tokens``/``lm_head``, so it is not relied on). Returns the output module when it got LoRA factors.
    """
    embed = run.input_embedding
    tied = [a for a, c in run.aliases.items() if embed is not None and c == f"{embed}.weight"]
    if not tied:
        return []
    alias = tied[0]
    out_module = split_tensor_name(alias)[0]
    if embed in run.factors:
        emb = run.factors[embed]
        run.factors[out_module] = AdapterModule(out_module, emb.B.T.contiguous(), emb.A.T.contiguous())  # (r, dim), (vocab, r)
        run.fits[out_module] = dataclasses.replace(run.fits[embed], module=out_module, kind="linear (tied)")
        run.notes.append(
            f"{out_module} shares its weight with {embed}: the delta was fitted once and written for both (the "
            f"embedding's factors, transposed, on {out_module}), so the adapted model matches the tuned one. PEFT "
            "warns that a tied layer is adapted, and its merge_and_unload adds the delta to the shared weight twice; "
            "use --embeddings full if you need to merge."
        )
        return [out_module]
    elif embed in save_modules and f"{embed}.weight" in run.saved:
        run.saved[alias] = run.saved[f"{embed}.weight"].clone()
        save_modules.append(out_module)
        run.notes.append(
            f"{out_module} shares its weight with {embed}: read once, saved for both in modules_to_save "
            "(PEFT warns that a tied layer is saved; merging unties them, with the right values)"
        )
    return []


def _token_notes(run: Collected, report: ExtractReport) -> None:
    """The embedding choices into the report, and what loading trainable tokens needs (a resize, a tied head)."""
    from .tokens import token_notes

    report.embeddings = list(run.embedding_choices)
    report.notes.extend(token_notes(run))


def _bias_factors(run: Collected, report: ExtractReport, modules: Mapping[str, ModuleInfo],
                  roles: Mapping[str, TensorRole]) -> None:
    """``lora_B.bias = db / scale`` on every LoRA target (zero where the bias did not change or does not exist)."""
    changed = zero = 0
    no_base_bias: list[str] = []
    for module, mod in run.factors.items():
        if mod.embedding:
            continue
        delta = run.bias_deltas.get(f"{module}.bias")
        out_f = mod.B.shape[0]
        if delta is not None:
            mod.bias = (delta.to(torch.float32) / run.scale).to(mod.B.dtype)
            changed += 1
        else:
            mod.bias = torch.zeros(out_f, dtype=mod.B.dtype)
            zero += 1
        info = modules.get(module)
        if info is not None and not info.has_bias:
            no_base_bias.append(module)
    run.notes.append(
        f"lora_bias is on: {changed} target(s) carry their bias delta as lora_B.bias = delta / scale, {zero} get a "
        "zero lora_B.bias (PEFT's lora_bias applies to every target)"
    )
    if no_base_bias:
        run.notes.append(
            f"{len(no_base_bias)} target(s) have no bias in the base model ({', '.join(no_base_bias[:6])}"
            f"{' ...' if len(no_base_bias) > 6 else ''}): PEFT warns on load and merge_and_unload refuses them; the "
            "adapter's forward is exact. To merge, restrict --target-modules to layers with a bias, or use "
            "--no-lora-bias (bias deltas are then listed as dropped)."
        )
    if any(r.role == "save" and "lora_bias" in r.reason for r in roles.values()):
        run.notes.append("PEFT refuses lora_bias on Embedding layers: the changed embedding is saved in full instead")
