"""``lorasurg export ADAPTER --to gguf``: a PEFT adapter as a llama.cpp GGUF LoRA file, streamed tensor by tensor.

What llama.cpp computes from the file is PEFT's per-module delta ``s_m * B_m @ A_m`` on every module it carries:

1. **Plan, before anything is read or written.** The base model's facts (architecture, layer count, heads, expert
   count, tied head: :class:`~lorasurg.consumers.gguf.BaseFacts`) come from BASE's ``config.json`` alone, or from
   the adapter (a local ``base_model_name_or_path``, ``auto_mapping``); an architecture with no GGUF name map is
   refused by name. What llama.cpp cannot carry is found on the adapter's names, shapes and config
   (:func:`lorasurg.consumers.blocked_parts` for the consumer ``llama.cpp-gguf``, plus position-embedding LoRA): it is
   left out and listed with its share of the delta's energy, as ``--for llama.cpp`` lists it. A whole token
   embedding or head saved in ``modules_to_save`` (new tokens) is refused: a GGUF adapter has no form for it.
2. **Scale.** :func:`lorasurg.consumers.prepare_for` decides, on meta-device placeholders, the ``lora_alpha`` written
   (``adapter.lora.alpha``) and each module's factor ``c = s_m / (alpha / r_m)``, exactly as ``--for llama.cpp``.
3. **Stream.** The file's metadata and tensor table are written first (shapes and types are known from the plan),
   then each pair: the module's factors read, in float32, ``A`` and ``B`` each times ``sqrt(c)``, laid out as the
   loader reads them (:func:`lorasurg.consumers.gguf.layout_factors`: transposed for the token embedding, experts
   stacked, Llama-family q/k rows permuted), cast to the output type and written. Peak memory: one pair (one
   layer's experts for a stacked tensor). When something is left out, its energy is measured first in one more
   read of the modules, one at a time.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Optional, Union

import torch

from ...consumers import blocked_parts, prepare_for
from ...consumers.gguf import (
    BaseFacts, GgufTensor, architecture_for, base_facts, head_is_tied, layout_factors, output_modules, plan_tensors,
    saved_embeddings,
)
from ...consumers.prepare import LeftOut, module_energies, rescale_module
from ...config import LoraConfig
from ...errors import InputError, UnsupportedError
from ...io.adapter import Adapter, AdapterModule
from ...io.adapter_file import AdapterFile
from ...io.checkpoint import Checkpoint, read_model_config
from ...io.gguf import OUTTYPES, GgufEntry, tensor_type, write_gguf
from ...io.writer import check_output_file
from ..sources import AdapterSource, open_adapter, source_name
from .report import ExportReport, GgufPair

__all__ = ["CONSUMER", "export_gguf", "default_gguf_path", "check_gguf_base"]

#: the consumer whose rules the file is written for (:data:`lorasurg.consumers.rules.LLAMA_CPP_GGUF`).
CONSUMER = "llama.cpp-gguf"
_PART_FEATURES = ("lora_bias", "dora", "init_weights", "modules_to_save", "saved_norms")

BaseSource = Union[str, "os.PathLike[str]", Checkpoint, None]


def default_gguf_path(source: AdapterSource, suffix: str = "") -> Path:
    """``./<adapter name><suffix>.gguf`` in the working directory."""
    return Path(f"{source_name(source)}{suffix}.gguf")


def export_gguf(adapter: AdapterSource, output: Union[str, "os.PathLike[str]", None] = None, *,
                base: BaseSource = None, outtype: str = "f32", force: bool = False) -> ExportReport:
    """Write ``adapter`` as a llama.cpp GGUF LoRA file (see the module docstring).

    Args:
        adapter: an adapter directory or hub repo id (streamed: read one module at a time), or an :class:`Adapter`.
        output: the ``.gguf`` file; default ``./<adapter name>.gguf``.
        base: the base model (a directory, a file in it, a hub repo id, or an open :class:`Checkpoint`); only its
            ``config.json`` is read. Needed when the adapter cannot say its architecture, the head's tying (an
            ``lm_head`` LoRA), the head counts (Llama-family q/k) or the expert count (MoE).
        outtype: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (``q8_0`` writes rows that are not a multiple of 32 as f16).
        force: replace an existing ``output``.

    Raises:
        OutputExistsError: ``output`` exists and ``force`` is false (checked before any work).
        ConfigError: an unknown ``outtype``.
        UnsupportedError: an architecture with no GGUF name map.
        InputError: the adapter or BASE's config cannot be read; a fact the file needs is unknown without BASE; a
            whole embedding or head in ``modules_to_save``; modules llama.cpp has no weight for; experts missing or
            of unequal ranks; nothing llama.cpp can carry. Nothing is written then.
    """
    tensor_type(outtype, (1, 1))  # an unknown outtype is refused before any work
    output = Path(default_gguf_path(adapter) if output is None else output)
    check_output_file(output, force)
    with ExitStack() as stack:
        source = (AdapterFile.of(*open_adapter(adapter)) if isinstance(adapter, Adapter)
                  else stack.enter_context(AdapterFile.open(adapter)))
        report, entries, produce = _prepare(source, _facts(source.view.config, base), outtype)
        metadata = _metadata(source.view, report, outtype)
        report.file_bytes = write_gguf(output, report.architecture, metadata, entries, produce, force=force)
    report.output = str(output)
    return report


# ------------------------------------------------------------------------------------------------ facts


def check_gguf_base(base: BaseSource) -> None:
    """Refuse, before any work, a BASE whose architecture has no GGUF name map (nothing to do without a BASE).

    Raises:
        InputError / UnsupportedError: as :func:`lorasurg.consumers.gguf.architecture_for`.
    """
    if base is not None:
        architecture_for(_facts(None, base))


def _facts(config: Optional[LoraConfig], base: BaseSource) -> BaseFacts:
    """The base model's facts: BASE's config.json, else the adapter's local base_model_name_or_path, else its
    auto_mapping (architecture only)."""
    if isinstance(base, Checkpoint):
        if base.config is not None:
            return base_facts(base.config, f"{base.source}/config.json")
        base = None
    if base is not None:
        config, path = read_model_config(base)
        return base_facts(config, str(path))
    cfg = config if config is not None else LoraConfig()
    named = cfg.base_model_name_or_path
    if named and (Path(named) / "config.json").is_file():
        config, path = read_model_config(named)
        return base_facts(config, f"{path} (the adapter's base_model_name_or_path)")
    mapped = (cfg.auto_mapping or {}).get("base_model_class")
    return BaseFacts(mapped if isinstance(mapped, str) else None, source="the adapter's auto_mapping")


# ------------------------------------------------------------------------------------------------ plan


def _prepare(source: AdapterFile, facts: BaseFacts, outtype: str):
    """``(report, entries, produce)``: everything decided before the file is opened."""
    view = source.view
    _, arch_name = architecture_for(facts)
    if view.config.target_parameters:
        raise UnsupportedError(
            f"the adapter puts LoRA on parameters (target_parameters: {', '.join(view.config.target_parameters)}; "
            "PEFT's layout for fused experts): lorasurg writes GGUF files from per-module LoRA, experts under their "
            "checkpoint names (model.layers.N.mlp.experts.E.gate_proj), which llama.cpp stacks per layer. Write the "
            "adapter per expert (lorasurg extract does for Qwen3-MoE), or fuse it and convert the fused model")
    saved = saved_embeddings([k for k in view.extra if not k.endswith(".base_layer.weight")], facts)
    if saved:
        raise InputError(
            f"the adapter saves whole embedding/head weights in modules_to_save ({', '.join(saved)}; new tokens?): a "
            "GGUF LoRA file has no form for them, and llama.cpp would use the base's. Fuse the adapter into its base "
            "(lorasurg fuse BASE ADAPTER -o FUSED) and convert the fused model with llama.cpp's convert_hf_to_gguf.py")
    tied = _tied(view, facts)
    blocked = blocked_parts(view, CONSUMER, tied)
    gone = {m for f, (items, _) in blocked.items() if f not in _PART_FEATURES for m in items}
    kept = {m: mod.kind for m, mod in view.modules.items() if m not in gone}
    tensors, unapplied = plan_tensors(kept, facts, {m: view.modules[m].rank for m in kept})
    nothing = {k: 0.0 for m in view.modules for k in (m, f"{m}.lora_B.bias")}  # nothing left out: no shares to give
    energies = _energies(source) if blocked or unapplied else nothing
    trimmed = Adapter(view.config, {m: mod for m, mod in view.modules.items() if m not in unapplied}, view.extra)
    total = sum(energies.values())
    new, for_report = prepare_for(trimmed, CONSUMER, tied=tied & set(trimmed.modules), energies=energies,
                                  total_energy=total)
    for module, why in unapplied.items():
        energy = energies[module]
        for_report.left_out.append(LeftOut(module, "embedding_lora", (CONSUMER,), why, energy,
                                           energy / total if total > 0 else None, {CONSUMER: why}))
    report = ExportReport(source.source, None, arch_name, facts.architecture, facts.source,
                          float(new.config.lora_alpha), outtype, for_report=for_report)
    _notes(report, new, facts)
    entries, pairs = [], {}
    for tensor in tensors:
        a_shape, b_shape = _pair_shapes(tensor, new)
        a = GgufEntry(f"{tensor.name}.lora_a", a_shape, tensor_type(outtype, a_shape))
        b = GgufEntry(f"{tensor.name}.lora_b", b_shape, tensor_type(outtype, b_shape))
        entries += [a, b]
        pairs[a.name] = tensor
        report.pairs.append(GgufPair(tensor.name, list(tensor.modules), tensor.layout, b_shape[-1], list(a_shape),
                                     list(b_shape), [a.type, b.type], for_report.rescaled.get(tensor.modules[0], 1.0),
                                     tensor.permute_heads is not None))
    fallback = sorted({e.name for e in entries if e.type != OUTTYPES[outtype][0] and len(e.shape) > 1})
    if fallback:
        report.notes.append(f"{len(fallback)} tensor(s) written F16, their rows not a multiple of {outtype}'s block "
                            f"(as llama.cpp's converter does): {', '.join(fallback[:4])}"
                            f"{' ...' if len(fallback) > 4 else ''}")
    return report, entries, _producer(source, pairs, for_report.rescaled)


def _tied(view: Adapter, facts: BaseFacts) -> set[str]:
    """The output-head modules of ``view`` that are tied to the token embedding in the base GGUF."""
    heads = output_modules(list(view.modules), facts)
    if not heads:
        return set()
    tied = head_is_tied(facts)
    if tied is None:
        raise InputError(
            f"the adapter has a LoRA on the output head ({', '.join(heads)}), and whether the base ties it to the "
            "token embedding decides whether llama.cpp can load it (a tied head has no output.weight): give --base "
            "BASE (only its config.json is read)")
    return set(heads) if tied else set()


def _energies(source: AdapterFile) -> dict[str, float]:
    """Every module's delta energy under PEFT, one module read at a time."""
    view, energies = source.view, {}
    for name in view.modules:
        one = Adapter(view.config, {name: source.module(name)})
        energies.update(module_energies(one, name))
    return energies


