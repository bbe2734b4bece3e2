"""Where each module of a PEFT adapter goes in a llama.cpp GGUF LoRA file, and in what layout.

Read from llama.cpp (the version of :data:`~lorasurg.consumers.rules.LLAMA_CPP`): ``src/llama-adapter.cpp``
(``llama_adapter_lora_init_impl``: what the loader reads and checks), ``src/llama-graph.cpp`` (``build_lora_mm``,
``build_lora_mm_id``, ``build_inp_embd``: where a LoRA is applied) and the base converter's per-architecture tensor
edits (``conversion/llama.py``: ``LlamaModel.permute``). Tensor names and architecture names come from the ``gguf``
package, llama.cpp's own library (``gguf.get_tensor_name_map``, ``gguf.MODEL_ARCH_NAMES``), never from a copy.

The file holds ``general.architecture`` (the base model's GGUF architecture, which the loader requires to equal
the model's), ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32; 0 means scale
1) and, for each adapted weight ``W`` of the base GGUF (``blk.0.attn_q.weight``), the pair ``W.lora_a``/``W.lora_b``.
Shapes below are PyTorch's (row-major; GGML's ``ne`` lists them reversed):

============  ===========================  ===========================  ==========================================
layout        ``lora_a``                   ``lora_b``                   what llama.cpp adds
============  ===========================  ===========================  ==========================================
linear        ``A`` (r, in)                ``B`` (out, r)               ``alpha / r * B @ (A @ x)``
embedding     ``A.T`` (vocab, r)           ``B`` (dim, r)               ``alpha / r * B @ A.T[token]``
experts       ``A_e`` stacked (E, r, in)   ``B_e`` stacked (E, out, r)  ``alpha / r * B_e @ (A_e @ x)`` per expert
============  ===========================  ===========================  ==========================================

``r`` is ``lora_b``'s last dimension; one rank for every expert of a stacked tensor. An embedding LoRA is applied
to the token embedding only (a position embedding is added without one), and only when the head is not tied to it
(llama.cpp finds a LoRA by tensor name, so a tied head's matrix product would take the embedding's pair and stop on
its shape); every other weight llama.cpp multiplies by takes one. Architectures whose base converter permutes the
rows of ``q_proj``/``k_proj`` (llama.cpp's rotary layout
for the Llama family, ``LlamaModel.permute``) get the same permutation on the rows of ``lora_b``: ``B' = P B``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch

from ..errors import InputError, UnsupportedError

__all__ = [
    "ARCHITECTURES", "GgufArchitecture", "BaseFacts", "GgufTensor", "base_facts", "architecture_for",
    "plan_tensors", "permute_rows", "layout_factors", "EXPERT_KEYS", "gguf_version", "output_modules", "head_is_tied",
    "saved_embeddings",
]

_SOURCE = "llama.cpp 0c1e57098"


@dataclass(frozen=True)
class GgufArchitecture:
    """One Hugging Face architecture as llama.cpp converts it.

    Attributes:
        arch: the ``gguf.MODEL_ARCH`` member's name (``LLAMA``); its GGUF name is ``gguf.MODEL_ARCH_NAMES[...]``.
        rope_permute: the base converter permutes the rows of ``q_proj``/``k_proj`` (``LlamaModel.permute``).
    """

    arch: str
    rope_permute: bool = False


#: Hugging Face architecture class -> how llama.cpp converts it (``@ModelBase.register`` in llama.cpp's
#: ``conversion/*.py``). Only these are written: each was checked for tensor edits that a LoRA must follow.
ARCHITECTURES: dict[str, GgufArchitecture] = {
    "LlamaForCausalLM": GgufArchitecture("LLAMA", rope_permute=True),
    "MistralForCausalLM": GgufArchitecture("LLAMA", rope_permute=True),
    "Qwen2ForCausalLM": GgufArchitecture("QWEN2"),
    "Qwen3ForCausalLM": GgufArchitecture("QWEN3"),
    "Qwen3MoeForCausalLM": GgufArchitecture("QWEN3MOE"),
    "GemmaForCausalLM": GgufArchitecture("GEMMA"),
    "Gemma2ForCausalLM": GgufArchitecture("GEMMA2"),
    "Gemma3ForCausalLM": GgufArchitecture("GEMMA3"),
    "Gemma3ForConditionalGeneration": GgufArchitecture("GEMMA3"),
    "Phi3ForCausalLM": GgufArchitecture("PHI3"),
    "GPT2LMHeadModel": GgufArchitecture("GPT2"),
}

#: config.json keys for the number of routed experts, first found wins.
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
#: prefixes of a language model inside a multimodal model, as llama.cpp's LoRA converter rewrites them.
_LM_PREFIXES = (("model.language_model.", "model."), ("language_model.", ""))
EXPERT_MODULE = re.compile(r"^(?P<head>.*\.experts)\.(?P<index>\d+)\.(?P<proj>[^.]+)$")
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class BaseFacts:
    """What a GGUF LoRA file needs to know about the base model that an adapter does not say.

    Attributes:
        architecture: the Hugging Face architecture class (``LlamaForCausalLM``), or None.
        layers: number of hidden layers, or None.
        tied: the output head is the input embedding (no ``output.weight`` in the base GGUF), or None.
        heads / kv_heads: attention heads (for the Llama-family row permutation), or None.
        experts: routed experts per MoE layer, or None.
        source: where the facts came from (a config.json path, or the adapter's config).
    """

    architecture: Optional[str]
    layers: Optional[int] = None
    tied: Optional[bool] = None
    heads: Optional[int] = None
    kv_heads: Optional[int] = None
    experts: Optional[int] = None
    source: str = "the adapter's config"


def base_facts(config: Mapping[str, Any], source: str) -> BaseFacts:
    """:class:`BaseFacts` from a Hugging Face ``config.json`` (a multimodal model's ``text_config`` too)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

    def get(*keys: str):
        for where in (text, config):
            for key in keys:
                if where.get(key) is not None:
                    return where[key]
        return None

    archs = config.get("architectures") or []
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    heads = get("num_attention_heads", "n_head")
    return BaseFacts(
        architecture=archs[0] if archs and isinstance(archs[0], str) else None,
        layers=get("num_hidden_layers", "n_layer"),
        tied=None if tied is None else bool(tied),
        heads=heads,
        kv_heads=get("num_key_value_heads") or heads,
        experts=get(*EXPERT_KEYS),
        source=source,
    )


def architecture_for(facts: BaseFacts) -> tuple[GgufArchitecture, str]:
    """``(GgufArchitecture, GGUF architecture name)`` of ``facts.architecture``.

    Raises:
        InputError: the architecture is not known (give the base model).
        UnsupportedError: an architecture with no entry in :data:`ARCHITECTURES`, or none in the installed gguf
            package, named with the ones that are.
    """
    import gguf

    name = facts.architecture
    if name is None:
        raise InputError(
            "the adapter does not say which architecture it is for (no auto_mapping.base_model_class, and "
            "base_model_name_or_path is not a local model directory): give --base BASE (only its config.json is read)")
    entry = ARCHITECTURES.get(name)
    arch = getattr(gguf.MODEL_ARCH, entry.arch, None) if entry is not None else None
    if entry is None or arch is None:
        raise UnsupportedError(
            f"architecture {name} ({facts.source}) has no GGUF name map here: lorasurg writes GGUF LoRA files for "
            f"{', '.join(sorted(ARCHITECTURES))} (gguf {gguf_version()}); fuse the adapter into its base (lorasurg "
            "fuse) and convert the fused model with llama.cpp's convert_hf_to_gguf.py instead")
    return entry, gguf.MODEL_ARCH_NAMES[arch]


def gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:  # pragma: no cover - the gguf package is a dependency
        return "unknown"


@dataclass
class GgufTensor:
    """One ``lora_a``/``lora_b`` pair of the GGUF file.

    Attributes:
        name: the base weight's GGUF name (``blk.0.attn_q.weight``); the pair is ``name.lora_a``/``name.lora_b``.
        modules: the adapter's modules it holds: one, or every expert's in expert order.
        layout: ``linear``, ``embedding`` or ``experts`` (see the module docstring).
        permute_heads: permute ``lora_b``'s rows as llama.cpp's converter permutes the base weight's, over this
            many heads; None for no permutation.
    """

    name: str
    modules: tuple[str, ...]
    layout: str
    permute_heads: Optional[int] = None
    notes: list[str] = field(default_factory=list)


def language_model_name(module: str) -> str:
    for prefix, replacement in _LM_PREFIXES:
        if module.startswith(prefix):
            return replacement + module[len(prefix):]
    return module


def layer_count(modules: Sequence[str], facts: BaseFacts) -> int:
    found = [int(m.group(1)) + 1 for m in map(_LAYER.search, modules) if m]
    return max([facts.layers or 0, *found, 1])


def plan_tensors(modules: Mapping[str, str], facts: BaseFacts, ranks: Mapping[str, int]
                 ) -> tuple[list[GgufTensor], dict[str, str]]:
    """Place every module of an adapter in the GGUF file (no tensor is read).

    Args:
        modules: ``{module name: kind}`` (``linear``, ``embedding``, ``conv2d``, ...) of the modules to write.
        facts: the base model's facts (architecture, layers, heads, experts).
        ranks: ``{module: rank}``, to check that the experts of a stacked tensor share one.

    Returns:
        ``(tensors, left_out)``: the pairs to write, in the adapter's module order, and ``{module: why}`` for
        modules llama.cpp places but never applies a LoRA to (a position embedding).

    Raises:
        UnsupportedError: the architecture has no GGUF name map (see :func:`architecture_for`).
        InputError: modules the name map cannot place, an expert layout with experts missing or of unequal
            ranks, the expert count or head counts unknown without BASE; every module concerned named.
    """
    import gguf

    entry, arch_name = architecture_for(facts)
    arch = getattr(gguf.MODEL_ARCH, entry.arch)
    names = gguf.get_tensor_name_map(arch, layer_count(list(modules), facts))
    placed: dict[str, GgufTensor] = {}
    experts: dict[str, dict[int, str]] = {}
    unplaced, left_out = [], {}
    for module, kind in modules.items():
        name = language_model_name(module)
        match = EXPERT_MODULE.match(name)
        lookup = f"{match['head']}.{match['proj']}" if match else name
        found = names.get_type_and_name(lookup, try_suffixes=(".weight",))
        if found is None:
            unplaced.append(module)
            continue
        kind_of, base = found
        target = f"{base}.weight"
        if kind == "embedding" and kind_of != gguf.MODEL_TENSOR.TOKEN_EMBD:
            left_out[module] = (f"llama.cpp applies embedding LoRA to the token embedding only; {target} is added "
                                f"without one ({_SOURCE}, src/llama-graph.cpp)")
            continue
        if kind_of == gguf.MODEL_TENSOR.TOKEN_EMBD:
            tied = head_is_tied(facts)
            if tied is None:
                raise InputError(
                    f"{module}: llama.cpp cannot load a token-embedding LoRA when the base's head is tied to the "
                    "embedding, and the adapter does not say whether it is: give --base BASE (only its config.json "
                    "is read)")
            if tied:
                left_out[module] = (
                    "the base's output head is the token embedding, and llama.cpp looks the LoRA up by tensor name "
                    "for the head's matrix product too, where a token-embedding pair does not fit: the graph stops "
                    f"(GGML_ASSERT ggml_can_mul_mat; {_SOURCE}, src/llama-graph.cpp build_lora_mm)")
                continue
        if match:
            experts.setdefault(target, {})[int(match["index"])] = module
            placed.setdefault(target, GgufTensor(target, (), "experts"))
            continue
        heads = None
        if entry.rope_permute and kind_of in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            heads = facts.heads if kind_of == gguf.MODEL_TENSOR.ATTN_Q else facts.kv_heads
            if heads is None:
                raise InputError(
                    f"{module}: llama.cpp permutes the rows of {arch_name} q/k projections per attention head, and "
                    "the adapter does not say how many heads there are: give --base BASE (only its config.json is "
                    "read)")
        placed[target] = GgufTensor(target, (module,), "embedding" if kind == "embedding" else "linear", heads)
    if unplaced:
        raise InputError(
            f"{len(unplaced)} module(s) have no tensor in a {arch_name} GGUF (gguf {gguf_version()}'s name map): "
            f"{', '.join(unplaced[:8])}{' and more' if len(unplaced) > 8 else ''}. llama.cpp has no such weight to "
            "put a LoRA on: leave them out (lorasurg rerank/merge keep what you give them; extract --exclude-modules), "
            "or fuse the adapter and convert the fused model")
    for target, by_index in experts.items():
        placed[target].modules = _expert_modules(target, by_index, facts, ranks)
    return list(placed.values()), left_out


def _expert_modules(target: str, by_index: dict[int, str], facts: BaseFacts,
                    ranks: Mapping[str, int]) -> tuple[str, ...]:
    """The experts of one stacked tensor in order: every expert present, one rank (else refused, named)."""
    first = by_index[min(by_index)]
    if facts.experts is None:
        raise InputError(
            f"{first} and the other experts of {target}: llama.cpp stacks every expert of a layer into one tensor, "
            "and the adapter does not say how many experts a layer has: give --base BASE (only its config.json is "
            f"read; {'/'.join(EXPERT_KEYS)})")
    missing = [e for e in range(int(facts.experts)) if e not in by_index]
    extra = [e for e in by_index if e >= int(facts.experts)]
    if missing or extra:
        raise InputError(
            f"{target}: llama.cpp stacks the LoRA of all {facts.experts} experts of the layer into one tensor, and the "
            f"adapter has {'no LoRA for expert(s) ' + ', '.join(map(str, missing[:16])) if missing else ''}"
            f"{'; ' if missing and extra else ''}"
            f"{'experts beyond the base: ' + ', '.join(map(str, extra)) if extra else ''}"
            f" (e.g. {first.rsplit('.', 2)[0]}.N.{first.rsplit('.', 1)[-1]}). Write a LoRA for every expert "
            "(zero factors for an untrained one), or leave this projection out")
    order = tuple(by_index[e] for e in range(int(facts.experts)))
    found = sorted({ranks[m] for m in order})
    if len(found) > 1:
        uneven = ", ".join(f"{m} (r={ranks[m]})" for m in order if ranks[m] != ranks[first])[:400]
        raise InputError(
            f"{target}: llama.cpp stacks the experts' LoRA into one tensor with one rank, and these experts' ranks "
            f"differ ({', '.join(map(str, found))}): {first} has r={ranks[first]}; {uneven}. Re-rank them to one "
            "rank first (lorasurg rerank --r N pads or truncates every module to N)")
    return order


def permute_rows(B: torch.Tensor, heads: int) -> torch.Tensor:
    """``P @ B``: the rows of ``B`` (out, r) reordered as llama.cpp's converter reorders a Llama q/k weight's rows.

    Within each head's ``d`` rows, the first half and the second half (rotate-half pairs ``(j, j + d/2)``) are
    interleaved to adjacent pairs ``(2j, 2j + 1)``: new row ``h*d + 2j + t`` is old row ``h*d + t*d/2 + j``.
    """
    out = B.shape[0]
    if out % (2 * heads):
        raise InputError(f"a q/k projection with {out} rows cannot be split into {heads} heads of rotary pairs: "
                         "is --base the adapter's base model?")
    return B.reshape(heads, 2, out // heads // 2, *B.shape[1:]).transpose(1, 2).reshape(B.shape)  # (out, r)


def layout_factors(tensor: GgufTensor, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_a, lora_b)`` of ``tensor`` from the PEFT factors ``(A, B)`` of its modules, in their order (see the
    module docstring's table); the factors are already scaled for llama.cpp's ``alpha / r``."""
    if tensor.layout == "experts":
        return (torch.stack([A for A, _ in factors]),  # (E, r, in)
                torch.stack([B for _, B in factors]))  # (E, out, r)
    (A, B), = factors
    if tensor.layout == "embedding":
        return A.T.contiguous(), B  # (vocab, r), (dim, r)
    if tensor.permute_heads is not None:
        B = permute_rows(B, tensor.permute_heads)
    return A, B


def _tensor_type(name: str, facts: BaseFacts, suffixes: tuple[str, ...] = (".weight",)):
    """The ``gguf.MODEL_TENSOR`` a module or tensor key maps to in ``facts``' architecture, or None."""
    import gguf

    entry, _ = architecture_for(facts)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, entry.arch), layer_count([name], facts))
    found = names.get_type_and_name(language_model_name(name), try_suffixes=suffixes)
    return None if found is None else found[0]


def output_modules(modules: Sequence[str], facts: BaseFacts) -> list[str]:
    """The modules that are the output head (``lm_head``, or whatever maps to GGUF's ``output``)."""
    import gguf

    return [m for m in modules
            if m.rsplit(".", 1)[-1] == "lm_head" or _tensor_type(m, facts) == gguf.MODEL_TENSOR.OUTPUT]


def head_is_tied(facts: BaseFacts) -> Optional[bool]:
    """Whether the base GGUF has no ``output.weight`` of its own (the head is the token embedding): always for an
    architecture without one (Gemma), else as config.json's ``tie_word_embeddings`` says; None when unknown."""
    import gguf

    entry, _ = architecture_for(facts)
    if gguf.MODEL_TENSOR.OUTPUT not in gguf.MODEL_TENSORS[getattr(gguf.MODEL_ARCH, entry.arch)]:
        return True
    return facts.tied


def saved_embeddings(keys: Sequence[str], facts: BaseFacts) -> list[str]:
    """The saved (``modules_to_save``) tensor keys that are a whole token embedding or output head."""
    import gguf

    wanted = (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT)
    return [k for k in keys if k.rsplit(".", 2)[-2:-1] == ["lm_head"]
            or _tensor_type(k, facts, (".weight", ".bias")) in wanted]
