"""``lorasurg rerank``: change an adapter's rank, optimally, on the adapter file alone.

Each module's delta ``s * B @ A`` (``A: (r, in)``, ``B: (out, r)``) is replaced by its best rank-``k`` approximation
(Eckart-Young), computed exactly from the factors (:func:`lorasurg.engine.lowrank.truncate_factors`: QR of ``B`` and
``A.T`` and an SVD of an ``r x r`` core, never the ``(out, in)`` matrix). The new factors are the balanced split
``A' = sqrt(S_k / s) Vh_k``, ``B' = U_k sqrt(S_k / s)``.

* ``r=N``: every module gets rank N. A module whose rank is already <= N keeps its factors, zero-padded to N: the
  delta is unchanged bit for bit. N above ``min(out, in)`` is clamped to it (padding beyond the largest possible
  rank of the module is useless), and the report says so.
* ``rank_policy=P``: the rank per module chosen from its exact spectrum by P (``energy:F``, ``sv_ratio:X``,
  ``sv_fro:F``, ``sv_cumulative:F``, ``sv_epsilon:E``; :mod:`lorasurg.engine.ranks`, the same code as extract),
  capped by ``r`` (default: the module's current rank). A module that gets rank 0 is left out and listed.

Every module keeps its scale ``s`` (``alpha / r``, ``alpha / sqrt(r)`` with rsLoRA, per module from the patterns):
its new alpha is ``s * k`` (``s * sqrt(k)``), written with the ranks into ``rank_pattern``/``alpha_pattern`` under
anchored keys (:func:`lorasurg.surgery.patterns.rank_scale_fields`, as extract does). ``lora_B.bias`` is multiplied
by that same scale in PEFT's forward, so it and ``modules_to_save`` copies carry over unchanged.

``consumers`` (``--for``): the re-ranked adapter is then rewritten by :func:`lorasurg.consumers.prepare_for` so
that each named consumer (``vllm``, ``llama.cpp``) computes PEFT's per-module delta; what one cannot carry is left out
and listed with its share of the re-ranked adapter's delta energy (a ``modules_to_save`` copy's share is unknown
without the base model). A head tied to the input embedding is recognised in the input adapter.

Mixtures of experts (:mod:`lorasurg.surgery.expert_ranks`): a target_parameters LoRA is re-ranked expert by expert
and joined back at one rank; per-expert modules end at one rank and scale, the config's global ``r`` and
``lora_alpha``, as PEFT on transformers 5 reads them.

DoRA: the adapted weight is ``W' = m * (W + delta) / ||W + delta||_row``, whose per-output norms are ``m`` whatever
the direction ``W + delta`` is. So the magnitude vector is kept as it is: the recomputed magnitude for the new
direction is ``m`` again, and the adapted weight's per-output norms are kept exactly; only its direction changes,
by the truncation error of the delta (which needs no base weight to compute).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..consumers import ForReport, parse_consumers, prepare_for, tied_modules
from ..consumers.reading import Consumers
from ..engine.factors import factors_from_matrices, lora_scale, pad_factors
from ..engine.lowrank import lowrank_norm_sq, truncate_factors
from ..engine.ranks import parse_rank_policy
from ..engine.threads import threads_for
from ..errors import ConfigError, InputError
from ..io.adapter import Adapter, AdapterModule
from .export.output import WithGguf, check_output, output_consumers, output_path, write_output
from .expert_ranks import peft_experts, refuse_consumers, split_parameter_loras
from .patterns import derive_config, rank_scale_fields
from .report import (
    CLAMPED_FOOTNOTE, for_dict, format_bytes, format_count, format_for, format_list, format_table, left_out_mark,
    written_modules,
)
from .sources import AdapterSource, open_adapter, refuse_grouped, refuse_zero_scales, source_name

__all__ = ["ModuleRerank", "RerankReport", "rerank", "rerank_to_dir", "default_rerank_path"]


@dataclass
class ModuleRerank:
    """One module before and after.

    Attributes:
        new_rank: 0 when the rank policy left the module out.
        energy: ``||delta||_F^2`` of the old delta.
        energy_kept: ``||delta'||_F^2 / ||delta||_F^2`` (1.0 when nothing was truncated).
        rel_error: ``||delta - delta'||_F / ||delta||_F``.
        padded: the factors were kept and zero-padded (new rank above the old one).
        clamped: the requested rank exceeded ``min(out, in)``.
    """

    module: str
    kind: str
    shape: list[int]
    old_rank: int
    new_rank: int
    scale: float
    energy: float
    energy_kept: float
    rel_error: float
    padded: bool = False
    clamped: bool = False


@dataclass
class RerankReport:
    """What ``rerank`` did; ``render()`` for people, ``to_dict()`` for ``--json``."""

    source: str
    r: Optional[int]
    rank_policy: Optional[str]
    modules: list[ModuleRerank] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    old_parameters: int = 0
    adapter_parameters: int = 0
    adapter_bytes: int = 0
    output: Optional[str] = None
    consumers: list[str] = field(default_factory=lambda: ["peft"])
    for_report: Optional[ForReport] = None

    @property
    def dropped(self) -> list[str]:
        """Modules the rank policy gave rank 0 (left out of the adapter)."""
        return [m.module for m in self.modules if m.new_rank == 0]

    @property
    def written(self) -> list[str]:
        """The modules the written adapter holds: not given rank 0, not left out for a ``--for`` consumer."""
        left = self.for_report.left_out_modules if self.for_report is not None else set()
        return [m.module for m in self.modules if m.new_rank > 0 and m.module not in left]

    @property
    def energy_kept(self) -> float:
        """Share of the adapter's total delta energy kept (modules left out count as lost)."""
        total = sum(m.energy for m in self.modules)
        return 1.0 if total <= 0 else sum(m.energy * m.energy_kept for m in self.modules) / total

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "output": self.output,
            "settings": {"r": self.r, "rank_policy": self.rank_policy, "for": list(self.consumers)},
            **for_dict(self.for_report),
            "modules": [asdict(m) for m in self.modules],
            "dropped": self.dropped,
            "notes": list(self.notes),
            "totals": {
                "modules": len(self.written),
                "old_parameters": self.old_parameters,
                "adapter_parameters": self.adapter_parameters,
                "adapter_bytes": self.adapter_bytes,
                "energy_kept": self.energy_kept,
            },
        }

    def render(self) -> str:
        how = f"r={self.r}" if self.rank_policy is None else f"rank policy={self.rank_policy} (cap {self.r or 'old r'})"
        how += f" for={','.join(self.consumers)}"
        parts = [f"rerank: {self.source}\n{how}"]
        rows = [
            (m.module, m.kind, "x".join(map(str, m.shape)), m.old_rank,
             f"{m.new_rank}" + ("*" if m.clamped else "") + (" (padded)" if m.padded else "")
             + (" (left out)" if m.new_rank == 0 else left_out_mark(m.module, self.for_report)),
             f"{m.scale:.4g}", f"{100 * m.energy_kept:.4f}%", f"{100 * m.rel_error:.3f}%")
            for m in self.modules
        ]
        table = format_table(rows, ["module", "kind", "shape", "old r", "new r", "scale", "energy kept", "rel. error"])
        if any(m.clamped for m in self.modules):
            table += "\n" + CLAMPED_FOOTNOTE
        parts.append(table)
        if self.notes:
            parts.append(format_list("notes", self.notes))
        if self.consumers != ["peft"]:
            parts.append(format_for(self.for_report))
        parts.append(
            f"{written_modules([m.module for m in self.modules if m.new_rank > 0], self.for_report)}; parameters "
            f"{format_count(self.old_parameters)} -> "
            f"{format_count(self.adapter_parameters)} ({format_bytes(self.adapter_bytes)}); energy kept "
            f"{100 * self.energy_kept:.4f}%"
        )
        if self.output:
            parts.append(f"wrote {self.output}")
        return "\n\n".join(parts)