def _pair_shapes(tensor: GgufTensor, new: Adapter) -> tuple[tuple[int, ...], tuple[int, ...]]:
    A, B = new.modules[tensor.modules[0]].A.shape, new.modules[tensor.modules[0]].B.shape
    if tensor.layout == "experts":
        n = len(tensor.modules)
        return (n, *A), (n, *B)
    if tensor.layout == "embedding":
        return (A[1], A[0]), tuple(B)
    return tuple(A), tuple(B)


def _producer(source: AdapterFile, pairs: dict[str, GgufTensor], rescaled: dict[str, float]):
    """``produce(entry)`` for :func:`write_gguf`: a pair's ``lora_a`` computes the pair; its ``lora_b`` follows."""
    pending: dict[str, torch.Tensor] = {}

    def produce(entry: GgufEntry) -> torch.Tensor:
        if entry.name in pending:
            return pending.pop(entry.name)
        tensor = pairs[entry.name]
        factors = []
        for name in tensor.modules:
            mod = source.module(name)
            work = AdapterModule(name, mod.A.to(torch.float32), mod.B.to(torch.float32), embedding=mod.embedding)
            if rescaled.get(name, 1.0) != 1.0:
                rescale_module(work, rescaled[name])
            factors.append((work.A, work.B))
        lora_a, lora_b = layout_factors(tensor, factors)
        pending[f"{tensor.name}.lora_b"] = lora_b
        return lora_a

    return produce


