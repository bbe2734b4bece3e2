"""Extracted adapters of mixture-of-experts models in PEFT 0.21.2 on transformers 5 (fixtures/moe/*).

For each family (Qwen3-MoE, Mixtral, Qwen2-MoE with a shared expert, DeepSeek-V3 dense-then-MoE, gpt-oss with its
experts stored fused and transposed) the extracted adapter

* loads with no missing or unexpected keys;
* is, as PEFT applies it (``merge_and_unload``, in the model's fused parameters), within 1.01x of the optimal
  rank-r error on every changed matrix — every expert of every projection separately — and exact on what it saves
  whole (routers, norms);
* gives the logits of BASE with every LoRA-able matrix replaced by its optimal rank-r truncation (an exact SVD
  extract at rank r), and TUNED's own logits at the delta's full rank.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

from lorasurg.io.checkpoint import Checkpoint  # noqa: E402
from lorasurg.surgery.adapter_layout import model_tensor_name  # noqa: E402
from lorasurg.surgery.extract import extract_to_dir  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "moe"
FAMILIES = ["qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"]
IDS = torch.tensor([[3, 5, 7, 9, 11, 2, 8, 20, 30, 40, 50, 60]])


def load(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def load_adapter(base: Path, adapter: Path):
    """PeftModel on ``base`` and the missing/unexpected-key warnings PEFT gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(load(base), adapter).eval()
    troubles = [str(w.message) for w in caught
                if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    return pm, troubles


def matrices(model: nn.Module, name: str, delta: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The matrices extract fits one LoRA to, as ``(label, index into the parameter)``: a Linear's or an
    Embedding's weight whole; each expert of a 3-D expert parameter, and each of the two projections a
    non-transposed ``gate_up_proj`` fuses ([gate; up]); nothing for other parameters (saved whole)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, (nn.Linear, nn.Embedding)) and leaf == "weight":
        return [(name, (slice(None),))]
    if delta.dim() != 3:
        return []
    parts = 2 if leaf == "gate_up_proj" and not getattr(module, "is_transposed", False) else 1
    rows = delta.shape[1] // parts
    return [(f"{name}[{e}][{p}]", (e, slice(p * rows, (p + 1) * rows))) for e in range(delta.shape[0])
            for p in range(parts)]


def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """The optimal rank-``rank`` approximation of a matrix (float64 SVD)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, S.numel())
    return ((U[:, :k] * S[:k]) @ Vh[:k]).to(delta.dtype)  # (m, k) @ (k, n)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_matrix_and_expert_within_one_percent_of_optimal_in_peft(family, tmp_path):
    base, tuned = FIXTURES / family / "base", FIXTURES / family / "tuned"
    r = 4
    extract_to_dir(base, tuned, tmp_path / "adapter", r=r, device="cpu")
    pm, troubles = load_adapter(base, tmp_path / "adapter")
    assert troubles == []
    stored = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    if pm.peft_config["default"].target_parameters and not any(".experts." in k and ".experts.0." in k
                                                                for k in stored):
        # target_parameters as PEFT writes them: PEFT saves back exactly the keys it loaded
        assert set(peft.get_peft_model_state_dict(pm, save_embedding_layers=False)) == stored
    merged = pm.merge_and_unload().state_dict()
    model_b, model_t = load(base), load(tuned)
    b, t = model_b.state_dict(), model_t.state_dict()
    checked: list[str] = []
    for name, w0 in b.items():
        delta = t[name] - w0
        if not delta.any():
            continue
        pieces = matrices(model_b, name, delta)
        if not pieces:  # saved whole (routers, norms): exact
            torch.testing.assert_close(merged[name], t[name], rtol=0, atol=0, msg=name)
            continue
        for label, index in pieces:
            d = delta[index]
            if not d.any():
                continue
            error = float(torch.linalg.vector_norm((merged[name] - t[name])[index].double()))
            optimal = float(torch.linalg.vector_norm((d - truncated(d, r)).double()))
            assert error <= 1.01 * optimal + 1e-6 * float(torch.linalg.vector_norm(d)), (label, error / optimal)
            checked.append(label)
    experts = [label for label in checked if "][" in label]  # one per changed expert and projection
    moe_layers = sum(1 for p in b.values() if p.dim() == 3) // 2
    assert len(experts) >= moe_layers * (4 * 2 - 1) and len(checked) > len(experts), checked


def _truncated_model(base: Path, tuned: Path, r: int):
    """BASE with every LoRA-able matrix (each expert of each projection) at TUNED's optimal rank-r truncation and
    everything else TUNED's: what an exact-SVD extract at rank r stands for."""
    model, model_t = load(base), load(tuned)
    t = model_t.state_dict()
    state = {}
    for name, w0 in model.state_dict().items():
        delta = t[name] - w0
        pieces = matrices(model, name, delta) if delta.any() else []
        if not pieces:
            state[name] = t[name]
            continue
        w = w0.clone()
        for _, index in pieces:
            w[index] += truncated(delta[index], r)
        state[name] = w
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_gives_the_truncated_model_and_at_full_rank_the_tuned_one(family, tmp_path):
    base, tuned = FIXTURES / family / "base", FIXTURES / family / "tuned"
    for r in (4, 256):
        out = tmp_path / f"r{r}"
        extract_to_dir(base, tuned, out, r=r, svd="exact", device="cpu")
        pm, troubles = load_adapter(base, out)
        assert troubles == []
        reference = logits(_truncated_model(base, tuned, r) if r < 256 else load(tuned))
        got = logits(pm)
        assert float((got - reference).abs().max()) <= 1e-4 * float(reference.abs().max()), (family, r)
    # and the truncation matters: rank 4 is not the tuned model
    assert float((logits(_truncated_model(base, tuned, 4)) - logits(load(tuned))).abs().max()) > 1e-2


def test_a_subset_of_projections_loads_with_the_others_zero(tmp_path):
    """--target-modules gate_proj,up_proj: PEFT needs down_proj's LoRA too (missing keys otherwise), so the layout
    adds it with zero factors; the adapted model changes only the gate/up projections."""
    base, tuned = FIXTURES / "qwen3_moe" / "base", FIXTURES / "qwen3_moe" / "tuned"
    extract_to_dir(base, tuned, tmp_path / "a", r=256, svd="exact", target_modules=["gate_proj", "up_proj"])
    pm, troubles = load_adapter(base, tmp_path / "a")
    assert troubles == []
    merged = pm.merge_and_unload().state_dict()
    b, t = load(base).state_dict(), load(tuned).state_dict()
    for layer in (0, 1):
        name = f"model.layers.{layer}.mlp.experts"
        torch.testing.assert_close(merged[f"{name}.gate_up_proj"], t[f"{name}.gate_up_proj"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged[f"{name}.down_proj"], b[f"{name}.down_proj"], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_for_vllm_per_expert_keys_are_loaded_by_peft_too(family, tmp_path):
    """--for vllm writes the experts per expert (vLLM's layout for these 2-D MoE classes). PEFT loads that file too,
    experts included, with no missing or unexpected key: by its conversion where it converts the config, and on
    Qwen2-MoE, where it converts only the keys, by the config's target_parameters in the converted form. At full
    rank PEFT's merged experts (the fused parameters) are TUNED's, and so is every other adapted matrix; what vLLM
    cannot carry (routers, norms, embeddings saved whole) is left out by the user's choice, so those stay BASE's."""
    base, tuned = FIXTURES / family / "base", FIXTURES / family / "tuned"
    report = extract_to_dir(base, tuned, tmp_path / "a", r=256, svd="exact", device="cpu", consumers="vllm")
    stored = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert any(".experts.0." in k for k in stored)  # per-expert keys
    pm, troubles = load_adapter(base, tmp_path / "a")
    assert troubles == []
    merged = pm.merge_and_unload().state_dict()
    b, t = load(base).state_dict(), load(tuned).state_dict()
    description = Checkpoint.open(base).describe()
    dropped = {model_tensor_name(description, o.name) for o in report.outcomes if o.outcome == "dropped"}
    assert dropped and not [n for n in dropped if "expert" in n]  # the experts are all carried
    experts = [n for n, p in b.items() if p.dim() == 3]
    assert experts
    for name in b:
        want = b[name] if name in dropped else t[name]
        torch.testing.assert_close(merged[name], want, rtol=1e-4, atol=1e-5, msg=name)
