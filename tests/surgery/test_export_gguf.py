"""``lorasurg export --to gguf``: MoE stacking, what llama.cpp cannot carry, refusals (through the CLI: exit 2, one
message, nothing written), ``--to gguf`` on the writing commands, and inspect/validate of the files."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lorasurg import export_gguf, extract_to_dir, rerank_to_dir, validate
from lorasurg.cli import main
from lorasurg.consumers import consumer_delta
from lorasurg.engine.factors import delta_matrix
from lorasurg.io.adapter import Adapter, AdapterModule
from lorasurg.surgery.inspect import inspect_adapter
from tests.conftest import assert_close_ulps
from tests.surgery.gguf_helpers import FIXTURES, build_base, gguf_deltas, random_adapter, read_gguf

LLAMA, GPT2, QWEN2 = FIXTURES["llama"], FIXTURES["gpt2"], FIXTURES["qwen2"]
EXPERT = "model.layers.{l}.mlp.experts.{e}.{p}"


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return build_base("qwen3moe", tmp_path_factory.mktemp("moe") / "base")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------------------------------ MoE


def test_moe_experts_are_stacked_as_llama_cpp_reads_them(tmp_path, moe):
    """Per-expert keys (issue 16's layout) become ffn_{gate,up,down}_exps pairs (E, r, in) / (E, out, r), every
    expert's delta PEFT's rule ``s_m B_m @ A_m`` on that expert's own factors (layer 1: rank 3, scale 3, so
    rescaled); attention pairs as usual."""
    adapter = random_adapter(moe, r=4)
    adapter.save(tmp_path / "a")
    report = export_gguf(tmp_path / "a", tmp_path / "moe.gguf", base=moe)
    meta, deltas = gguf_deltas(tmp_path / "moe.gguf")
    assert meta["general.architecture"][0] == "qwen3moe"
    _, tensors = read_gguf(tmp_path / "moe.gguf")
    assert tuple(tensors["blk.0.ffn_gate_exps.weight.lora_a"].shape) == (4, 4, 32)
    assert tuple(tensors["blk.1.ffn_down_exps.weight.lora_b"].shape) == (4, 32, 3)
    stacked = [p for p in report.pairs if p.layout == "experts"]
    assert len(stacked) == 6 and all(len(p.modules) == 4 for p in stacked)
    for layer in (0, 1):
        for proj, short in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            for e in range(4):
                module = EXPERT.format(l=layer, e=e, p=proj)
                expected = delta_matrix(consumer_delta(adapter, "peft", module)).double()
                got = deltas[f"blk.{layer}.ffn_{short}_exps.weight[{e}]"]
                assert_close_ulps(got.float(), expected.float(), ulps=24, magnitude=float(expected.abs().max()))
    assert "blk.0.attn_q.weight" in deltas and "output.weight" in deltas  # Qwen3-MoE's head is not tied


def test_moe_with_an_expert_missing_is_refused_by_name(tmp_path, moe):
    adapter = random_adapter(moe, r=4, mixed=False)
    del adapter.modules[EXPERT.format(l=1, e=2, p="up_proj")]
    adapter.save(tmp_path / "a")
    result = run("export", tmp_path / "a", "--to", "gguf", "--base", moe, "-o", tmp_path / "x.gguf")
    assert result.exit_code == 2
    assert "blk.1.ffn_up_exps.weight" in result.output and "no LoRA for expert(s) 2" in result.output
    assert not (tmp_path / "x.gguf").exists()


def test_moe_with_unequal_expert_ranks_is_refused_by_name(tmp_path, moe):
    adapter = random_adapter(moe, r=4, mixed=False)
    name = EXPERT.format(l=0, e=1, p="down_proj")
    mod = adapter.modules[name]
    adapter.modules[name] = AdapterModule(name, mod.A[:2].clone(), mod.B[:, :2].clone())
    adapter.config.rank_pattern = {f"^{name}$": 2}
    adapter.save(tmp_path / "a")
    result = run("export", tmp_path / "a", "--to", "gguf", "--base", moe, "-o", tmp_path / "x.gguf")
    assert result.exit_code == 2
    assert "blk.0.ffn_down_exps.weight" in result.output and f"{name} (r=2)" in result.output
    assert "lorasurg rerank --r" in result.output and not (tmp_path / "x.gguf").exists()


def test_moe_needs_the_expert_count(tmp_path, moe):
    adapter = random_adapter(moe, r=4, mixed=False, targets=["gate_proj", "up_proj", "down_proj"])
    adapter.config.base_model_name_or_path = None
    adapter.config.auto_mapping = {"base_model_class": "Qwen3MoeForCausalLM"}
    adapter.save(tmp_path / "a")
    result = run("export", tmp_path / "a", "--to", "gguf", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 2 and "how many experts" in result.output and "--base" in result.output


def test_fused_expert_lora_is_refused_by_name(tmp_path, moe):
    """PEFT's target_parameters layout (LoRA on the fused 3-D experts) is not per-module: refused, naming it."""
    adapter = random_adapter(moe, r=4, mixed=False, targets=["q_proj"])
    adapter.config.target_parameters = ["mlp.experts.gate_up_proj"]
    adapter.save(tmp_path / "a")
    result = run("export", tmp_path / "a", "--to", "gguf", "--base", moe, "-o", tmp_path / "x.gguf")
    assert result.exit_code == 2 and "target_parameters: mlp.experts.gate_up_proj" in result.output
    assert not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------------------------------------------ left out


