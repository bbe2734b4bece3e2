"""``lorasurg convert``: a trained PiSSA/OLoRA adapter as a plain LoRA for the original base.

PiSSA/OLoRA train on a residual base ``W_res = W - s * B0 @ A0`` (see :mod:`lorasurg.surgery.residualize`). After
training the adapted weight is ``W_res + s * B @ A = W + s * (B @ A - B0 @ A0)``, so on the *original* ``W`` the
adapter is the difference, one LoRA of rank ``2r`` with stacked factors:

    dW = s * (B @ A - B0 @ A0) = s * [B | -B0] @ [A ; A0]        A' = [A ; A0]: (2r, in),  B' = [B | -B0]: (out, 2r)

with ``r`` and ``lora_alpha`` doubled (``alpha * sqrt(2)`` with rsLoRA, as ``alpha / sqrt(r)`` must not change)
and every ``rank_pattern``/``alpha_pattern`` value scaled the same way, so each module keeps its scale: what
PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes (which refuses rsLoRA together
with patterns; here they work). A ``lora_B`` bias becomes ``b - b0``; DoRA's magnitude is kept (DoRA normalises
``W + dW' = W_res + s * B @ A``, the same matrix as in training, so the conversion is exact; PEFT's conversion
drops the magnitude, and embedding LoRAs, without a word); saved module copies (``modules_to_save``) are TRAINED's.

``--r N`` re-ranks optimally: the exact SVD of the stacked factors (:func:`lorasurg.engine.lowrank.lowrank_svd`,
QR of ``(out, 2r)`` and ``(in, 2r)`` factors, never the dense ``(out, in)`` delta), truncated to ``N`` and split
evenly at the module's own scale; the report gives the share of ``||dW||_F**2`` each module keeps.

INIT is the initial adapter (``residualize``'s ``OUT/adapter`` or one PEFT saved before training); it must be the
initial state of TRAINED: the same modules, ranks, shapes, scales and layer kinds. Everything that differs is
listed before anything is written.

``consumers`` (``--for``): the converted adapter is then rewritten by :func:`lorasurg.consumers.prepare_for` so that
each named consumer computes PEFT's per-module delta on the original base; what one cannot carry (``lora_B.bias``,
DoRA, ``modules_to_save``, ...) is left out and listed with its share of the converted delta's energy.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch

from ..config import LoraConfig
from ..consumers import ForReport, parse_consumers, prepare_for, tied_modules
from ..consumers.reading import Consumers
from ..engine.factors import lora_alpha_for, lora_scale
from ..engine.lowrank import lowrank_svd
from ..engine.svd import split_factors
from ..errors import ConfigError, InputError
from ..io.adapter import Adapter, AdapterModule
from .export.output import WithGguf, check_output, output_consumers, output_path, write_output
from ..targeting import alpha_value, rank_alpha_fields
from .options import default_output, short_list
from .provenance import provenance_metadata, read_provenance
from .report import (
    for_dict, format_bytes, format_count, format_for, format_list, format_table, left_out_mark, written_modules,
)
from .sources import refuse_zero_scales

__all__ = ["convert", "convert_to_dir", "ConvertReport", "ConvertedModule"]

AdapterSource = Union[str, "os.PathLike[str]"]
_BASE_MUTATING = ("pissa", "olora")


@dataclass
class ConvertedModule:
    """One module of the converted adapter: its rank before and after, and how much of ``dW`` it keeps."""

    module: str
    kind: str
    trained_rank: int
    rank: int
    delta_norm: float  # ||s * (B @ A - B0 @ A0)||_F
    energy_kept: float  # 1.0 unless --r truncated it
    clamped: bool = False


@dataclass
class ConvertReport:
    """Everything ``convert`` did; ``render()`` for people, ``to_dict()`` for ``--json``."""

    trained: str
    initial: str
    r: Optional[int]
    use_rslora: bool
    output: Optional[str] = None
    base_model: Optional[str] = None
    modules: list[ConvertedModule] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    adapter_parameters: int = 0
    adapter_bytes: int = 0
    consumers: list[str] = field(default_factory=lambda: ["peft"])
    for_report: Optional[ForReport] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "trained": self.trained, "initial": self.initial, "output": self.output, "base_model": self.base_model,
            "settings": {"r": self.r, "use_rslora": self.use_rslora, "for": list(self.consumers)},
            **for_dict(self.for_report),
            "modules": [asdict(m) for m in self.modules],
            "notes": list(self.notes),
            "totals": {"modules": len(self.modules) - len(self._left_out),
                       "adapter_parameters": self.adapter_parameters,
                       "adapter_bytes": self.adapter_bytes, "energy_kept": self.energy_kept},
        }

    @property
    def _left_out(self) -> set[str]:
        return {m.module for m in self.modules} & (self.for_report.left_out_modules if self.for_report else set())

    @property
    def energy_kept(self) -> float:
        """Share of ``sum ||dW||_F**2`` over all modules that the converted adapter keeps."""
        total = sum(m.delta_norm**2 for m in self.modules)
        return sum(m.delta_norm**2 * m.energy_kept for m in self.modules) / total if total > 0 else 1.0

    def render(self) -> str:
        how = f"re-ranked to r={self.r} (exact SVD of the stacked factors)" if self.r else "exact (rank 2r)"
        parts = [f"convert: {self.trained} (initial state {self.initial}) -> plain LoRA, {how}"
                 + (" rslora" if self.use_rslora else "") + f"; for={','.join(self.consumers)}"]
        rows = [(m.module, m.kind, m.trained_rank,
                 f"{m.rank}" + ("*" if m.clamped else "") + left_out_mark(m.module, self.for_report),
                 f"{m.delta_norm:.4g}", f"{100 * m.energy_kept:.2f}%") for m in self.modules]
        table = format_table(rows, ["module", "kind", "trained r", "r", "||dW||", "energy kept"])
        if any(m.clamped for m in self.modules):
            table += "\n* rank clamped to min(2r, out, in), the rank of the module's dW"
        parts.append(table)
        if self.notes:
            parts.append(format_list("notes", self.notes))
        if self.consumers != ["peft"]:
            parts.append(format_for(self.for_report))
        parts.append(f"{written_modules([m.module for m in self.modules], self.for_report)}; adapter: "
                     f"{format_count(self.adapter_parameters)} parameters, "
                     f"{format_bytes(self.adapter_bytes)}; energy of dW kept {100 * self.energy_kept:.2f}%; "
                     f"base model: {self.base_model or 'unknown'}")
        if self.output:
            parts.append(f"wrote {self.output}")
        return "\n\n".join(parts)


def convert_to_dir(trained: AdapterSource, initial: AdapterSource, output: Union[str, os.PathLike, None] = None, *,
                   r: Optional[int] = None, force: bool = False, consumers: Consumers = "peft", to: str = "peft",
                   base=None, outtype: str = "f32") -> ConvertReport:
    """:func:`convert`, then save the plain LoRA to ``output`` (default ``./<TRAINED name>-lora``) atomically.

    The output is checked before any work: an existing non-empty directory is refused without ``force``.
    ``to="gguf"``: written for llama.cpp as a GGUF LoRA file (``base``: the ORIGINAL base model, only its config.json
    read; ``outtype``), and the report gains the export's (:mod:`lorasurg.surgery.export.output`).

    Raises:
        OutputExistsError: ``output`` exists, is not empty, and ``force`` is false.
        and everything :func:`convert` raises.
    """
    names = output_consumers(consumers, to)
    if output is None:
        output = output_path(default_output(trained, "-lora"), to)
    check_output(output, to, force, base)
    adapter, report = convert(trained, initial, r=r, consumers=names)
    meta = provenance_metadata(method="convert", trained=report.trained, initial=report.initial, r=r,
                               base=report.base_model)
    gguf = write_output(adapter, output, to=to, force=force, base=base, outtype=outtype, metadata=meta)
    report.output = os.fspath(output)
    return report if gguf is None else WithGguf(report, gguf)


def convert(trained: AdapterSource, initial: AdapterSource, *, r: Optional[int] = None,
            consumers: Consumers = "peft") -> tuple[Adapter, ConvertReport]:
    """The plain LoRA equal to TRAINED on the residual base, for the original base (see the module docstring).

    Args:
        trained: the trained PiSSA/OLoRA adapter (directory or hub repo id).
        initial: its initial state (``residualize``'s ``OUT/adapter``, or PEFT's saved initial adapter).
        r: re-rank every module to this rank (clamped to ``min(2r, out, in)``, and said so); None keeps the exact
            rank ``2r``.
        consumers: who will load the result (``--for``): ``peft`` (default), ``vllm``, ``llama.cpp``, ``all`` or
            several; see the module docstring.

    Returns:
        ``(adapter, report)``; save the adapter with :meth:`Adapter.save` (or use :func:`convert_to_dir`).

    Raises:
        ConfigError: ``r`` is not a positive integer; an unknown consumer.
        InputError: INIT is not the initial state of TRAINED (every difference listed); unreadable adapters; nothing
            left that the named consumers can carry.
    """
    if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
        raise ConfigError(f"r must be a positive integer, got {r!r}")
    names = parse_consumers(consumers)
    t, i = Adapter.load(trained), Adapter.load(initial)
    report = ConvertReport(trained=os.fspath(trained), initial=os.fspath(initial), r=r, use_rslora=t.config.use_rslora,
                           consumers=list(names))
    _check_pair(t, i, report)
    if r is not None:
        refuse_zero_scales(t, report.trained, "convert --r")
    origin = read_provenance(initial).get("base") if os.path.isdir(os.fspath(initial)) else None
    report.base_model = origin or t.config.base_model_name_or_path
    if origin is None:
        report.notes.append(
            f"{report.initial} does not say which base it was residualized from (no lorasurg metadata): "
            f"base_model_name_or_path is TRAINED's ({t.config.base_model_name_or_path!r}); the converted adapter "
            "belongs on the ORIGINAL base, so set it if that names the residual model"
        )
    modules = {name: _convert_module(t, i, name, r, report) for name in t.modules}
    adapter = _build(t, modules, report)
    adapter, report.for_report = prepare_for(adapter, names, tied=tied_modules(t) & set(adapter.modules))
    report.adapter_parameters = adapter.num_parameters()
    report.adapter_bytes = adapter.num_bytes()
    return adapter, report


# ------------------------------------------------------------------------------------------------ steps


def _check_pair(t: Adapter, i: Adapter, report: ConvertReport) -> None:
    """Refuse an INIT that is not TRAINED's initial state, listing every difference."""
    problems: list[str] = []
    only_t, only_i = sorted(set(t.modules) - set(i.modules)), sorted(set(i.modules) - set(t.modules))
    if only_t:
        problems.append(f"modules only in TRAINED ({len(only_t)}): {short_list(only_t)}")
    if only_i:
        problems.append(f"modules only in --initial ({len(only_i)}): {short_list(only_i)}")
    for key in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out"):
        if getattr(t.config, key) != getattr(i.config, key):
            problems.append(f"config {key}: TRAINED {getattr(t.config, key)!r}, --initial {getattr(i.config, key)!r}")
    for name in (n for n in t.modules if n in i.modules):
        tm, im = t.modules[name], i.modules[name]
        if (t.rank_alpha(name), tm.kind) != (i.rank_alpha(name), im.kind):
            problems.append(f"{name}: (r, alpha, kind) TRAINED {(*t.rank_alpha(name), tm.kind)}, --initial "
                            f"{(*i.rank_alpha(name), im.kind)}")
            continue
        for part, a, b in (("A", tm.A, im.A), ("B", tm.B, im.B)):
            if a.shape != b.shape:
                problems.append(f"{name}: lora_{part} shape TRAINED {tuple(a.shape)}, --initial {tuple(b.shape)}")
    if problems:
        raise InputError(
            f"--initial {report.initial} is not the initial state of {report.trained}:\n  - " + "\n  - ".join(problems)
            + "\nGive the adapter saved before training (residualize's OUT/adapter, or PEFT's initial adapter)."
        )
    init_value = str(i.config.init_lora_weights).lower()
    if not (init_value == "true" or init_value.startswith(_BASE_MUTATING)):
        report.notes.append(f"--initial says init_lora_weights={i.config.init_lora_weights!r}, not a PiSSA/OLoRA "
                            "initial state (true or pissa/olora); converted as given")
    if all(_same(t.modules[n], i.modules[n]) for n in t.modules):
        report.notes.append("TRAINED equals --initial: every converted delta is zero (was the adapter trained?)")


