"""surgery.adapter_layout against PEFT 0.21.2 on transformers 5: exact per-module factors of a MoE fine-tune, laid
out by ``peft_layout``, load with no missing or unexpected keys and give the tuned model's logits.

The factors are the full-rank SVD of each checkpoint matrix's delta (so the adapter is exact), which isolates the
layout: names, zero-filled experts, fused target_parameters, the DeepSeek-V3 dense layers, gpt-oss's stacks.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from lorasurg.config import LoraConfig  # noqa: E402
from lorasurg.io.adapter import Adapter, AdapterModule  # noqa: E402
from lorasurg.io.checkpoint import Checkpoint  # noqa: E402
from lorasurg.surgery.adapter_layout import ExpertStack, peft_layout  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "moe"
IDS = torch.tensor([[3, 5, 7, 9, 11, 2, 8, 20, 30, 40, 50, 60]])
FORMS = {"qwen3_moe": "per-expert", "mixtral": "per-expert", "deepseek_v3": "per-expert",
         "qwen2_moe": "target-parameters", "gpt_oss": "target-parameters"}


def exact_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (r, in)``, ``B (out, r)`` with ``B @ A == delta`` at the delta's full rank, float64 then float32."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    keep = int((S > S[0] * 1e-10).sum()) if S.numel() and S[0] > 0 else 0
    root = S[:keep].sqrt()
    return (root[:, None] * Vh[:keep]).float(), (U[:, :keep] * root).float()


def changed_factors(family: str, root: Path = FIXTURES):
    """Per checkpoint module: exact factors of every changed 2-D weight the description calls linear; per stored
    3-D expert parameter: an ExpertStack; the other changed tensors as modules_to_save copies (``root``: the
    families' directory, fixtures/moe or fixtures/vlm)."""
    base, tuned = Checkpoint.open(root / family / "base"), Checkpoint.open(root / family / "tuned")
    description = base.describe()
    infos = description.modules
    factors, ranks, stacks, extra, saved = {}, {}, {}, {}, set()
    stored = {p.stored: p for p in description.parameters.values() if p.stored}
    for key in base.names():
        w0, w1 = base.get(key, dtype=torch.float64), tuned.get(key, dtype=torch.float64)
        if torch.equal(w0, w1):
            continue
        module, _, leaf = key.rpartition(".")
        if key in stored:
            info = stored[key]
            deltas = w1 - w0  # (E, in, out) for gpt-oss
            deltas = deltas.transpose(1, 2) if info.transposed else deltas  # (E, out, in)
            pairs = [exact_factors(d) for d in deltas]
            rank = max(a.shape[0] for a, _ in pairs)
            A = torch.zeros(info.experts, rank, deltas.shape[2])
            B = torch.zeros(info.experts, deltas.shape[1], rank)
            for e, (a, b) in enumerate(pairs):
                A[e, :a.shape[0]], B[e, :, :a.shape[0]] = a, b
            stacks[info.name] = ExpertStack(A, B, rank, float(rank))
        elif leaf == "weight" and infos.get(module) is not None and infos[module].kind == "linear" \
                and w0.dim() == 2:
            A, B = exact_factors(w1 - w0)
            factors[module] = AdapterModule(module, A, B)
            ranks[module] = (A.shape[0], float(A.shape[0]))
        else:
            saved.add(module)
    for module in saved:
        for key in tuned.names():
            if key.rpartition(".")[0] == module:
                extra[key] = tuned.get(key)
    return description, factors, ranks, stacks, extra, sorted(saved), base.config["model_type"]


def load(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", sorted(FORMS))
def test_layout_loads_exactly_in_peft(family, tmp_path):
    description, factors, ranks, stacks, extra, saved, model_type = changed_factors(family)
    layout = peft_layout(description, factors, ranks, model_type=model_type, stacks=stacks, extra=extra,
                         modules_to_save=saved)
    assert layout.form == FORMS[family]
    config = LoraConfig(**layout.fields, init_lora_weights=True, task_type="CAUSAL_LM")
    Adapter(config, layout.modules, layout.extra).save(tmp_path / "adapter")
    assert Adapter.load(tmp_path / "adapter").problems() == []
    model = load(FIXTURES / family / "base")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    troubles = [str(w.message) for w in caught if "missing" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()]
    assert troubles == []
    stored = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    if layout.form == "target-parameters":  # PEFT saves exactly what it loaded
        assert set(peft.get_peft_model_state_dict(pm, save_embedding_layers=False)) == stored
    with torch.no_grad():
        expected = load(FIXTURES / family / "tuned")(IDS).logits
        got = pm(IDS).logits
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max()), family


def test_deepseek_dense_layers_go_to_target_parameters():
    description, factors, ranks, stacks, extra, saved, model_type = changed_factors("deepseek_v3")
    layout = peft_layout(description, factors, ranks, model_type=model_type)
    assert "model.layers.0.mlp.gate_proj.weight" in layout.fields["target_parameters"]
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in layout.fields["target_parameters"]
    assert any("target_parameters" in note for note in layout.notes)
    # the unchanged expert of layer 0 does not exist here (layer 0 is dense); every layer-1 expert is present
    assert all(f"model.layers.1.mlp.experts.{e}.{p}" in layout.modules for e in range(4)
               for p in ("gate_proj", "up_proj", "down_proj"))


def test_an_unchanged_expert_gets_zero_factors_at_the_common_rank():
    description, factors, ranks, stacks, extra, saved, model_type = changed_factors("qwen3_moe")
    assert "model.layers.0.mlp.experts.3.up_proj" not in factors
    layout = peft_layout(description, factors, ranks, model_type=model_type)
    zero = layout.modules["model.layers.0.mlp.experts.3.up_proj"]
    assert zero.rank == layout.fields["r"] and not zero.A.any() and not zero.B.any()
    assert any("zero factors" in note for note in layout.notes)


def test_lora_bias_with_target_parameters_is_refused():
    from lorasurg.errors import UnsupportedError

    description, factors, ranks, stacks, extra, saved, model_type = changed_factors("qwen2_moe")
    with pytest.raises(UnsupportedError, match="lora_bias"):
        peft_layout(description, factors, ranks, model_type=model_type, refused=["lora_bias"])


def test_dense_layers_go_to_target_parameters_without_any_expert_factors():
    """PEFT converts target_modules by name on a converted type, experts or not: without expert factors, DeepSeek-V3's
    dense gate_proj must still be a target_parameters entry (as a target_modules entry PEFT refuses the config)."""
    description, factors, ranks, stacks, extra, saved, model_type = changed_factors("deepseek_v3")
    dense = {m: f for m, f in factors.items() if m not in description.experts}
    layout = peft_layout(description, dense, {m: ranks[m] for m in dense}, model_type=model_type)
    assert layout.form is None
    assert "model.layers.0.mlp.gate_proj.weight" in layout.fields["target_parameters"]
    assert not any(name.endswith("gate_proj") for name in layout.fields["target_modules"])