def _metadata(view: Adapter, report: ExportReport, outtype: str) -> list[tuple[str, object, str]]:
    """What llama.cpp's loader reads (general.type, adapter.type, adapter.lora.alpha), the file type, and an
    aLoRA's invocation tokens."""
    import gguf

    items = [
        (gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER, "STRING"),
        (gguf.Keys.Adapter.TYPE, "lora", "STRING"),
        (gguf.Keys.Adapter.LORA_ALPHA, report.alpha, "FLOAT32"),
        (gguf.Keys.General.FILE_TYPE, int(getattr(gguf.LlamaFileType, OUTTYPES[outtype][1])), "UINT32"),
        (gguf.Keys.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION, "UINT32"),
    ]
    tokens = getattr(view.config, "alora_invocation_tokens", None)
    if tokens:
        items.append((gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, [int(t) for t in tokens], "ARRAY"))
    return items


def _notes(report: ExportReport, written: Adapter, facts: BaseFacts) -> None:
    """Notes on what the file does differently from llama.cpp's converter, and where the facts came from."""
    transposed = [m for m, mod in written.modules.items() if written.config.fan_in_fan_out and mod.kind == "linear"]
    if transposed:
        report.notes.append(
            f"{len(transposed)} module(s) of layers stored (in, out) (GPT-2 Conv1D) written as PEFT's factors are, "
            "against the (out, in) weight the GGUF holds: llama.cpp applies them as PEFT does (its own converter "
            "transposes them)")
    if facts.source.startswith("the adapter's auto_mapping"):
        report.notes.append(f"architecture {facts.architecture} from the adapter's auto_mapping (no --base given)")