def default_rerank_path(source: AdapterSource, r: Optional[int], rank_policy: Optional[str]) -> Path:
    """``./<adapter name>-r<N>`` (``-<policy>`` for a rank policy), in the working directory."""
    suffix = f"-r{r}" if r is not None else ""
    if rank_policy:
        suffix += "-" + rank_policy.replace(":", "")
    return Path(source_name(source) + suffix)


def rerank_to_dir(adapter: AdapterSource, output: Union[str, os.PathLike, None] = None, *, force: bool = False,
                  r: Optional[int] = None, rank_policy: Optional[str] = None,
                  consumers: Consumers = "peft", to: str = "peft", base=None, outtype: str = "f32"):
    """:func:`rerank`, then write the adapter to ``output`` (default :func:`default_rerank_path`) atomically.

    The output is checked before any work: an existing non-empty directory is refused without ``force``.
    ``to="gguf"``: written for llama.cpp as a GGUF LoRA file (``base``: the base model, only its config.json read;
    ``outtype``), and the report gains the export's (:mod:`lorasurg.surgery.export.output`).

    Raises:
        OutputExistsError: ``output`` exists, is not empty, and ``force`` is false; and everything :func:`rerank`
            raises.
    """
    _check_settings(r, rank_policy)
    names = output_consumers(consumers, to)
    output = output_path(default_rerank_path(adapter, r, rank_policy), to) if output is None else output
    check_output(output, to, force, base)
    result, report = rerank(adapter, r=r, rank_policy=rank_policy, consumers=names)
    gguf = write_output(result, output, to=to, force=force, base=base, outtype=outtype)
    report.output = str(output)
    return report if gguf is None else WithGguf(report, gguf)


