"""``residualize`` against PEFT's in-memory PiSSA/OLoRA init: same residuals, same factors, BASE's outputs back."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from lorasurg.surgery.residualize import residualize  # noqa: E402
from tests.conftest import tol  # noqa: E402

pytestmark = pytest.mark.parity

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
IDS = torch.arange(8, 40).reshape(2, 16)
R, ALPHA, SEED = 4, 8, 3


def load_model(path: Path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def peft_init(base: Path, init: str, dtype=torch.float32):
    """PEFT's own in-memory init on BASE (all-linear), from the same seed."""
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=init)
    model = load_model(base, dtype)
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def peft_base_weights(pm) -> dict[str, torch.Tensor]:
    """BASE-named tensors of PEFT's model (``base_layer`` removed), LoRA tensors left out."""
    return {k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v.detach()
            for k, v in pm.state_dict().items() if ".lora_" not in k}


def peft_factors(pm) -> dict[str, torch.Tensor]:
    return {k.replace(".default", ""): v for k, v in peft.get_peft_model_state_dict(pm).items()}


@pytest.mark.parametrize("arch, init", [("llama", "pissa"), ("llama", "pissa_niter_2"), ("llama", "olora"),
                                        ("gpt2", "pissa"), ("gpt2", "pissa_niter_2")])
def test_residuals_and_factors_equal_peft(tmp_path, arch, init):
    base = FIXTURES / f"tiny-{arch}" / "base"
    report = residualize(base, tmp_path / "out", init=init, r=R, alpha=ALPHA, seed=SEED)
    pm = peft_init(base, init)
    theirs = peft_base_weights(pm)
    ours = load_file(str(tmp_path / "out" / "model" / "model.safetensors"))
    residualized = {f"{m.module}.weight" for m in report.modules}
    assert residualized and residualized <= set(ours)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], **tol(torch.float32), msg=name)
        if name not in residualized:
            assert torch.equal(tensor, load_file(str(base / "model.safetensors"))[name]), name  # copied as is
    # Factors compared by their product: singular vectors of (nearly) equal singular values may rotate with the
    # last bit of rounding, B @ A does not.
    our_factors, their_factors = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors")), peft_factors(pm)
    assert our_factors.keys() == their_factors.keys()
    for key in (k for k in their_factors if k.endswith("lora_A.weight")):
        b_key = key.replace("lora_A", "lora_B")
        theirs_ba = their_factors[b_key] @ their_factors[key]  # (out, r) @ (r, in)
        torch.testing.assert_close(our_factors[b_key] @ our_factors[key], theirs_ba, **tol(torch.float32), msg=key)


def test_peft_olora_on_gpt2_conv1d_is_wrong_and_ours_follows_the_definition(tmp_path):
    """PEFT's OLoRA factors GPT-2's stored (in, out) Conv1D weight: its residual differs from the definition's, and
    its adapted model does not even run (lora_B of c_attn gets (in, r) instead of (out, r)); residualize's computes
    BASE's outputs."""
    base = FIXTURES / "tiny-gpt2" / "base"
    residualize(base, tmp_path / "out", init="olora", r=R, alpha=ALPHA)
    pm = peft_init(base, "olora")
    ours = load_file(str(tmp_path / "out" / "model" / "model.safetensors"))
    theirs = peft_base_weights(pm)
    name = "transformer.h.0.attn.c_proj.weight"  # square (64, 64): PEFT's shapes happen to fit
    assert float((ours[name] - theirs[name]).abs().max()) > 1e-2
    reference = logits(load_model(base))
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        logits(pm)
    ours_pm = peft.PeftModel.from_pretrained(load_model(tmp_path / "out" / "model"), tmp_path / "out" / "adapter")
    torch.testing.assert_close(logits(ours_pm), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_model_plus_adapter_in_peft_gives_base_logits(tmp_path, arch, init):
    base = FIXTURES / f"tiny-{arch}" / "base"
    residualize(base, tmp_path / "out", init=init, r=R, alpha=ALPHA)
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # PEFT would decompose the residual again on load otherwise
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(load_model(tmp_path / "out" / "model"), tmp_path / "out" / "adapter")
    assert not any("missing" in str(w.message).lower() for w in caught)
    torch.testing.assert_close(logits(pm), logits(load_model(base)), rtol=1e-4, atol=1e-5)


def test_bfloat16_base_within_bfloat16_precision(tmp_path):
    from fixtures.make import make_pair

    base, _ = make_pair("llama", tmp_path / "pair", dtype=torch.bfloat16)
    residualize(base, tmp_path / "out", init="pissa", r=R, alpha=ALPHA)
    ours = load_file(str(tmp_path / "out" / "model" / "model.safetensors"))
    theirs = peft_base_weights(peft_init(base, "pissa", torch.bfloat16))
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16, name
        torch.testing.assert_close(tensor, theirs[name], **tol(torch.bfloat16), msg=name)
    adapter = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in adapter.values()} == {torch.float32}  # as PEFT keeps adapter weights (autocast)
    pm = peft.PeftModel.from_pretrained(load_model(tmp_path / "out" / "model", torch.bfloat16),
                                        tmp_path / "out" / "adapter")
    reference = logits(load_model(base, torch.bfloat16))
    scale = float(reference.abs().max())
    assert float((logits(pm) - reference).abs().max()) <= tol(torch.bfloat16)["rtol"] * scale
