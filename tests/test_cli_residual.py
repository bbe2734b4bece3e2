"""``lorasurg residualize``, ``convert`` and ``fuse`` on the command line: outputs, JSON, and every bad input's
message and exit code (2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lorasurg.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LLAMA = str(FIXTURES / "tiny-llama" / "base")
QWEN2 = str(FIXTURES / "tiny-qwen2" / "base")


def run(*args: str):
    return CliRunner().invoke(main, [*args])


def _train(init: Path, out: Path, seed: int = 0) -> Path:
    """A 'trained' copy of an initial adapter: every tensor plus seeded noise."""
    out.mkdir()
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(str(init / "adapter_model.safetensors"))
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text((init / "adapter_config.json").read_text())
    return out


def test_residualize_convert_fuse_round_trip(tmp_path):
    pissa = tmp_path / "pissa"
    result = run("residualize", LLAMA, "--init", "pissa_niter_2", "--r", "4", "-o", str(pissa))
    assert result.exit_code == 0, result.output
    assert "energy taken" in result.output and "wrote" in result.output
    trained = _train(pissa / "adapter", tmp_path / "trained")
    result = run("convert", str(trained), "--initial", str(pissa / "adapter"), "-o", str(tmp_path / "lora"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["base_model"] == LLAMA and report["totals"]["modules"] == 14
    result = run("fuse", LLAMA, str(tmp_path / "lora"), "-o", str(tmp_path / "fused"), "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["modules"]) == 14
    # the fused original base equals the residual model with the trained adapter fused in
    result = run("fuse", str(pissa / "model"), str(trained), "-o", str(tmp_path / "fused-res"))
    assert result.exit_code == 0, result.output
    a = load_file(str(tmp_path / "fused" / "model.safetensors"))
    b = load_file(str(tmp_path / "fused-res" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_convert_rerank_reports_energy(tmp_path):
    pissa = tmp_path / "pissa"
    assert run("residualize", LLAMA, "--r", "4", "--target-modules", "q_proj", "-o", str(pissa)).exit_code == 0
    trained = _train(pissa / "adapter", tmp_path / "trained")
    result = run("convert", str(trained), "--initial", str(pissa / "adapter"), "--r", "3", "-o", str(tmp_path / "r3"))
    assert result.exit_code == 0, result.output
    assert "re-ranked to r=3" in result.output and "energy kept" in result.output


def _refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_residualize_bad_input(tmp_path):
    out = str(tmp_path / "out")
    _refused(run("residualize", LLAMA, "--target-modules", "nothing_here", "-o", out), "matches none of the model's")
    _refused(run("residualize", LLAMA, "--init", "gaussian", "-o", out), "init must be pissa")
    _refused(run("residualize", QWEN2, "--target-modules", "lm_head", "-o", out), "share their weight")
    _refused(run("residualize", str(tmp_path / "missing"), "-o", out), "does not exist")
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f").write_text("x")
    _refused(run("residualize", LLAMA, "-o", out), "exists and is not empty", "--force")


def test_convert_bad_input(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("residualize", LLAMA, "--r", "4", "--target-modules", "q_proj", "-o", str(a)).exit_code == 0
    assert run("residualize", LLAMA, "--r", "2", "--target-modules", "q_proj", "-o", str(b)).exit_code == 0
    out = str(tmp_path / "out")
    _refused(run("convert", str(a / "adapter"), "--initial", str(b / "adapter"), "-o", out),
             "is not the initial state of", "model.layers.0.self_attn.q_proj: (r, alpha, kind)")
    _refused(run("convert", str(a / "adapter"), "--initial", str(a / "model"), "-o", out), "adapter_config.json")
    assert not (tmp_path / "out").exists()
    result = run("convert", str(a / "adapter"), "-o", out)
    assert result.exit_code == 2 and "--initial" in result.output


def test_fuse_bad_input(tmp_path):
    out = str(tmp_path / "out")
    lora = tmp_path / "lora"
    assert run("extract", LLAMA, str(FIXTURES / "tiny-llama" / "tuned"), "--r", "2", "-o", str(lora)).exit_code == 0
    _refused(run("fuse", str(FIXTURES / "tiny-gpt2" / "base"), str(lora), "-o", out),
             "adapter does not fit BASE", "modules not in BASE")
    # a PEFT adapter with a lora_B bias on Qwen2's o_proj, which has no bias and no config flag for one
    peft = pytest.importorskip("peft")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(QWEN2)
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["o_proj"], lora_bias=True,
                                                    init_lora_weights=False))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith("lora_B.default.bias"):
                p.add_(1.0)
    pm.save_pretrained(tmp_path / "biased")
    _refused(run("fuse", QWEN2, str(tmp_path / "biased"), "-o", out),
             "model.layers.0.self_attn.o_proj (||scale * lora_B.bias|| =", "--drop-unfusable-bias")
    assert not (tmp_path / "out").exists()
    result = run("fuse", QWEN2, str(tmp_path / "biased"), "-o", out, "--drop-unfusable-bias")
    assert result.exit_code == 0 and "dropped 2 lora_B bias" in result.output