def test_position_embedding_lora_is_left_out_with_its_share(tmp_path):
    """GPT-2 with a LoRA on the position embedding wpe (llama.cpp adds position_embd without one): left out, with
    its share of the delta energy (from the factors); the Conv1D LoRAs written."""
    adapter = random_adapter(GPT2, r=4, mixed=False, fan_in_fan_out=True)
    gen = torch.Generator().manual_seed(3)
    adapter.modules["transformer.wpe"] = AdapterModule("transformer.wpe", torch.randn(4, 32, generator=gen) * 0.1,
                                                       torch.randn(64, 4, generator=gen) * 0.1, embedding=True)
    adapter.config.target_modules = set(adapter.config.target_modules) | {"wpe"}
    adapter.save(tmp_path / "a")
    result = run("export", tmp_path / "a", "--to", "gguf", "--base", GPT2, "-o", tmp_path / "g.gguf", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    left = {x["name"]: x for x in report["left_out_by_consumer"]["llama.cpp-gguf"]}
    assert "position_embd.weight is added without one" in left["transformer.wpe"]["why"]
    assert 0 < left["transformer.wpe"]["share"] < 1
    written = {p["name"] for p in report["tensors"]}
    assert "blk.0.attn_qkv.weight" in written and "position_embd.weight" not in written
    assert any("Conv1D" in n for n in report["notes"])


def test_bias_deltas_are_left_out_with_their_share(tmp_path):
    """Qwen2 q/k/v with lora_B.bias: no GGUF form, so left out and listed with each bias's share of the energy;
    the factors are written (and what llama.cpp computes from them is PEFT's delta less the bias)."""
    adapter = random_adapter(QWEN2, r=4, mixed=False, targets=["q_proj", "k_proj", "v_proj"], lora_bias=True)
    gen = torch.Generator().manual_seed(3)
    for mod in adapter.modules.values():
        mod.bias = torch.randn(mod.B.shape[0], generator=gen)
    report = export_gguf(adapter, tmp_path / "q.gguf", base=QWEN2)
    left = report.for_report.left_out_for("llama.cpp-gguf")
    assert len(left) == 6 and {x.feature for x in left} == {"lora_bias"}
    assert all(0 < x.share < 1 for x in left)
    assert len(report.pairs) == 6
    assert "lora_B.bias" in report.render()


def test_whole_embedding_in_modules_to_save_is_refused_with_what_to_do(tmp_path):
    adapter = random_adapter(LLAMA, r=4, targets=["q_proj"], mixed=False, modules_to_save=["embed_tokens"])
    adapter.extra["model.embed_tokens.weight"] = torch.zeros(256, 64)
    adapter.save(tmp_path / "a")
    result = run("export", tmp_path / "a", "--to", "gguf", "--base", LLAMA, "-o", tmp_path / "x.gguf")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "model.embed_tokens.weight" in result.output and "lorasurg fuse" in result.output
    assert "convert_hf_to_gguf.py" in result.output and not (tmp_path / "x.gguf").exists()


def test_an_architecture_without_a_name_map_is_refused_by_name(tmp_path):
    adapter = random_adapter(LLAMA, r=4, targets=["q_proj"], mixed=False)
    adapter.config.base_model_name_or_path = None
    adapter.config.auto_mapping = {"base_model_class": "MambaForCausalLM"}
    adapter.save(tmp_path / "a")
    result = run("export", tmp_path / "a", "--to", "gguf", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 2 and "architecture MambaForCausalLM" in result.output
    assert "LlamaForCausalLM" in result.output and not (tmp_path / "x.gguf").exists()


def test_facts_the_adapter_cannot_say_ask_for_base(tmp_path):
    """Without BASE: no architecture at all; a Llama q_proj needs the head count; an lm_head LoRA needs the tying."""
    adapter = random_adapter(LLAMA, r=4, targets=["v_proj", "lm_head"], mixed=False)
    adapter.config.base_model_name_or_path = None
    adapter.save(tmp_path / "none")
    result = run("export", tmp_path / "none", "--to", "gguf", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 2 and "which architecture" in result.output
    adapter.config.auto_mapping = {"base_model_class": "LlamaForCausalLM"}
    adapter.save(tmp_path / "head")
    result = run("export", tmp_path / "head", "--to", "gguf", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 2 and "output head (lm_head)" in result.output
    q = random_adapter(LLAMA, r=4, targets=["q_proj"], mixed=False)
    q.config.base_model_name_or_path, q.config.auto_mapping = None, {"base_model_class": "LlamaForCausalLM"}
    q.save(tmp_path / "q")
    result = run("export", tmp_path / "q", "--to", "gguf", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 2 and "how many heads" in result.output
    assert not (tmp_path / "x.gguf").exists()


def test_existing_output_needs_force(tmp_path):
    adapter = random_adapter(QWEN2, r=4, targets=["q_proj"], mixed=False)
    adapter.save(tmp_path / "a")
    (tmp_path / "x.gguf").write_bytes(b"keep")
    result = run("export", tmp_path / "a", "--to", "gguf", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 2 and "--force" in result.output
    assert (tmp_path / "x.gguf").read_bytes() == b"keep"
    assert run("export", tmp_path / "a", "--to", "gguf", "-o", tmp_path / "x.gguf", "--force").exit_code == 0
    assert (tmp_path / "x.gguf").read_bytes()[:4] == b"GGUF"


def test_streamed_file_equals_the_in_memory_export(tmp_path):
    """Reading the adapter one module at a time (a directory) and exporting it from memory write the same bytes."""
    adapter = random_adapter(LLAMA, r=4)
    adapter.save(tmp_path / "a")
    export_gguf(tmp_path / "a", tmp_path / "disk.gguf", base=LLAMA)
    export_gguf(Adapter.load(tmp_path / "a"), tmp_path / "memory.gguf", base=LLAMA)
    assert (tmp_path / "disk.gguf").read_bytes() == (tmp_path / "memory.gguf").read_bytes()


# ------------------------------------------------------------------------------------------------ --to gguf


def test_extract_to_gguf_plans_for_llama_cpp(tmp_path):
    """extract --to gguf on GPT-2: the tied lm_head and the token-embedding LoRA are left out (llama.cpp has no
    output.weight, and its head's product would take the embedding's pair), the Conv1D LoRAs written; the file
    validates clean against BASE."""
    report = extract_to_dir(GPT2, FIXTURES["gpt2"].parent / "tuned", tmp_path / "g.gguf", r=4, to="gguf",
                            device="cpu")
    assert report.consumers == ["llama.cpp-gguf"]
    names = {p.name for p in report.gguf.pairs}
    assert "blk.1.attn_qkv.weight" in names and not names & {"output.weight", "token_embd.weight"}
    left = {x.name: x for x in report.for_report.left_out + report.gguf.for_report.left_out}
    assert "ggml_can_mul_mat" in left["transformer.wte"].reason and left["transformer.wte"].share > 0
    assert left["lm_head"].feature == "tied_head_lora"
    assert validate(tmp_path / "g.gguf", GPT2) == []


def test_to_gguf_refuses_other_consumers_and_checks_before_work(tmp_path):
    result = run("rerank", FIXTURES["llama"], "--r", "2", "--to", "gguf", "--for", "vllm", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 2 and "only llama.cpp reads" in result.output
    result = run("extract", "fixtures/buffers/bert/base", "fixtures/buffers/bert/tuned", "--to", "gguf",
                 "-o", tmp_path / "b.gguf")
    assert result.exit_code == 2 and "architecture BertModel" in result.output


def test_rerank_to_gguf_json_has_both_reports(tmp_path):
    extract_to_dir(LLAMA, LLAMA.parent / "tuned", tmp_path / "a", r=8, device="cpu")
    result = run("rerank", tmp_path / "a", "--r", "4", "--to", "gguf", "--outtype", "f16", "-o", tmp_path / "r.gguf",
                 "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["output"] == str(tmp_path / "r.gguf") and data["gguf"]["outtype"] == "f16"
    assert data["gguf"]["facts_from"].endswith("(the adapter's base_model_name_or_path)")


# ------------------------------------------------------------------------------------------------ inspect, validate


def test_inspect_reads_a_gguf_file(tmp_path):
    adapter = random_adapter(LLAMA, r=4)
    export_gguf(adapter, tmp_path / "a.gguf", base=LLAMA)
    report = inspect_adapter(tmp_path / "a.gguf")
    assert report.metadata["general.architecture"] == "llama"
    q1 = next(p for p in report.pairs if p.name == "blk.1.attn_q.weight")
    assert q1.rank == 3 and q1.scale == pytest.approx(report.metadata["adapter.lora.alpha"] / 3)
    expected = delta_matrix(consumer_delta(adapter, "peft", "model.layers.1.self_attn.q_proj"))
    assert q1.delta_norm == pytest.approx(float(torch.linalg.matrix_norm(expected.double())), rel=1e-5)
    assert "blk.1.attn_q.weight" in run("inspect", tmp_path / "a.gguf").output


def test_validate_checks_a_gguf_file_against_base(tmp_path):
    adapter = random_adapter(QWEN2, r=4)
    export_gguf(adapter, tmp_path / "a.gguf", base=QWEN2)
    assert validate(tmp_path / "a.gguf", QWEN2) == []
    result = run("validate", tmp_path / "a.gguf", "--base", LLAMA)
    assert result.exit_code == 1 and "gguf-architecture" in result.output
    assert run("validate", tmp_path / "a.gguf", "--fix", "-o", tmp_path / "f").exit_code == 2


def test_validate_flags_a_token_embedding_pair_on_a_tied_base(tmp_path):
    """llama.cpp's converter writes token_embd pairs for tied bases too; validate says llama.cpp stops on them."""
    export_gguf(random_adapter(LLAMA, r=4, mixed=False), tmp_path / "a.gguf", base=LLAMA)
    tied = tmp_path / "tied"
    tied.mkdir()
    config = json.loads((LLAMA / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    (tied / "model.safetensors").symlink_to(LLAMA / "model.safetensors")
    found = [(f.code, f.where) for f in validate(tmp_path / "a.gguf", tied)]
    assert ("consumer-refuses", "llama.cpp: token_embd.weight") in found
    assert ("module-missing", "output.weight") in found
