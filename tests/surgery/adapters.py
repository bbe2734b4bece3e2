"""In-memory adapters for the surgery tests: random factors on Linear, Embedding and Conv layouts, any config."""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from lorasurg.config import LoraConfig
from lorasurg.engine.factors import LoraFactors, delta_matrix, lora_scale
from lorasurg.io.adapter import Adapter, AdapterModule
from lorasurg.targeting import rank_alpha

# module name -> (kind, base weight shape): linear (out, in), embedding (num, dim), conv (out, in, *k)
LAYERS = {
    "emb": ("embedding", (30, 12)),
    "lin": ("linear", (10, 12)),
    "wide": ("linear", (9, 40)),
    "c1": ("conv1d", (6, 4, 3)),
    "c2": ("conv2d", (5, 3, 3, 3)),
    "c3": ("conv3d", (4, 2, 2, 2, 2)),
    "point": ("conv2d", (5, 4, 1, 1)),
}


def factor_shapes(kind: str, weight_shape: tuple[int, ...], r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """PEFT's stored shapes of lora_A and lora_B for a base weight of ``weight_shape``."""
    if kind == "embedding":
        return (r, weight_shape[0]), (weight_shape[1], r)
    if kind == "linear":
        return (r, weight_shape[1]), (weight_shape[0], r)
    ones = (1,) * (len(weight_shape) - 2)
    return (r, *weight_shape[1:]), (weight_shape[0], r, *ones)


def make_adapter(layers: Mapping[str, tuple[str, tuple[int, ...]]] = LAYERS, *, r: int = 4, lora_alpha: float = 8,
                 seed: int = 0, dtype: torch.dtype = torch.float32, extra: Optional[dict] = None,
                 **config) -> Adapter:
    """An adapter with random A, B (and lora_B.bias / DoRA magnitudes when the config asks) on ``layers``
    (embeddings left out with ``lora_bias``)."""
    if config.get("lora_bias"):  # PEFT refuses lora_bias on embeddings
        layers = {n: spec for n, spec in layers.items() if spec[0] != "embedding"}
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=sorted(layers), **config)
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (kind, shape) in layers.items():
        rank, _ = rank_alpha(cfg, name)
        a_shape, b_shape = factor_shapes(kind, shape, rank)
        A = torch.randn(a_shape, generator=gen).to(dtype)
        B = torch.randn(b_shape, generator=gen).to(dtype)
        out_f = b_shape[0]
        bias = torch.randn(out_f, generator=gen).to(dtype) if cfg.lora_bias and kind != "embedding" else None
        magnitude = (torch.rand(out_f, generator=gen) + 0.5).to(dtype) if cfg.use_dora else None
        modules[name] = AdapterModule(name, A, B, bias, magnitude, kind == "embedding")
    adapter = Adapter(cfg, modules, dict(extra or {}))
    assert adapter.problems() == [], adapter.problems()
    return adapter


def module_scale(adapter: Adapter, name: str) -> float:
    r, alpha = adapter.rank_alpha(name)
    return lora_scale(r, alpha, adapter.config.use_rslora)


def dense_delta(adapter: Adapter, name: str) -> torch.Tensor:
    """``scale * B @ A`` of one module as a float64 ``(out, in)`` matrix (conv kernels flattened)."""
    mod = adapter.modules[name]
    factors = LoraFactors(mod.kind, mod.A.double(), mod.B.double(), module_scale(adapter, name))
    return delta_matrix(factors)


def dense_bias(adapter: Adapter, name: str) -> Optional[torch.Tensor]:
    """``scale * lora_B.bias`` in float64, or None."""
    mod = adapter.modules[name]
    return None if mod.bias is None else mod.bias.double() * module_scale(adapter, name)