def _same(a: AdapterModule, b: AdapterModule) -> bool:
    return torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


def _convert_module(t: Adapter, i: Adapter, name: str, r: Optional[int], report: ConvertReport) -> AdapterModule:
    """``[A ; A0]``, ``[B | -B0]`` (or their exact rank-``r`` SVD) for one module."""
    tm, im = t.modules[name], i.modules[name]
    rank, alpha = t.rank_alpha(name)
    s = lora_scale(rank, alpha, t.config.use_rslora)
    svd = lowrank_svd([(s, tm.B, tm.A), (-s, im.B, im.A)])  # (out, k), (k,), (k, in), k <= 2r
    total = float(svd.S.double().pow(2).sum())
    bias = None if tm.bias is None else tm.bias - (im.bias if im.bias is not None else 0)
    if r is None:
        A = torch.cat([tm.A, im.A], dim=0)  # (2r, in[, *k])
        B = torch.cat([tm.B, -im.B], dim=1)  # (out, 2r[, 1...])
        report.modules.append(ConvertedModule(name, tm.kind, rank, 2 * rank, math.sqrt(total), 1.0))
        return AdapterModule(name, A, B, bias, tm.magnitude, tm.embedding)
    limit = min(2 * rank, tm.B.shape[0], tm.A[0].numel())
    k = min(r, limit)
    new_scale = lora_scale(k, lora_alpha_for(s, k, t.config.use_rslora), t.config.use_rslora)
    A_mat, B_mat = split_factors(svd.U[:, :k], svd.S[:k], svd.Vh[:k], new_scale)  # (k, in), (out, k)
    dtype = tm.A.dtype
    A = A_mat.to(dtype).reshape(k, *tm.A.shape[1:])  # (k, in[, *kernel])
    B = B_mat.to(dtype).reshape(tm.B.shape[0], k, *tm.B.shape[2:])  # (out, k[, 1...])
    kept = float(svd.S[:k].double().pow(2).sum()) / total if total > 0 else 1.0
    report.modules.append(ConvertedModule(name, tm.kind, rank, k, math.sqrt(total), kept, clamped=k < r))
    return AdapterModule(name, A.contiguous(), B.contiguous(), bias, tm.magnitude, tm.embedding)