def rerank(adapter: AdapterSource, *, r: Optional[int] = None, rank_policy: Optional[str] = None,
           consumers: Consumers = "peft") -> tuple[Adapter, RerankReport]:
    """Re-rank every module of ``adapter`` (see the module docstring); nothing is written.

    Args:
        adapter: an :class:`Adapter`, or a directory / hub repo id ``Adapter.load`` reads.
        r: the new rank (with ``rank_policy``: its cap). Clamped per module to ``min(out, in)``, and said so.
        rank_policy: choose each module's rank from its spectrum (``energy:0.9``, ``sv_ratio:4``, ...).
        consumers: who will load the result (``--for``): ``peft`` (default: written as PEFT reads it), ``vllm``,
            ``llama.cpp``, ``all`` or several; see the module docstring.

    Returns:
        ``(new adapter, report)``.

    Raises:
        ConfigError: neither ``r`` nor ``rank_policy``, ``r < 1``, a policy that does not parse, an unknown
            consumer.
        UnsupportedError: a LoRA on a grouped convolution.
        InputError: the adapter cannot be read or contradicts its config, a module has scale 0 (``lora_alpha`` 0),
            the policy keeps no module, or nothing the named consumers can carry is left.
        UnsupportedError: ``consumers`` other than PEFT for target_parameters LoRAs.
    """
    policy = _check_settings(r, rank_policy)
    names = parse_consumers(consumers)
    source, name = open_adapter(adapter)
    refuse_grouped(source, name, "re-ranked")
    refuse_zero_scales(source, name, "rerank")
    cfg = source.config
    report = RerankReport(name, r, None if policy is None else str(policy), consumers=list(names))
    report.old_parameters = source.num_parameters()
    split = split_parameter_loras(source)
    refuse_consumers(split, names, name)
    modules: dict[str, AdapterModule] = {}
    ranks: dict[str, tuple[int, float]] = {}
    for module, mod in split.adapter.modules.items():
        rank, alpha = split.adapter.rank_alpha(module)
        scale = lora_scale(rank, alpha, cfg.use_rslora)
        with threads_for((mod.B.shape[0] + mod.A[0].numel()) * mod.rank**2):
            new, row = _rerank_module(mod, scale, r, policy)
        report.modules.append(row)
        if new is not None:
            modules[module] = new
            ranks[module] = (new.rank, scale)
    if not modules:
        raise InputError(
            f"rank policy {policy} keeps no singular value of any module of {name} (every delta is zero or below the "
            "threshold): there is nothing to write. Use a fixed --r or a less strict policy."
        )
    layout = peft_experts(modules, ranks, split, source.modules)
    modules = layout.modules
    for row in report.modules:
        if row.module in layout.zero_filled:  # kept with zero factors: PEFT needs every expert
            row.new_rank, row.padded = layout.rank_of(row.module), True
    report.notes += layout.notes
    changes: dict[str, Any] = dict(rank_scale_fields(layout.ranks, cfg.use_rslora, base=layout.base))
    if report.dropped:
        changes["target_modules"] = sorted(m for m in modules if m not in layout.paths) or None
        if split.loras:
            changes["target_parameters"] = sorted(layout.parameters) or None
        report.notes.append(
            f"{len(report.dropped)} module(s) got rank 0 from the rank policy and are left out of target_modules"
        )
    result = Adapter(derive_config(cfg, **changes), modules, dict(source.extra))
    _notes(report, source)
    problems = result.problems()
    if problems:  # a bug here, not in the user's input
        raise AssertionError("rerank built an inconsistent adapter: " + "; ".join(problems))
    result, report.for_report = prepare_for(result, names, tied=tied_modules(source) & set(result.modules))
    report.adapter_parameters = result.num_parameters()
    report.adapter_bytes = sum(t.numel() * t.element_size() for t in result.to_state_dict().values())
    return result, report


