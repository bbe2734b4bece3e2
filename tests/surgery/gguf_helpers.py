"""Tiny bases and hand-made adapters for the GGUF export tests, and llama.cpp's reading of a GGUF LoRA file.

Bases: the fixtures' Llama, Qwen2 and GPT-2, and Gemma 2, Gemma 3, Phi-3 (fused ``qkv_proj``/``gate_up_proj``) and
Qwen3-MoE (per-expert checkpoint keys) built with transformers (seeded) and saved with ``save_pretrained``.

:func:`gguf_deltas` applies llama.cpp's rules to a file read back with ``gguf.GGUFReader`` (independently of
lorasurg's writer): scale ``alpha / r`` with ``r`` = ``lora_b``'s last dimension; the token embedding's ``lora_a``
transposed; experts one by one; the Llama-family q/k row permutation of llama.cpp's converter undone
(``LlamaModel.permute`` in llama.cpp's ``conversion/llama.py``: rows ``(heads, 2, d/2)`` swapped to
``(heads, d/2, 2)``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lorasurg import Checkpoint, LoraConfig
from lorasurg.io.adapter import Adapter, AdapterModule

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = {arch: ROOT / "fixtures" / f"tiny-{arch}" / "base" for arch in ("llama", "qwen2", "gpt2")}


def build_base(arch: str, directory: Path) -> Path:
    """A tiny ``arch`` model saved with ``save_pretrained`` into ``directory`` (seeded)."""
    import transformers as tf

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128)
    configs = {
        "gemma2": lambda: tf.Gemma2Config(**small, head_dim=8),
        "gemma3": lambda: tf.Gemma3TextConfig(**small, head_dim=8),
        "phi3": lambda: tf.Phi3Config(**small, pad_token_id=0),
        "qwen3moe": lambda: tf.Qwen3MoeConfig(**small, head_dim=8, moe_intermediate_size=16, num_experts=4,
                                              num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
    }
    classes = {"gemma2": tf.Gemma2ForCausalLM, "gemma3": tf.Gemma3ForCausalLM, "phi3": tf.Phi3ForCausalLM,
               "qwen3moe": tf.Qwen3MoeForCausalLM}
    torch.manual_seed(0)
    classes[arch](configs[arch]()).save_pretrained(directory)
    return directory


def random_adapter(base: Path, *, r: int = 4, seed: int = 0, targets: Optional[list[str]] = None,
                   mixed: bool = True, **config) -> Adapter:
    """Random factors (B nonzero) on every linear and embedding weight of ``base`` (or the ``targets`` leaves),
    per expert for MoE keys. With ``mixed``, layer 1 has rank ``r - 1`` and alpha ``3 * r`` (scale 3 vs 2):
    ranks and scales differ, so the export must rescale."""
    gen = torch.Generator().manual_seed(seed)
    with Checkpoint.open(base) as ckpt:
        infos = ckpt.module_infos()
        shapes = {n: ckpt.shape(n) for n in ckpt.names()}
    modules, rank_pattern, alpha_pattern = {}, {}, {}
    for key, shape in shapes.items():
        name = key[: -len(".weight")]
        leaf = name.rsplit(".", 1)[-1]
        info = infos.get(name)
        expert = ".experts." in name
        kind = "embedding" if info is not None and info.kind == "embedding" else "linear"
        if not key.endswith(".weight") or len(shape) != 2 or "norm" in name:
            continue
        if not expert and (info is None or info.kind not in ("linear", "embedding")):
            continue
        if targets is not None and leaf not in targets:
            continue
        rank = r - 1 if mixed and (".layers.1." in name or ".h.1." in name) else r
        if rank != r:
            rank_pattern[f"^{name}$"] = rank
            alpha_pattern[f"^{name}$"] = 3 * r
        if kind == "embedding":
            A, B = torch.randn(rank, shape[0], generator=gen), torch.randn(shape[1], rank, generator=gen)
        else:
            out, inp = (shape[1], shape[0]) if info is not None and info.fan_in_fan_out else shape
            A, B = torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen)
        modules[name] = AdapterModule(name, A * 0.1, B * 0.1, embedding=kind == "embedding")
    leaves = sorted({n.rsplit(".", 1)[-1] for n in modules})
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=leaves, rank_pattern=rank_pattern,
                     alpha_pattern=alpha_pattern, base_model_name_or_path=str(base), **config)
    return Adapter(cfg, modules)


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(metadata, {tensor name: float32 tensor})`` read with ``gguf.GGUFReader`` and ``gguf.quants.dequantize``."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {k: (f.contents(), f.types) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        shape = tuple(reversed(t.shape.tolist()))  # GGML's ne, reversed
        tensors[t.name] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    return meta, tensors


def unpermute(B: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's converter's row permutation of a Llama q/k weight (rows ``(h, d/2, 2)`` -> ``(h, 2, d/2)``)."""
    out = B.shape[0]
    return B.reshape(heads, out // heads // 2, 2, -1).transpose(1, 2).reshape(B.shape)


def gguf_deltas(path: Path, heads: Optional[dict[str, int]] = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(metadata, {GGUF weight name (+ "[e]" per expert): delta})``: what llama.cpp adds to each weight, in the
    weight's PyTorch orientation ``(out, in)`` (the token embedding: ``(dim, vocab)``). ``heads``: ``{"attn_q": n,
    "attn_k": n_kv}`` to undo the Llama-family row permutation."""
    meta, tensors = read_gguf(path)
    alpha = float(meta["adapter.lora.alpha"][0])
    deltas = {}
    for name in tensors:
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        a, b = tensors[name], tensors[f"{base}.lora_b"]
        scale = alpha / b.shape[-1] if alpha else 1.0
        if a.dim() == 3:
            for e in range(a.shape[0]):
                deltas[f"{base}[{e}]"] = scale * b[e].double() @ a[e].double()  # (out, r) @ (r, in)
            continue
        for part, n in (heads or {}).items():
            if f".{part}." in base:
                b = unpermute(b, n)
        if base.endswith("token_embd.weight"):
            deltas[base] = scale * b.double() @ a.double().T  # (dim, r) @ (r, vocab)
        else:
            deltas[base] = scale * b.double() @ a.double()  # (out, r) @ (r, in)
    return meta, deltas


def config_of(base: Path) -> dict:
    return json.loads((base / "config.json").read_text())