def _build(t: Adapter, modules: dict[str, AdapterModule], report: ConvertReport) -> Adapter:
    """The converted adapter: TRAINED's config with the new ranks and alphas, ``init_lora_weights: true``."""
    cfg = t.config.to_dict()
    cfg.update(init_lora_weights=True, base_model_name_or_path=report.base_model)
    rslora = t.config.use_rslora
    if report.r is None:  # PEFT's rule: every rank doubled, every alpha doubled (times sqrt(2) with rsLoRA)
        factor = math.sqrt(2) if rslora else 2
        cfg.update(r=2 * cfg["r"], lora_alpha=alpha_value(cfg["lora_alpha"] * factor),
                   rank_pattern={k: 2 * v for k, v in (cfg["rank_pattern"] or {}).items()},
                   alpha_pattern={k: alpha_value(v * factor) for k, v in (cfg["alpha_pattern"] or {}).items()})
    else:
        per_module = {}
        for m in report.modules:
            rank, alpha = t.rank_alpha(m.module)
            per_module[m.module] = (m.rank, lora_alpha_for(lora_scale(rank, alpha, rslora), m.rank, rslora))
        cfg.update(rank_alpha_fields(per_module))
        clamped = [f"{m.module} (r={m.rank})" for m in report.modules if m.clamped]
        if clamped:
            report.notes.append(f"--r {report.r} exceeds the rank of dW (min(2r, out, in)) of {len(clamped)} "
                                f"module(s); clamped: {short_list(clamped)}")
    adapter = Adapter(LoraConfig.from_dict(cfg, source="the converted config"), modules, dict(t.extra))
    problems = adapter.problems()
    if problems:  # a bug here, not in the user's input
        raise AssertionError("convert built an inconsistent adapter: " + "; ".join(problems))
    return adapter

