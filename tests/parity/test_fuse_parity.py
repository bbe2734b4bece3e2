"""``fuse`` against PEFT: equal to ``merge_and_unload`` where PEFT is right, and to the adapted model's outputs
(the definition) where PEFT's merge fails or is wrong (lora_bias on a bias-less layer, a 1x1x1 Conv3d, tied
embeddings changed on one side only)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from lorasurg.errors import InputError  # noqa: E402
from lorasurg.surgery.fuse import fuse  # noqa: E402
from tests.conftest import tol  # noqa: E402

pytestmark = pytest.mark.parity

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
IDS = torch.arange(8, 40).reshape(2, 16)


def base_of(arch: str) -> Path:
    return FIXTURES / f"tiny-{arch}" / "base"


def load_model(path: Path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def adapted(model: nn.Module, directory: Path, **config):
    """A PEFT model with non-zero factors (init False), DoRA magnitudes, lora_B biases and saved copies perturbed,
    saved to ``directory``."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for key, p in pm.named_parameters():
                if "lora_magnitude_vector" in key or "modules_to_save" in key or "lora_B" in key:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
        pm.save_pretrained(directory)
    return pm.eval()


def merged_state(pm) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: v.detach() for k, v in pm.merge_and_unload().state_dict().items()}


CASES = {
    "plain": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "rslora_patterns": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                                      rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})),
    "dora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj", "embed_tokens"], use_dora=True)),
    "embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"])),
    "modules_to_save": ("llama", dict(r=4, target_modules=["o_proj"], modules_to_save=["lm_head", "norm"])),
    "lora_bias_with_base_bias": ("qwen2", dict(r=4, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)),
    "qwen2_tied_untouched": ("qwen2", dict(r=4, target_modules="all-linear")),
    "gpt2_conv1d": ("gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc", "c_proj"])),
    "negative_alpha": ("llama", dict(r=4, lora_alpha=-8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                     alpha_pattern={"v_proj": -3})),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_merge_and_unload(tmp_path, case):
    arch, config = CASES[case]
    pm = adapted(load_model(base_of(arch)), tmp_path / "ad", **config)
    expected_logits = logits(pm)
    report = fuse(base_of(arch), tmp_path / "ad", tmp_path / "fused")
    ours = load_file(str(tmp_path / "fused" / "model.safetensors"))
    theirs = merged_state(pm)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], **tol(torch.float32), msg=name)
    assert set(ours) == set(load_file(str(base_of(arch) / "model.safetensors")))  # same tensor names as BASE
    torch.testing.assert_close(logits(load_model(tmp_path / "fused")), expected_logits, rtol=1e-4, atol=1e-5)
    assert report.modules and not report.config_updates


def test_bfloat16_base_keeps_its_dtype_and_precision(tmp_path):
    from fixtures.make import make_pair

    base, _ = make_pair("llama", tmp_path / "pair", dtype=torch.bfloat16, max_shard_size="150KB")
    pm = adapted(load_model(base, torch.bfloat16), tmp_path / "ad", r=4, target_modules=["q_proj", "gate_proj"])
    fuse(base, tmp_path / "ad", tmp_path / "fused")
    assert (json.loads((tmp_path / "fused" / "model.safetensors.index.json").read_text())["weight_map"]
            == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"])
    theirs = merged_state(pm)
    from lorasurg.io.checkpoint import Checkpoint

    with Checkpoint.open(tmp_path / "fused") as ckpt:
        for name in ckpt.names():
            assert ckpt.dtype(name) == torch.bfloat16
            torch.testing.assert_close(ckpt.get(name), theirs[name], **tol(torch.bfloat16), msg=name)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3)
        self.c2 = nn.Conv2d(3, 5, 3)
        self.c3 = nn.Conv3d(2, 4, (2, 3, 2))
        self.lin = nn.Linear(8, 6)


def _save_plain(model: nn.Module, directory: Path) -> Path:
    directory.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    return directory


def test_conv_layers_equal_merge_and_unload(tmp_path):
    torch.manual_seed(3)
    base = _save_plain(ConvNet(), tmp_path / "base")
    model = ConvNet()
    model.load_state_dict(load_file(str(base / "model.safetensors")))
    pm = adapted(model, tmp_path / "ad", r=2, target_modules=["c1", "c2", "c3", "lin"])
    fuse(base, tmp_path / "ad", tmp_path / "fused")
    ours = load_file(str(tmp_path / "fused" / "model.safetensors"))
    theirs = merged_state(pm)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], **tol(torch.float32), msg=name)


