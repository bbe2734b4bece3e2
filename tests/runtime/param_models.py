"""Models whose weights are bare ``nn.Parameter`` s, for the ``target_parameters`` tests (unit and parity).

``MlpUsingParameters`` and ``MLP`` rebuild the models of PEFT's "MLP using nn.Parameter" test cases
(``tests/test_custom_models.py`` in huggingface/peft: ``_LinearUsingParameter`` stores its weight ``(in, out)``
and computes ``x @ W + b``); the MoE models are transformers 5's Qwen3-MoE, Mixtral and gpt-oss with tiny configs
(hidden 32, 2 layers, 4 experts; an intermediate size of 12 so that no two dimensions of an expert parameter are
equal, and gpt-oss's ``(E, in, out)`` layout cannot pass for the other one). Each builder reseeds torch's global RNG.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

HIDDEN, INTER, EXPERTS, LAYERS, VOCAB = 32, 12, 4, 2, 64


class _LinearUsingParameter(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight  # (..., in) @ (in, out) -> (..., out)
        return out if self.bias is None else out + self.bias


class MlpUsingParameters(nn.Module):
    """PEFT's ``MlpUsingParameters``: two ``_LinearUsingParameter`` layers (10 -> 20 -> 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = _LinearUsingParameter(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = _LinearUsingParameter(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x.float())))))


class MLP(nn.Module):
    """PEFT's ``MLP``: ``nn.Linear`` 10 -> 20 -> 2."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x.float())))))


def mlp_params(seed: int = 0) -> MlpUsingParameters:
    torch.manual_seed(seed)
    return MlpUsingParameters().eval()


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def mlp_input(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 10, generator=torch.Generator().manual_seed(seed))


def qwen3_moe(seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, moe_intermediate_size=INTER,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=EXPERTS, num_experts_per_tok=2, max_position_embeddings=32)
    return Qwen3MoeForCausalLM(cfg).eval()


def mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=EXPERTS,
                        num_experts_per_tok=2, max_position_embeddings=32)
    return MixtralForCausalLM(cfg).eval()


def gpt_oss(seed: int = 0):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=EXPERTS,
                       num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"])
    return GptOssForCausalLM(cfg).eval()


def token_input(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


# (names in the transformers-4 checkpoint layout: MoE block, gate, up, down, router)
PER_EXPERT_NAMES = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj", "gate"),
                    "mixtral": ("block_sparse_moe", "w1", "w3", "w2", "gate")}


def per_expert_tensors(kind: str, r: int = 2, seed: int = 3, *, ranks: Optional[dict] = None,
                       skip: Optional[set] = None, router: bool = True) -> dict[str, torch.Tensor]:
    """A LoRA state dict with transformers-4 per-expert keys for ``kind``'s tiny model (plus q_proj and, with
    ``router``, the router): ``ranks[(layer, expert, proj)]`` overrides r, ``skip`` holds ``(layer, expert, proj)``
    left out."""
    block, gate, up, down, gate_name = PER_EXPERT_NAMES[kind]
    gen = torch.Generator().manual_seed(seed)
    state = {}

    def add(module: str, out: int, inp: int, rank: int = r) -> None:
        state[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) * 0.3
        state[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.3

    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        add(prefix + "self_attn.q_proj", 32, HIDDEN)
        if router:
            add(f"{prefix}{block}.{gate_name}", EXPERTS, HIDDEN)
        for e in range(EXPERTS):
            for proj, (out, inp) in ((gate, (INTER, HIDDEN)), (up, (INTER, HIDDEN)), (down, (HIDDEN, INTER))):
                if (layer, e, proj) not in (skip or set()):
                    add(f"{prefix}{block}.experts.{e}.{proj}", out, inp, (ranks or {}).get((layer, e, proj), r))
    return state


def write_per_expert_adapter(kind: str, directory: Optional[Path] = None, *, config: Optional[dict] = None,
                             **tensor_kwargs) -> Path:
    """Write a per-expert-key adapter (:func:`per_expert_tensors`) with PEFT's writers; returns its directory."""
    import peft
    from safetensors.torch import save_file

    block, gate, up, down, gate_name = PER_EXPERT_NAMES[kind]
    directory = Path(directory or tempfile.mkdtemp())
    settings = dict(r=tensor_kwargs.get("r", 2), lora_alpha=4, target_modules=["q_proj", gate, up, down, gate_name])
    peft.LoraConfig(**{**settings, **(config or {})}).save_pretrained(str(directory))
    save_file(per_expert_tensors(kind, **tensor_kwargs), str(directory / "adapter_model.safetensors"))
    return directory
