"""``convert`` against PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``, and on the
original base: the converted LoRA gives the trained model's outputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from lorasurg.io.adapter import Adapter  # noqa: E402
from lorasurg.surgery.convert import convert_to_dir  # noqa: E402
from lorasurg.surgery.residualize import residualize  # noqa: E402

pytestmark = pytest.mark.parity

BASE = Path(__file__).resolve().parents[2] / "fixtures" / "tiny-llama" / "base"
IDS = torch.arange(8, 40).reshape(2, 16)

CONFIGS = {
    "pissa": dict(init_lora_weights="pissa", target_modules=["q_proj", "v_proj", "down_proj"]),
    "pissa_niter": dict(init_lora_weights="pissa_niter_2", target_modules=["q_proj", "o_proj"]),
    "olora": dict(init_lora_weights="olora", target_modules=["k_proj", "up_proj"]),
    "rslora": dict(init_lora_weights="pissa", target_modules=["q_proj", "v_proj"], use_rslora=True),
    "patterns": dict(init_lora_weights="pissa", target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}),
    # PEFT refuses to convert the next three or gets them wrong:
    "rslora_patterns": dict(init_lora_weights="pissa", target_modules=["q_proj", "v_proj"], use_rslora=True,
                            rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 5}),
    "dora": dict(init_lora_weights="pissa", target_modules=["q_proj", "v_proj"], use_dora=True),
    "embedding": dict(init_lora_weights="pissa", target_modules=["q_proj", "embed_tokens"]),
}
PEFT_CONVERTS = ["pissa", "pissa_niter", "olora", "rslora", "patterns"]


def load_model(path: Path = BASE):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def train_in_peft(tmp_path: Path, name: str):
    """PEFT's PiSSA workflow: init, save the initial adapter (init_lora_weights=True), 'train' (seeded noise on
    every adapter tensor), save. Returns the model (on its residual base), the trained logits and the directories."""
    config = peft.LoraConfig(r=4, lora_alpha=8, **CONFIGS[name])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(load_model(), config)
        pm.peft_config["default"].init_lora_weights = True
        pm.save_pretrained(tmp_path / "init")
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for key, p in pm.named_parameters():
                if "lora_" in key:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        pm.save_pretrained(tmp_path / "trained")
    return pm, logits(pm), tmp_path / "trained", tmp_path / "init"


def on_original_base(adapter: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(load_model(), adapter).eval()


@pytest.mark.parametrize("name", PEFT_CONVERTS)
def test_equals_peft_conversion(tmp_path, name):
    pm, _, trained, init = train_in_peft(tmp_path, name)
    convert_to_dir(trained, init, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(init))
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key  # concatenation and negation: exact copies
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "init_lora_weights"):
        assert ours_cfg[field] == pytest.approx(theirs_cfg[field]), field


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_converted_lora_on_the_original_base_gives_the_trained_outputs(tmp_path, name):
    _, trained_logits, trained, init = train_in_peft(tmp_path, name)
    report = convert_to_dir(trained, init, tmp_path / "ours")
    torch.testing.assert_close(logits(on_original_base(tmp_path / "ours")), trained_logits, rtol=1e-4, atol=1e-5)
    assert all(m.energy_kept == 1.0 and m.rank == 2 * m.trained_rank for m in report.modules)


def test_peft_refuses_rslora_with_patterns(tmp_path):
    pm, _, _, init = train_in_peft(tmp_path, "rslora_patterns")
    with pytest.raises(ValueError, match="rank_pattern"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(init))


@pytest.mark.parametrize("name, lost", [("dora", "lora_magnitude_vector"), ("embedding", "lora_embedding_A")])
def test_peft_conversion_drops_dora_magnitudes_and_embedding_loras(tmp_path, name, lost):
    """PEFT keeps only lora_A/lora_B keys when it converts: its adapter no longer gives the trained outputs."""
    pm, trained_logits, _, init = train_in_peft(tmp_path, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(init))
    assert not any(lost in k for k in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert float((logits(on_original_base(tmp_path / "peft")) - trained_logits).abs().max()) > 1e-2


def test_rerank_is_the_optimal_rank_r_approximation(tmp_path):
    _, _, trained, init = train_in_peft(tmp_path, "patterns")
    exact = Adapter.load(convert_to_dir(trained, init, tmp_path / "exact").output)
    report = convert_to_dir(trained, init, tmp_path / "r3", r=3)
    reranked = Adapter.load(tmp_path / "r3")
    for row in report.modules:
        dense = _delta(exact, row.module)  # float64 (out, in)
        S = torch.linalg.svdvals(dense)
        k = row.rank
        assert k == min(3, 2 * row.trained_rank)
        got = _delta(reranked, row.module)
        optimal = float(S[k:].pow(2).sum().sqrt())
        assert float(torch.linalg.vector_norm(dense - got)) == pytest.approx(optimal, rel=1e-4, abs=1e-6)
        assert row.energy_kept == pytest.approx(float(S[:k].pow(2).sum() / S.pow(2).sum()), rel=1e-5)
        assert row.delta_norm == pytest.approx(float(S.pow(2).sum().sqrt()), rel=1e-5)
    clamped = convert_to_dir(trained, init, tmp_path / "r6", r=6)  # v_proj has trained rank 2: dW has rank <= 4
    rows = {row.module: row for row in clamped.modules}
    assert rows["model.layers.0.self_attn.v_proj"].rank == 4 and rows["model.layers.0.self_attn.v_proj"].clamped
    assert rows["model.layers.0.self_attn.q_proj"].rank == 6 and not rows["model.layers.0.self_attn.q_proj"].clamped
    assert any("--r 6" in n and "model.layers.0.self_attn.v_proj (r=4)" in n for n in clamped.notes)
    assert Adapter.load(tmp_path / "r6").rank_alpha("model.layers.0.self_attn.v_proj")[0] == 4


def test_residualize_then_convert_end_to_end(tmp_path):
    """residualize -> train on the residual model -> convert: the plain LoRA on the original base gives the trained
    model's outputs, and it names the original base."""
    residualize(BASE, tmp_path / "pissa", init="pissa_niter_2", r=4, target_modules=["q_proj", "down_proj"])
    init = tmp_path / "pissa" / "adapter"
    tensors = load_file(str(init / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(2)
    trained = tmp_path / "trained"
    trained.mkdir()
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()},
              str(trained / "adapter_model.safetensors"))
    (trained / "adapter_config.json").write_text((init / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained_model = peft.PeftModel.from_pretrained(load_model(tmp_path / "pissa" / "model"), trained).eval()
    report = convert_to_dir(trained, init, tmp_path / "lora")
    assert report.base_model == str(BASE)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(BASE)
    torch.testing.assert_close(logits(on_original_base(tmp_path / "lora")), logits(trained_model), rtol=1e-4, atol=1e-5)


def _delta(adapter: Adapter, module: str) -> torch.Tensor:
    from lorasurg.engine.factors import LoraFactors, delta_matrix, lora_scale

    mod = adapter.modules[module]
    r, alpha = adapter.rank_alpha(module)
    f = LoraFactors("linear", mod.A.double(), mod.B.double(), lora_scale(r, alpha, adapter.config.use_rslora))
    return delta_matrix(f)