def _check_settings(r: Optional[int], rank_policy: Optional[str]):
    if r is None and not rank_policy:
        raise ConfigError("rerank needs a new rank: --r N (every module) or --rank-policy P (per module, capped by --r)")
    if r is not None and (isinstance(r, bool) or int(r) != r or r < 1):
        raise ConfigError(f"--r must be an integer >= 1, got {r!r}")
    return parse_rank_policy(rank_policy) if rank_policy else None


def _rerank_module(mod: AdapterModule, scale: float, r: Optional[int], policy):
    """``(new module, or None when the policy gives rank 0; report row)`` for one module."""
    out_f, in_f = int(mod.B.shape[0]), int(mod.A[0].numel())
    limit = min(out_f, in_f)
    cap = mod.rank if r is None else r
    target = min(cap, limit)

    def row(new_rank: int, energy: float, kept: float, error: float, padded: bool = False) -> ModuleRerank:
        clamped = r is not None and r > limit and new_rank < r
        return ModuleRerank(mod.name, mod.kind, [out_f, in_f], mod.rank, new_rank, scale, energy, kept, error, padded,
                            clamped)

    if policy is None and cap >= mod.rank:  # nothing to cut: keep the factors, zero-padded up to min(cap, out, in)
        target = max(target, mod.rank)
        A, B = pad_factors(mod.A, mod.B, target)
        new = AdapterModule(mod.name, A, B, mod.bias, mod.magnitude, mod.embedding)
        energy = lowrank_norm_sq([(scale, mod.B, mod.A)])
        return new, row(target, energy, 1.0, 0.0, padded=target > mod.rank)
    fit = truncate_factors(mod.A, mod.B, scale, target, policy=policy)
    if fit.rank == 0:
        return None, row(0, fit.total_sq, 0.0, 1.0 if fit.total_sq > 0 else 0.0)
    weight_shape = (out_f, *mod.A.shape[1:])
    f = factors_from_matrices(fit.A, fit.B, mod.kind, weight_shape, scale)
    new = AdapterModule(mod.name, f.A.to(mod.A.dtype), f.B.to(mod.B.dtype), mod.bias, mod.magnitude, mod.embedding)
    return new, row(fit.A.shape[0], fit.total_sq, fit.energy_kept, fit.relative_error)


def _notes(report: RerankReport, source: Adapter) -> None:
    clamped = [m for m in report.modules if m.clamped]
    if clamped:
        report.notes.append(
            f"r={report.r} exceeds min(out, in) of {len(clamped)} module(s); their rank was clamped to it: "
            + ", ".join(f"{m.module} (r={m.new_rank})" for m in clamped[:8]) + (" ..." if len(clamped) > 8 else "")
        )
    padded = [m for m in report.modules if m.padded]
    if padded:
        report.notes.append(
            f"{len(padded)} module(s) had a rank below the new one: their factors are kept and zero-padded (the delta "
            "is unchanged)"
        )
    if source.config.use_dora:
        report.notes.append(
            "DoRA: lora_magnitude_vector is kept. The adapted weight m * (W + delta) / ||W + delta||_row has per-output "
            "norms m for any delta, so they are kept exactly; its direction changes by the truncation error"
        )
    if source.config.lora_bias:
        report.notes.append("lora_B.bias carried over unchanged (every module keeps its scale)")
    tokens = source.token_rows()
    if tokens:
        report.notes.append(f"trainable tokens of {', '.join(tokens)} carried over unchanged (rows, not a LoRA)")
    if len(source.extra) > len(tokens):
        report.notes.append(f"{len(source.extra) - len(tokens)} other tensor(s) (modules_to_save, ...) carried over "
                            "unchanged")
