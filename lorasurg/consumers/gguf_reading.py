"""How llama.cpp's loader reads a GGUF LoRA file's tensors, and which tensors a base model offers it.

* :func:`pair_tensors`: the loader's pairing (``llama_adapter_lora_init_impl``): ``W.lora_a``/``W.lora_b`` make the
  pair for ``W``; ``*_norm.weight`` is skipped; any other name stops the load ("unexpected suffix").
* :func:`base_tensors`: the weights a base checkpoint becomes in GGUF, from its tensor keys and shapes (headers only),
  with the shapes a pair must have (:mod:`lorasurg.consumers.gguf`'s layout table): per-expert keys stacked.
* :func:`pair_factors`: a pair as PEFT-oriented factors ``(A (r, in), B (out, r))``, one per expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from .gguf import EXPERT_MODULE, BaseFacts, language_model_name, layer_count, architecture_for, head_is_tied

__all__ = ["Pairs", "BaseTensor", "pair_tensors", "base_tensors", "pair_factors", "pair_layout"]


@dataclass
class Pairs:
    """A file's tensor names as the loader groups them.

    Attributes:
        pairs: ``{base weight name: {"a": tensor name, "b": tensor name}}`` (one key missing: an incomplete pair).
        norms: ``*_norm.weight`` tensors (the loader skips them).
        unexpected: any other name (the loader refuses the file).
    """

    pairs: dict[str, dict[str, str]] = field(default_factory=dict)
    norms: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def pair_tensors(names: Sequence[str]) -> Pairs:
    """Group tensor names as llama.cpp's loader does (see the module docstring)."""
    found = Pairs()
    for name in names:
        for suffix, slot in ((".lora_a", "a"), (".lora_b", "b")):
            if name.endswith(suffix):
                found.pairs.setdefault(name[: -len(suffix)], {})[slot] = name
                break
        else:
            (found.norms if name.endswith("_norm.weight") else found.unexpected).append(name)
    return found


@dataclass(frozen=True)
class BaseTensor:
    """A base weight as llama.cpp holds it: the GGUF name, the layout a LoRA on it has, ``(out, in)`` (for the token
    embedding ``(dim, vocab)``), the expert count of a stacked tensor, and the checkpoint keys it comes from."""

    name: str
    layout: str
    out: int
    inp: int
    experts: Optional[int]
    keys: tuple[str, ...]


def base_tensors(shapes: Mapping[str, Sequence[int]], fan_in_fan_out: Sequence[str], facts: BaseFacts
                 ) -> dict[str, BaseTensor]:
    """``{GGUF name: BaseTensor}`` for the 2-D weights of a checkpoint (``shapes``: key -> shape), mapped with the
    gguf package's name map; ``fan_in_fan_out``: modules stored ``(in, out)`` (GPT-2 ``Conv1D``). A tied head has
    no ``output.weight``."""
    import gguf

    entry, _ = architecture_for(facts)
    arch = getattr(gguf.MODEL_ARCH, entry.arch)
    names = gguf.get_tensor_name_map(arch, layer_count(list(shapes), facts))
    tied = head_is_tied(facts)
    flipped = set(fan_in_fan_out)
    found: dict[str, BaseTensor] = {}
    for key, shape in shapes.items():
        if len(shape) != 2 or not key.endswith(".weight"):
            continue
        module = language_model_name(key[: -len(".weight")])
        match = EXPERT_MODULE.match(module)
        mapped = names.get_type_and_name(f"{match['head']}.{match['proj']}" if match else module)
        if mapped is None or (mapped[0] == gguf.MODEL_TENSOR.OUTPUT and tied):
            continue
        out, inp = (shape[1], shape[0]) if key[: -len(".weight")] in flipped else (shape[0], shape[1])
        name = f"{mapped[1]}.weight"
        if mapped[0] == gguf.MODEL_TENSOR.TOKEN_EMBD:
            found[name] = BaseTensor(name, "embedding", inp, out, None, (key,))  # (vocab, dim) -> out=dim, in=vocab
        elif match:
            prev = found.get(name)
            keys = (*(prev.keys if prev else ()), key)
            found[name] = BaseTensor(name, "experts", out, inp, len(keys), keys)
        else:
            found[name] = BaseTensor(name, "linear", out, inp, None, (key,))
    return found


def pair_layout(name: str, a_shape: Sequence[int]) -> str:
    """``embedding`` for the token embedding's pair, ``experts`` for a 3-D pair, else ``linear``."""
    if name.endswith("token_embd.weight"):
        return "embedding"
    return "experts" if len(a_shape) == 3 else "linear"


def pair_factors(name: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(A (r, in), B (out, r)), ...]``: the pair's factors in PEFT's orientation, one per expert, so that llama.cpp
    adds ``alpha / r * B @ A`` (the token embedding's ``lora_a`` is stored transposed)."""
    layout = pair_layout(name, lora_a.shape)
    if layout == "embedding":
        return [(lora_a.T, lora_b)]
    if layout == "experts":
        return list(zip(lora_a.unbind(0), lora_b.unbind(0)))
    return [(lora_a, lora_b)]
