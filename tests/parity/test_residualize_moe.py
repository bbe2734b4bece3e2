"""``residualize`` on mixture-of-experts and multimodal checkpoints.

PEFT 0.21.2 cannot initialise PiSSA or OLoRA on fused experts (its ``ParamWrapper.pissa_init``/``olora_init`` read
``get_base_layer().weight``, and an experts module has none: shown below), so on experts the check is the invariant:
PEFT on the residual model with the initial adapter computes BASE, every expert of every selected projection was
factored, and the residual checkpoint keeps BASE's layout. Where PEFT can initialise (the towers of a VLM, the linear
layers of a MoE model, DeepSeek-V3's dense MLP through 2-D ``target_parameters``), residuals and factors equal PEFT's
own in-memory init, random draws included.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from lorasurg.io.checkpoint import Checkpoint  # noqa: E402
from lorasurg.surgery.residualize import residualize  # noqa: E402
from tests.parity.test_fuse_moe import FAMILY_DIR, assert_states_close, family, load, logits  # noqa: E402

pytestmark = pytest.mark.parity

R, SEED = 4, 3
FORMS = {"qwen3_moe": "per-expert", "mixtral": "per-expert", "deepseek_v3": "per-expert",
         "qwen2_moe": "target-parameters", "gpt_oss": "target-parameters"}


def peft_loaded(out: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(load(out / "model"), out / "adapter").eval()
    troubles = [str(w.message) for w in caught if "missing" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()]
    assert troubles == []
    return pm


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
@pytest.mark.parametrize("name", sorted(FAMILY_DIR))
def test_residual_model_plus_initial_adapter_is_base_in_peft(tmp_path, name, init):
    base = family(name) / "base"
    report = residualize(base, tmp_path / "out", init=init, r=R, seed=SEED, device="cpu")
    ours, theirs = load_file(str(tmp_path / "out" / "model" / "model.safetensors")), \
        load_file(str(base / "model.safetensors"))
    assert list(ours) == list(theirs) and all(ours[k].dtype == theirs[k].dtype for k in theirs)
    factored = {m.module if m.kind == "experts" else f"{m.module}.weight" for m in report.modules}
    assert factored <= set(theirs)
    for key in set(theirs) - factored:
        assert torch.equal(ours[key], theirs[key]), key
    description = Checkpoint.open(base).describe()
    experts = set(description.experts) | {p.stored for p in description.parameters.values() if p.stored}
    assert experts <= {m.module for m in report.modules}  # every expert of every projection was factored
    pm = peft_loaded(tmp_path / "out")
    torch.testing.assert_close(logits(pm), logits(load(base)), rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_states_close(pm.merge_and_unload().state_dict(), load(base).state_dict())
    written = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    if name in FORMS and FORMS[name] == "per-expert":
        assert any(".experts.3." in k for k in written)
    elif name in FORMS:
        assert any(k.endswith("mlp.experts.base_layer.lora_A.weight") for k in written)
    else:  # the model's namespace: towers and language model renamed
        assert all(k.startswith(("base_model.model.model.", "base_model.model.lm_head")) for k in written)


def test_peft_cannot_initialise_pissa_on_fused_experts():
    model = load(family("qwen3_moe") / "base")
    config = peft.LoraConfig(r=R, target_modules=[], target_parameters=["gate_up_proj"], init_lora_weights="pissa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AttributeError, match="'Qwen3MoeExperts' object has no attribute 'weight'"):
            peft.get_peft_model(model, config)


def peft_init(name: str, init: str, **config):
    model = load(family(name) / "base")
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=R, init_lora_weights=init, **config))


def peft_residuals(pm) -> dict[str, torch.Tensor]:
    """PEFT's base weights after its init, by the model's names (``base_layer`` removed), LoRA tensors left out."""
    return {k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v.detach()
            for k, v in pm.state_dict().items() if ".lora_" not in k}


def assert_factor_products_equal(adapter: Path, pm) -> None:
    """The same adapter keys, and per module the same ``B @ A`` (singular vectors of close singular values may
    rotate with rounding; the product does not). Within 1e-4 of its norm: PEFT's float32 LAPACK SVD places the top-r
    subspace to ``eps * ||W|| / (s_r - s_r+1)``, which the small gaps of these 32-wide random weights make ~1e-5."""
    ours = load_file(str(adapter / "adapter_model.safetensors"))
    theirs = {k.replace(".default", ""): v for k, v in peft.get_peft_model_state_dict(pm).items()}
    assert set(ours) == set(theirs)
    for key in (k for k in theirs if k.endswith("lora_A.weight")):
        b_key = key.replace("lora_A", "lora_B")
        assert_frobenius_close(ours[b_key] @ ours[key], theirs[b_key] @ theirs[key], key, rtol=1e-4)


def assert_residuals_equal(model: Path, pm) -> None:
    """Every tensor of the residual model equals PEFT's after its init, to float32 rounding."""
    ours, theirs = load(model).state_dict(), peft_residuals(pm)
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        assert_frobenius_close(ours[key], tensor, key)


