"""``--for`` on the command line (extract), ``--serving`` as its alias, and inspect's per-consumer lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorasurg.cli import main
from lorasurg.consumers import consumer_findings
from lorasurg.io.adapter import Adapter

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LLAMA = [str(FIXTURES / "tiny-llama" / "base"), str(FIXTURES / "tiny-llama" / "tuned")]
QWEN2 = [str(FIXTURES / "tiny-qwen2" / "base"), str(FIXTURES / "tiny-qwen2" / "tuned")]


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_for_llama_cpp_writes_no_alpha_pattern_and_reports_what_it_leaves_out(tmp_path):
    out = tmp_path / "gguf"
    result = run("extract", *LLAMA, "--r", "32", "--rank-policy", "energy:0.9", "--for", "llama.cpp", "-o", str(out))
    assert result.exit_code == 0, result.output
    adapter = Adapter.load(out)
    assert adapter.config.alpha_pattern == {} and adapter.config.use_rslora is False
    assert [f for f in consumer_findings(adapter, "llama.cpp") if f.severity == "error"] == []
    assert "written for llama.cpp: no alpha_pattern" in result.output
    assert "llama.cpp: leaves out 1 tensor(s)/module(s)" in result.output  # the saved input_layernorm
    assert "model.layers.0.input_layernorm.weight" in result.output


def test_serving_is_an_alias_of_for_vllm(tmp_path):
    a = run("extract", *QWEN2, "--r", "4", "--serving", "--json", "-o", str(tmp_path / "a"))
    b = run("extract", *QWEN2, "--r", "4", "--for", "vllm", "--json", "-o", str(tmp_path / "b"))
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    ja, jb = json.loads(a.output), json.loads(b.output)
    assert ja["settings"]["for"] == jb["settings"]["for"] == ["vllm"]
    assert ja["tensors"] == jb["tensors"] and ja["for"] == jb["for"]
    assert (tmp_path / "a" / "adapter_config.json").read_text() == (tmp_path / "b" / "adapter_config.json").read_text()
    left = {x["name"] for x in jb["left_out_by_consumer"]["vllm"]}
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.bias"} <= left


def test_for_all_pads_and_every_consumer_agrees(tmp_path):
    out = tmp_path / "all"
    result = run("extract", *LLAMA, "--r", "8", "--rank-policy", "energy:0.95", "--for", "all", "--json", "-o", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["for"]
    assert report["layout"] == "padded" and report["consumers"] == ["peft", "vllm", "llama.cpp"]
    adapter = Adapter.load(out)
    assert {m.rank for m in adapter.modules.values()} == {adapter.config.r}
    assert [f for f in consumer_findings(adapter, "all") if f.severity == "error"] == []


def test_unknown_consumer_is_a_usage_error(tmp_path):
    result = run("extract", *LLAMA, "--for", "vllm,tgi", "-o", str(tmp_path / "x"))
    assert result.exit_code == 2
    assert "unknown consumer(s) 'tgi'" in result.output and not (tmp_path / "x").exists()


def test_inspect_shows_one_line_per_consumer(tmp_path):
    out = tmp_path / "e"
    assert run("extract", *LLAMA, "--r", "32", "--rank-policy", "energy:0.9", "--embeddings", "lora",
               "-o", str(out)).exit_code == 0
    text = run("inspect", str(out)).output
    lines = text.split("read by:\n", 1)[1].splitlines()
    assert lines[0] == "  PEFT 0.21.2: the reference"
    assert lines[2].startswith("  llama.cpp: NOT as PEFT:") and "5.5x PEFT's scale" in lines[2]
    data = json.loads(run("inspect", str(out), "--json").output)
    assert [c["consumer"] for c in data["consumers"]] == ["peft", "vllm", "llama.cpp"]
    assert [c["same_as_peft"] for c in data["consumers"]] == [True, False, False]


def test_nothing_left_for_the_consumers_says_why(tmp_path):
    gpt2 = [str(FIXTURES / "tiny-gpt2" / "base"), str(FIXTURES / "tiny-gpt2" / "tuned")]
    result = run("extract", *gpt2, "--r", "4", "--for", "all", "-o", str(tmp_path / "g"))
    assert result.exit_code == 2 and not (tmp_path / "g").exists()
    assert "--for peft,vllm,llama.cpp left out what its consumers cannot carry" in result.output
    assert "GPT-2 Conv1D LoRA" in result.output and "--for peft keeps everything" in result.output


PISSA = FIXTURES / "tiny-llama" / "pissa"


def _command_args(command: str, tmp_path: Path) -> list[str]:
    """The arguments of one adapter-writing command on the fixtures (rerank and merge read extract outputs)."""
    if command in ("rerank", "merge"):
        for name, r in (("e8", "8"), ("e4", "4")):
            if not (tmp_path / name).exists():
                assert run("extract", *LLAMA, "--r", r, "-o", str(tmp_path / name)).exit_code == 0
    return {
        "rerank": ["rerank", str(tmp_path / "e8"), "--rank-policy", "energy:0.9"],
        "merge": ["merge", str(tmp_path / "e8"), str(tmp_path / "e4"), "--method", "cat"],
        "convert": ["convert", str(PISSA / "trained"), "--initial", str(PISSA / "adapter"), "--r", "6"],
        "residualize": ["residualize", LLAMA[0], "--r", "4", "--rslora", "--target-modules", "q_proj,down_proj"],
    }[command]


@pytest.mark.parametrize("command", ["rerank", "merge", "convert", "residualize"])
def test_for_on_every_writing_command(command, tmp_path):
    out = tmp_path / "out"
    result = run(*_command_args(command, tmp_path), "--for", "llama.cpp,vllm", "--json", "-o", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["settings"]["for"] == ["vllm", "llama.cpp"]
    assert data["for"]["consumers"] == ["vllm", "llama.cpp"] and data["for"]["layout"] == "padded"
    assert set(data["left_out_by_consumer"]) == {"vllm", "llama.cpp"}
    adapter = Adapter.load(out / "adapter" if command == "residualize" else out)
    assert [f.message for f in consumer_findings(adapter, "vllm,llama.cpp") if f.severity == "error"] == []
    text = run(*_command_args(command, tmp_path), "--for", "all", "-o", str(tmp_path / "text")).output
    assert "written for peft, vllm, llama.cpp: every module zero-padded to rank" in text
    assert "  vllm: leaves " in text and "  llama.cpp: leaves " in text
    default = run(*_command_args(command, tmp_path), "--json", "-o", str(tmp_path / "default"))
    assert json.loads(default.output)["settings"]["for"] == ["peft"]


@pytest.mark.parametrize("command", ["rerank", "merge", "convert", "residualize"])
def test_for_with_an_unknown_consumer_is_a_usage_error(command, tmp_path):
    result = run(*_command_args(command, tmp_path), "--for", "peft,tgi", "-o", str(tmp_path / "x"))
    assert result.exit_code == 2
    assert "Invalid value for '--for'" in result.output and "unknown consumer(s) 'tgi'" in result.output
    assert not (tmp_path / "x").exists()


def test_residualize_for_a_consumer_that_cannot_carry_the_adapter_exits_2(tmp_path):
    gpt2 = str(FIXTURES / "tiny-gpt2" / "base")
    result = run("residualize", gpt2, "--init", "olora", "--r", "4", "--for", "llama.cpp", "-o", str(tmp_path / "g"))
    assert result.exit_code == 2 and not (tmp_path / "g").exists()
    assert "error: --for llama.cpp: the initial adapter cannot be written whole" in result.output
    assert "--exclude-modules transformer.h.0.attn.c_attn," in result.output and "Traceback" not in result.output
