"""Checkpoints that carry buffers (not weights) on one side: extract succeeds, lists them, and PEFT reproduces TUNED.

The pairs are fixtures/buffers/{bert,llama,gpt2} (fixtures/make.py): BERT's ``embeddings.position_ids`` in base only,
Llama's ``rotary_emb.inv_freq`` per layer in tuned only and model-level in both with another dtype, GPT-2's
``attn.bias`` and ``attn.masked_bias`` in base only, as older transformers versions saved them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lorasurg.cli import main
from lorasurg.errors import ShapeMismatchError
from lorasurg.surgery.extract import extract, extract_to_dir

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity

BUFFERS = Path(__file__).resolve().parents[2] / "fixtures" / "buffers"
IDS = torch.arange(3, 19).reshape(2, 8)
EXPECTED = {  # name -> {buffer: why}
    "bert": {"embeddings.position_ids": "only in base"},
    "llama": {"model.layers.0.self_attn.rotary_emb.inv_freq": "only in tuned",
              "model.rotary_emb.inv_freq": "float32 in base, bfloat16 in tuned"},
    "gpt2": {"transformer.h.0.attn.bias": "only in base", "transformer.h.0.attn.masked_bias": "only in base"},
}


def _pair(name: str) -> tuple[Path, Path]:
    return BUFFERS / name / "base", BUFFERS / name / "tuned"


def _model(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers names the buffers it does not load (unexpected keys)
        cls = transformers.AutoModel if json.loads((path / "config.json").read_text())["architectures"] == [
            "BertModel"] else transformers.AutoModelForCausalLM
        return cls.from_pretrained(path, dtype=torch.float32).eval()


def _output(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_library_extract_ignores_and_lists_the_buffers(name, tmp_path):
    base, tuned = _pair(name)
    adapter, report = extract(base, tuned, r=32, svd="exact")
    assert {b.name: b.reason for b in report.buffers} == EXPECTED[name]
    assert {b.outcome for b in report.buffers} == {"buffer, ignored"}
    assert not [o for o in report.outcomes if o.name in EXPECTED[name]]  # not compared as weights
    assert not [k for k in adapter.to_state_dict() if any(b in k for b in EXPECTED[name])]
    data = report.to_dict()
    assert [b["name"] for b in data["buffers"]] == [b.name for b in report.buffers]
    assert data["totals"]["buffers_ignored"] == len(EXPECTED[name])
    assert "buffers (registered by the architecture, not weights):" in report.render()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cli_extract_lists_the_buffers_and_peft_reproduces_tuned(name, tmp_path):
    base, tuned = _pair(name)
    out = tmp_path / "adapter"
    runner = CliRunner()
    text = runner.invoke(main, ["extract", str(base), str(tuned), "-o", str(out), "--r", "32", "--svd", "exact"])
    assert text.exit_code == 0, text.output
    for buffer, why in EXPECTED[name].items():
        assert any(buffer in line and "buffer, ignored" in line and why in line for line in text.stdout.splitlines())
    as_json = runner.invoke(main, ["extract", str(base), str(tuned), "-o", str(out), "--r", "32", "--svd", "exact",
                                   "--json", "--force"])
    assert as_json.exit_code == 0, as_json.output
    listed = {b["name"]: (b["outcome"], b["reason"]) for b in json.loads(as_json.stdout)["buffers"]}
    assert listed == {b: ("buffer, ignored", why) for b, why in EXPECTED[name].items()}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(_model(base), out).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message).lower()]
    expected, before = _output(_model(tuned)), _output(_model(base))
    error = float(torch.linalg.vector_norm(_output(pm) - expected) / torch.linalg.vector_norm(expected))
    assert error < 1e-5 < float(torch.linalg.vector_norm(before - expected) / torch.linalg.vector_norm(expected))


def test_a_weight_on_one_side_is_still_refused(tmp_path):
    """Only buffers are forgiven: a parameter missing from TUNED (next to the buffers) is refused, named alone."""
    base, tuned = _pair("gpt2")
    broken = tmp_path / "tuned"
    broken.mkdir()
    (broken / "config.json").write_text((tuned / "config.json").read_text())
    tensors = load_file(tuned / "model.safetensors")
    del tensors["transformer.h.0.mlp.c_fc.bias"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ShapeMismatchError) as refused:
        extract_to_dir(base, broken, tmp_path / "out")
    assert "missing from tuned (1): transformer.h.0.mlp.c_fc.bias\n" in str(refused.value)
    assert "masked_bias" not in str(refused.value) and not (tmp_path / "out").exists()


def test_a_weight_shape_mismatch_is_still_refused(tmp_path):
    base, tuned = _pair("bert")
    broken = tmp_path / "tuned"
    broken.mkdir()
    (broken / "config.json").write_text((tuned / "config.json").read_text())
    tensors = load_file(tuned / "model.safetensors")
    tensors["embeddings.LayerNorm.bias"] = torch.zeros(31)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = CliRunner().invoke(main, ["extract", str(base), str(broken), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "shape mismatch (1): embeddings.LayerNorm.bias: base (32,), tuned (31,)" in result.stderr
    assert "position_ids" not in result.stderr