class PointConv3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def test_pointwise_conv3d_where_peft_merge_fails(tmp_path):
    torch.manual_seed(4)
    base = _save_plain(PointConv3d(), tmp_path / "base")
    model = PointConv3d()
    model.load_state_dict(load_file(str(base / "model.safetensors")))
    pm = adapted(model, tmp_path / "ad", r=2, target_modules=["conv"])
    x = torch.randn(2, 3, 2, 3, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = pm(x)
    with pytest.raises(Exception):  # PEFT 0.21.2 crashes in get_delta_weight for a 1x1x1 Conv3d
        merged_state(pm)
    fuse(base, tmp_path / "ad", tmp_path / "fused")
    fused = PointConv3d()
    fused.load_state_dict(load_file(str(tmp_path / "fused" / "model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-6)


def test_lora_bias_on_biasless_llama_layers_sets_the_config_flags(tmp_path):
    """PEFT's merge_and_unload refuses a lora_bias on a layer without a bias; fuse writes the bias, sets Llama's
    attention_bias / mlp_bias, gives the other governed layers a zero bias, and transformers loads the result with
    the adapted model's outputs."""
    base = base_of("llama")
    pm = adapted(load_model(base), tmp_path / "ad", r=4, target_modules=["q_proj", "down_proj"], lora_bias=True)
    expected = logits(pm)
    with pytest.raises(Exception, match="bias"):
        merged_state(pm)
    report = fuse(base, tmp_path / "ad", tmp_path / "fused")
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    assert report.config_updates == {"attention_bias": True, "mlp_bias": True}
    ours = load_file(str(tmp_path / "fused" / "model.safetensors"))
    assert torch.count_nonzero(ours["model.layers.0.self_attn.q_proj.bias"]) > 0
    assert torch.count_nonzero(ours["model.layers.0.self_attn.k_proj.bias"]) == 0  # governed by the flag, no LoRA
    assert {m.bias for m in report.modules} == {"new bias"}
    torch.testing.assert_close(logits(load_model(tmp_path / "fused")), expected, rtol=1e-4, atol=1e-5)


def test_lora_bias_qwen2_cannot_express_is_refused_then_dropped(tmp_path):
    base = base_of("qwen2")
    adapted(load_model(base), tmp_path / "ad", r=4, target_modules=["q_proj", "o_proj"], lora_bias=True)
    with pytest.raises(InputError) as err:
        fuse(base, tmp_path / "ad", tmp_path / "fused")
    message = str(err.value)
    assert "model.layers.0.self_attn.o_proj (||scale * lora_B.bias|| = " in message
    assert "q_proj" not in message.split("cannot give them one")[1].split("Nothing")[0]  # q_proj has a bias
    assert "--drop-unfusable-bias" in message and not (tmp_path / "fused").exists()
    report = fuse(base, tmp_path / "ad", tmp_path / "fused", drop_unfusable_bias=True)
    assert set(report.dropped_biases) == {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}
    assert all(v > 0 for v in report.dropped_biases.values())
    assert any("dropped 2 lora_B bias" in n for n in report.notes)
    ours = load_file(str(tmp_path / "fused" / "model.safetensors"))
    assert "model.layers.0.self_attn.o_proj.bias" not in ours


@pytest.mark.parametrize("arch, targets", [("qwen2", ["embed_tokens", "q_proj"]), ("gpt2", ["wte"]),
                                           ("qwen2", ["lm_head"])])
def test_tied_embeddings_changed_on_one_side_are_untied(tmp_path, arch, targets):
    """PEFT adapts a tied input embedding and output head separately, but its merge writes into the one shared
    weight (so both layers change); fuse writes the head as a tensor of its own and unties, as the adapted model is."""
    base = base_of(arch)
    pm = adapted(load_model(base), tmp_path / "ad", r=4, target_modules=targets)
    expected = logits(pm)
    merged_model = pm.merge_and_unload()
    assert float((logits(merged_model) - expected).abs().max()) > 1e-3  # PEFT's merge is not the adapted model
    report = fuse(base, tmp_path / "ad", tmp_path / "fused")
    assert report.config_updates == {"tie_word_embeddings": False}
    assert "lm_head.weight" in load_file(str(tmp_path / "fused" / "model.safetensors"))
    torch.testing.assert_close(logits(load_model(tmp_path / "fused")), expected, rtol=1e-4, atol=1e-5)


def test_extracted_tied_adapter_is_fused_once_and_stays_tied(tmp_path):
    """extract writes the same change for a tied embedding and lm_head; PEFT's merge adds it twice to the shared
    weight, fuse once."""
    from lorasurg.surgery.extract import extract_to_dir

    base, tuned = base_of("gpt2"), FIXTURES / "tiny-gpt2" / "tuned"
    extract_to_dir(base, tuned, tmp_path / "ad", r=64, svd="exact", embeddings="lora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(load_model(base), tmp_path / "ad").eval()
    expected = logits(pm)
    report = fuse(base, tmp_path / "ad", tmp_path / "fused")
    assert "tie_word_embeddings" not in report.config_updates
    assert "lm_head.weight" not in load_file(str(tmp_path / "fused" / "model.safetensors"))
    assert any("applied once, still tied" in n for n in report.notes)
    torch.testing.assert_close(logits(load_model(tmp_path / "fused")), expected, rtol=1e-4, atol=1e-5)
    assert float((logits(pm.merge_and_unload()) - expected).abs().max()) > 1e-3  # PEFT: added twice
