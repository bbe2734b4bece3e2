"""``lorasurg validate FILE.gguf --base BASE``: a GGUF LoRA file checked as llama.cpp's loader reads it.

The loader (:mod:`lorasurg.consumers.gguf`, :mod:`lorasurg.consumers.gguf_reading`) refuses a file whose
``general.type`` is not ``adapter`` or ``adapter.type`` not ``lora`` (``gguf-metadata``), whose architecture is not
the model's (``gguf-architecture``), with a tensor that is neither half of a ``lora_a``/``lora_b`` pair nor a norm
(``gguf-tensor-unexpected``), a pair missing a half (``module-incomplete``), a pair for a weight the base has not
(``module-missing``) or of the wrong shape (``shape-mismatch``), or halves of different ranks
(``rank-inconsistent``), or a token-embedding pair when BASE's head is tied to the embedding (``consumer-refuses``:
llama.cpp applies it to the head's product too and stops). Without ``adapter.lora.alpha`` (or with 0) it applies
scale 1 (``gguf-alpha``); it skips
norms (``consumer-drops``). Values: NaN/inf (``value-nonfinite``), all-zero ``lora_b`` (``untrained``). Only BASE's
checkpoint headers and config.json are read.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from ...consumers.gguf import architecture_for, base_facts, head_is_tied
from ...consumers.gguf_reading import base_tensors, pair_layout, pair_tensors
from ...errors import LorasurgError
from ...findings import Finding
from ...io.checkpoint import read_model_config
from ...io.gguf import GgufFile, open_gguf
from .subject import open_base

__all__ = ["check_gguf"]

PathLike = Union[str, "os.PathLike[str]"]
_HOW = "write the file with lorasurg export --to gguf"


def check_gguf(path: PathLike, base: Optional[PathLike] = None) -> list[Finding]:
    """Every finding for the GGUF LoRA file at ``path`` (see the module docstring), BASE's checks included.

    Raises:
        InputError: the file cannot be read, or BASE cannot be opened.
    """
    f = open_gguf(path)
    found = _metadata(f)
    pairs = pair_tensors(list(f.entries))
    found += [Finding("gguf-tensor-unexpected", n, "is neither a .lora_a/.lora_b tensor nor a *_norm.weight: "
                      "llama.cpp's loader stops with 'LoRA tensor has unexpected suffix'", f"remove it ({_HOW})")
              for n in pairs.unexpected]
    if pairs.norms:
        found.append(Finding("consumer-drops", f"llama.cpp: {pairs.norms[0]}" + (f" and {len(pairs.norms) - 1} more"
                                                                                 if len(pairs.norms) > 1 else ""),
                             f"llama.cpp's loader skips norm weights ({len(pairs.norms)}): they are not applied",
                             "fuse the adapter and convert the fused model if the norms matter", tuple(pairs.norms)))
    complete = {}
    for name, halves in pairs.pairs.items():
        if set(halves) != {"a", "b"}:
            found.append(Finding("module-incomplete", name, f"has only {name}.lora_{''.join(halves)}: "
                                 "llama.cpp's loader stops ('LoRA tensor pair is missing one component')", _HOW))
            continue
        a, b = f.entries[halves["a"]].shape, f.entries[halves["b"]].shape
        problem = _rank_problem(name, a, b)
        if problem:
            found.append(Finding("rank-inconsistent", name, problem, _HOW))
        else:
            complete[name] = (a, b)
    found += _values(f, pairs.pairs)
    if base is None:
        found.append(Finding("check-skipped", "--base", "no base model was given: the architecture and the tensor "
                             "shapes were not checked", "give --base BASE (the model the adapter was trained on)"))
        return found
    return found + _against_base(f, complete, base)


def _metadata(f: GgufFile) -> list[Finding]:
    found = []
    for key, want in (("general.type", "adapter"), ("adapter.type", "lora")):
        if f.get(key) != want:
            found.append(Finding("gguf-metadata", key, f"is {f.get(key)!r}; llama.cpp's loader refuses a LoRA "
                                 f"file unless it is {want!r}", _HOW))
    if not f.get("general.architecture"):
        found.append(Finding("gguf-metadata", "general.architecture", "is missing; llama.cpp's loader compares it with "
                             "the model's and refuses the file", _HOW))
    alpha = f.get("adapter.lora.alpha")
    if not alpha:
        found.append(Finding("gguf-alpha", "adapter.lora.alpha", f"is {alpha!r}: llama.cpp then applies scale 1 to "
                             "every pair, not alpha / r",
                             "write alpha so that alpha / r is each pair's scale (lorasurg export)"))
    return found


def _rank_problem(name: str, a, b) -> Optional[str]:
    layout = pair_layout(name, a)
    if len(a) != len(b) or len(a) not in (2, 3) or (len(a) == 3) != (layout == "experts"):
        return f"lora_a is {tuple(a)} and lora_b is {tuple(b)}: not a pair of matrices (or of stacked experts)"
    if layout == "embedding":
        ranks = (a[1], b[1])
    elif layout == "experts":
        ranks = (a[1], b[2])
    else:
        ranks = (a[0], b[1])
    if ranks[0] != ranks[1] or (layout == "experts" and a[0] != b[0]):
        return f"lora_a is {tuple(a)} but lora_b is {tuple(b)}: their ranks (or expert counts) differ"
    return None


def _values(f: GgufFile, pairs: dict[str, dict[str, str]]) -> list[Finding]:
    found, zero, total = [], 0, 0
    for name, halves in pairs.items():
        for half, tensor in halves.items():
            values = f.read(tensor)
            bad = int((~torch.isfinite(values)).sum())
            if bad:
                found.append(Finding("value-nonfinite", tensor, f"{bad} NaN/inf among its {values.numel()} values",
                                     "the adapter is broken: export it again from a finite adapter"))
            if half == "b":
                total += 1
                zero += int(not values.any())
    if total and zero == total:
        found.append(Finding("untrained", "lora_b", f"all zeros in every one of the {total} pairs: the adapter changes "
                             "nothing", "export the trained adapter, not its initial state"))
    return found


def _against_base(f: GgufFile, complete: dict, base: PathLike) -> list[Finding]:
    config, where = read_model_config(base)
    facts = base_facts(config, str(where))
    try:
        _, arch = architecture_for(facts)
    except LorasurgError as err:
        return [Finding("check-skipped", "--base", f"the tensors were not checked against BASE: {err}",
                        "check the file with llama.cpp itself")]
    found = []
    if f.get("general.architecture") != arch:
        found.append(Finding("gguf-architecture", "general.architecture",
                             f"is {f.get('general.architecture')!r} but BASE ({facts.architecture}) is {arch!r} in "
                             "GGUF: "
                             "llama.cpp refuses the file ('model arch and LoRA arch mismatch')",
                             "export the adapter against its own base model"))
    described = open_base(base)
    flipped = [m for m, info in described.modules.items() if info.fan_in_fan_out]
    expected = base_tensors(described.checkpoint_shapes, flipped, facts)  # llama.cpp maps checkpoint names
    for name, (a, b) in complete.items():
        want = expected.get(name)
        if want is None:
            tied = " (BASE ties its head to the embedding: no output.weight)" if name == "output.weight" else ""
            found.append(Finding("module-missing", name, f"BASE has no {arch} weight {name}{tied}: llama.cpp's "
                                 "loader stops ('does not exist in base model')",
                                 "export the adapter against its own base model"))
            continue
        if want.layout == "embedding" and head_is_tied(facts):
            found.append(Finding("consumer-refuses", f"llama.cpp: {name}",
                                 "BASE ties its head to the token embedding: llama.cpp applies this pair to the head's "
                                 "matrix product too, where it does not fit, and stops (GGML_ASSERT ggml_can_mul_mat)",
                                 "leave the token-embedding LoRA out (lorasurg export does)"))
            continue
        need_a, need_b = _needed(want, a, b)
        if (tuple(a), tuple(b)) != (need_a, need_b):
            found.append(Finding("shape-mismatch", name, f"lora_a is {tuple(a)} and lora_b {tuple(b)}; BASE's {name} "
                                 f"({want.layout}) needs {need_a} and {need_b}",
                                 "export the adapter against its own base"))
    return found


def _needed(want, a, b) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes a pair on ``want`` must have, at the pair's own rank."""
    r = b[-1]
    if want.layout == "embedding":
        return (want.inp, r), (want.out, r)
    if want.layout == "experts":
        return (want.experts, r, want.inp), (want.experts, want.out, r)
    return (r, want.inp), (want.out, r)