def assert_frobenius_close(actual: torch.Tensor, expected: torch.Tensor, key: str, rtol: float = 1e-5) -> None:
    """``||actual - expected||_F <= rtol ||expected||_F``: an SVD's float32 rounding is relative to the matrix's norm,
    not to each entry (PEFT's LAPACK SVD and the Gram eigendecomposition round differently)."""
    diff = float(torch.linalg.vector_norm((actual - expected).double()))
    assert diff <= rtol * float(torch.linalg.vector_norm(expected.double())), (key, diff)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
def test_vlm_residuals_and_factors_equal_peft_in_its_namespace(tmp_path, name, init):
    residualize(family(name) / "base", tmp_path / "out", init=init, r=R, seed=SEED, device="cpu")
    pm = peft_init(name, init, target_modules="all-linear")
    assert_residuals_equal(tmp_path / "out" / "model", pm)
    assert_factor_products_equal(tmp_path / "out" / "adapter", pm)


def test_deepseek_dense_mlp_and_attention_equal_peft_through_2d_target_parameters(tmp_path):
    """Without its experts (regex exclusion), DeepSeek-V3's dense first-layer MLP and shared experts are written as
    2-D target_parameters (PEFT's MoE conversion would take a gate_proj target for the experts' gate_up_proj): PEFT
    initialises those the same way."""
    dense = [f"model.layers.{layer}.{mlp}.{leaf}.weight" for layer, mlp in ((0, "mlp"), (1, "mlp.shared_experts"))
             for leaf in ("gate_proj", "up_proj", "down_proj")]
    residualize(family("deepseek_v3") / "base", tmp_path / "out", init="pissa", r=R, seed=SEED, device="cpu",
                target_modules=["q_a_proj", "gate_proj", "up_proj", "down_proj"],
                exclude_modules=r".*\.experts\.\d+\..*")
    pm = peft_init("deepseek_v3", "pissa", target_modules=["q_a_proj"], target_parameters=dense)
    assert_residuals_equal(tmp_path / "out" / "model", pm)
    assert_factor_products_equal(tmp_path / "out" / "adapter", pm)
    torch.testing.assert_close(logits(peft_loaded(tmp_path / "out")), logits(load(family("deepseek_v3") / "base")),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, consumer", [(n, c) for n in ("qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3")
                                            for c in ("vllm", "llama.cpp")] + [("gpt_oss", "vllm")])
def test_for_another_consumer_the_initial_adapter_loads_in_peft(tmp_path, name, consumer):
    """--for vllm/llama.cpp writes the experts per expert (what those read) where the checkpoint stores them so, and
    gpt-oss's fused experts as target_parameters for vLLM (one of its 3-D MoE classes); PEFT loads the same file on
    the residual model with no missing or unexpected key (on Qwen2-MoE through the config's target_parameters in its
    converted form) and computes BASE, and merge_and_unload gives BASE's weights."""
    base = family(name) / "base"
    residualize(base, tmp_path / "out", init="pissa", r=R, seed=SEED, device="cpu", consumers=consumer)
    written = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert any((".experts.base_layer.lora_A" if name == "gpt_oss" else ".experts.3.") in k for k in written)
    pm = peft_loaded(tmp_path / "out")
    torch.testing.assert_close(logits(pm), logits(load(base)), rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_states_close(pm.merge_and_unload().state_dict(), load(base).state_dict())
