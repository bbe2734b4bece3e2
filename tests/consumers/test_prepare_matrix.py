"""``prepare_for`` over a matrix of adapters: each consumer's reading rule, applied to the adapter written for it,
gives PEFT's per-module delta; ``consumer_findings`` reports every module a consumer misreads when it was not.

The matrix: ``extract`` outputs (fixed rank, rank policy, lora_bias, full embeddings, embedding LoRA with a tied
head, GPT-2's fan_in_fan_out) and adapters built directly (rsLoRA with per-module ranks and alphas, DoRA, conv).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from lorasurg import LoraConfig
from lorasurg.consumers import adapter_features, consumer_delta, consumer_findings, prepare_for
from lorasurg.engine.factors import delta_matrix
from lorasurg.io.adapter import Adapter, AdapterModule
from lorasurg.surgery.extract import extract
from lorasurg.targeting import anchored_pattern_key

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
REL = 1e-5


def _pair(arch: str):
    return FIXTURES / f"tiny-{arch}" / "base", FIXTURES / f"tiny-{arch}" / "tuned"


def _rslora_adapter() -> Adapter:
    """rsLoRA, ranks 8/4/2 from rank_pattern, alphas 16/6/3 from alpha_pattern: scales 16/sqrt(8), 3, 3/sqrt(2)."""
    g = torch.Generator().manual_seed(3)
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj", "o_proj")]
    ranks = {"q_proj": 8, "v_proj": 4, "o_proj": 2}
    cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj"],
                     rank_pattern={"v_proj": 4, "o_proj": 2}, alpha_pattern={"v_proj": 6, "o_proj": 3})
    mods = {}
    for n in names:
        r = ranks[n.rsplit(".", 1)[-1]]
        mods[n] = AdapterModule(n, torch.randn(r, 16, generator=g), torch.randn(24, r, generator=g))
    return Adapter(cfg, mods)


def _dora_adapter() -> Adapter:
    g = torch.Generator().manual_seed(4)
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 2},
                     alpha_pattern={"k_proj": 2})
    mods = {
        "m.q_proj": AdapterModule("m.q_proj", torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g),
                                  magnitude=torch.rand(10, generator=g) + 0.5),
        "m.k_proj": AdapterModule("m.k_proj", torch.randn(2, 12, generator=g), torch.randn(6, 2, generator=g),
                                  magnitude=torch.rand(6, generator=g) + 0.5),
    }
    return Adapter(cfg, mods)


def _conv_adapter() -> Adapter:
    g = torch.Generator().manual_seed(5)
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["conv", "proj"], rank_pattern={"proj": 2},
                     alpha_pattern={"proj": 4})
    mods = {
        "net.conv": AdapterModule("net.conv", torch.randn(4, 3, 3, 3, generator=g), torch.randn(8, 4, 1, 1, generator=g)),
        "net.proj": AdapterModule("net.proj", torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)),
    }
    return Adapter(cfg, mods)


CASES = {
    "llama-fixed": lambda: extract(*_pair("llama"), r=8, embeddings="lora")[0],
    "llama-energy": lambda: extract(*_pair("llama"), r=32, rank_policy="energy:0.9", embeddings="lora")[0],
    "llama-full-embeddings": lambda: extract(*_pair("llama"), r=6, embeddings="full", alpha=12)[0],
    "qwen2-lora-bias": lambda: extract(*_pair("qwen2"), r=8, rank_policy="energy:0.95")[0],
    "qwen2-tied-embedding-lora": lambda: extract(*_pair("qwen2"), r=8, lora_bias=False, embeddings="lora")[0],
    "gpt2-fan-in-fan-out": lambda: extract(*_pair("gpt2"), r=4, rank_policy="energy:0.5", embeddings="lora")[0],
    "rslora": _rslora_adapter,
    "dora": _dora_adapter,
    "conv": _conv_adapter,
}


@functools.lru_cache(maxsize=None)
def case(name: str) -> Adapter:
    return CASES[name]()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:  # a transposed delta
        return float("inf")
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def _peft_delta(adapter: Adapter, module: str) -> torch.Tensor:
    f = consumer_delta(adapter, "peft", module)
    return delta_matrix(f.with_scale(f.scale), torch.float64) if f is not None else None


@pytest.mark.parametrize("consumer", ["peft", "vllm", "llama.cpp", "all"])
@pytest.mark.parametrize("name", list(CASES))
def test_written_for_a_consumer_it_computes_peft_delta(name, consumer):
    original = case(name)
    try:
        written, report = prepare_for(original, consumer)
    except Exception as err:  # only acceptable: nothing the consumers can carry
        assert "nothing of this adapter can be written" in str(err), err
        # GPT-2 for llama.cpp: Conv1D LoRA (transposed by the converter), the tied wte and lm_head: nothing is left
        assert name == "gpt2-fan-in-fan-out" and consumer in ("llama.cpp", "all"), err
        return
    readers = {"peft": ["peft"], "vllm": ["peft", "vllm", "vllm<0.32"], "llama.cpp": ["peft", "llama.cpp"],
               "all": ["peft", "vllm", "vllm<0.32", "llama.cpp"]}[consumer]
    assert written.problems() == []
    for module in written.modules:
        want = _peft_delta(original, module)
        want_bias = original.modules[module].bias
        for reader in readers:
            got = consumer_delta(written, reader, module)
            assert got is not None, (reader, module)
            assert _rel(delta_matrix(got, torch.float64), want) <= REL, (reader, module)
            if got.bias is not None:  # lora_B.bias is applied as scale * bias
                expect = original.modules[module].bias.double() * consumer_delta(original, "peft", module).scale
                assert _rel(got.bias.double() * got.scale, expect) <= REL
            elif reader == "peft" and want_bias is not None and original.config.lora_bias:
                assert consumer != "peft" and "lora_bias" in {x.feature for x in report.left_out}
    # nothing the consumers read differs from PEFT, and nothing they refuse is left in
    errors = [f for f in consumer_findings(written, consumer) if f.severity == "error" or f.code == "legacy-scale"]
    assert errors == []
    # everything that was dropped is listed, with its share where it is known
    gone = set(original.modules) - set(written.modules)
    listed = {x.name for x in report.left_out}
    assert gone <= listed
    gone_extra = {k for k in original.extra if k not in written.extra}
    assert gone_extra <= listed
    for x in report.left_out:
        if x.feature not in ("dora", "modules_to_save", "saved_norms", "trainable_tokens"):  # values, not deltas
            assert x.share is not None and 0 <= x.share <= 1


@pytest.mark.parametrize("consumer", ["vllm", "llama.cpp"])
@pytest.mark.parametrize("name", list(CASES))
def test_findings_report_every_module_a_consumer_misreads(name, consumer):
    adapter = case(name)
    found = consumer_findings(adapter, consumer)
    named = {m for f in found if f.severity == "error" for m in f.modules}
    features = adapter_features(adapter)
    for module in adapter.modules:
        got = consumer_delta(adapter, consumer, module)
        if got is None:  # the consumer drops or refuses this module: that is a finding
            assert module in named, module
            continue
        if _rel(delta_matrix(got, torch.float64), _peft_delta(adapter, module)) > REL:
            assert module in named, module
    for feature in ("lora_bias", "modules_to_save", "saved_norms", "dora"):
        if feature in features:
            assert any(f.code.endswith(":" + feature) for f in found), feature


def test_the_issue_example_llama_cpp_scale():
    """extract --rank-policy energy:0.9 --r 32 on the tiny Llama: r=22, lora_alpha=22, most modules rank 4.
    llama.cpp's get_scale (src/llama-adapter.h lines 53-57) applies 22/4 = 5.5x PEFT's scale there."""
    adapter = case("llama-energy")
    assert (adapter.config.r, adapter.config.lora_alpha) == (22, 22)
    scale = [f for f in consumer_findings(adapter, "llama.cpp") if f.code == "scale"]
    assert len(scale) == 1
    f = scale[0]
    assert f.severity == "error" and f.consumer == "llama.cpp"
    assert f.message.startswith(f"llama.cpp applies 5.5x PEFT's scale on {len(f.modules)} module(s): "
                                "lora_alpha=22 with rank 4")
    assert all(adapter.modules[m].rank == 4 for m in f.modules)
    written, report = prepare_for(adapter, "llama.cpp")
    assert written.config.alpha_pattern == {} and written.config.lora_alpha == 4 and written.config.r == 4
    assert report.layout == "tensor-rank"
    assert set(report.rescaled) == {m for m, mod in adapter.modules.items() if mod.rank != 4}


def test_all_pads_to_one_rank_and_counts_the_bytes():
    adapter = case("rslora")
    written, report = prepare_for(adapter, "all")
    assert report.layout == "padded" and written.config.r == 8
    assert {m.rank for m in written.modules.values()} == {8}
    assert written.config.rank_pattern == {} and written.config.alpha_pattern == {}
    assert written.config.use_rslora is False
    # v_proj: 4 extra rows of A (16) and columns of B (24); o_proj: 6 of each; float32; two layers
    assert report.padding_bytes == 2 * (4 * (16 + 24) + 6 * (16 + 24)) * 4
    assert set(report.padded) == {n for n in adapter.modules if not n.endswith("q_proj")}


def test_vllm_layout_keeps_one_scale_and_patterns_for_ranks():
    adapter = case("rslora")
    written, report = prepare_for(adapter, "vllm")
    cfg = written.config
    assert report.layout == "uniform-scale" and cfg.use_rslora is True and cfg.r == 8
    key = anchored_pattern_key("model.layers.0.self_attn.o_proj")
    assert cfg.rank_pattern[key] == 2
    # scales 16/sqrt(8), 3, 3/sqrt(2) on two modules each: every module is written at the first, so vLLM
    # before 0.32 (one global scale) reads them alike too
    scales = {consumer_delta(written, "vllm<0.32", m).scale for m in written.modules}
    assert len(scales) == 1


def test_dora_for_vllm_drops_the_magnitudes_and_says_the_share_is_unknown():
    written, report = prepare_for(case("dora"), "vllm")
    assert written.config.use_dora is False
    assert all(m.magnitude is None for m in written.modules.values())
    dora = [x for x in report.left_out if x.feature == "dora"]
    assert {x.name for x in dora} == {"m.q_proj", "m.k_proj"} and all(x.share is None for x in dora)


def test_tied_head_and_its_embedding_left_out_for_llama_cpp_only():
    adapter = case("qwen2-tied-embedding-lora")
    assert "lm_head" in adapter.modules and "model.embed_tokens" in adapter.modules
    written, report = prepare_for(adapter, "llama.cpp")
    assert "lm_head" not in written.modules and "model.embed_tokens" not in written.modules
    (item,) = [x for x in report.left_out if x.name == "lm_head"]
    assert item.feature == "tied_head_lora" and item.consumers == ("llama.cpp",) and item.share > 0
    (emb,) = [x for x in report.left_out if x.name == "model.embed_tokens"]  # the head's product would take its pair
    assert emb.feature == "tied_embedding_lora" and "ggml_can_mul_mat" in emb.reason and emb.share > 0
    assert not {"lm_head", "embed_tokens"} & set(written.config.target_modules or set())
    kept, _ = prepare_for(adapter, "peft")
    assert {"lm_head", "model.embed_tokens"} <= set(kept.modules)
    _, for_vllm = prepare_for(adapter, "vllm")  # its embedding and head rules decide there, not the tie
    assert "tied_embedding_lora" not in {x.feature for x in for_vllm.left_out}


def test_bfloat16_rescale_rounds_within_bfloat16_tolerance():
    adapter = case("rslora")
    bf = Adapter(adapter.config, {n: AdapterModule(n, m.A.bfloat16(), m.B.bfloat16()) for n, m in adapter.modules.items()})
    written, report = prepare_for(bf, "llama.cpp")
    assert report.rescaled and {m.A.dtype for m in written.modules.values()} == {torch.bfloat16}
    for m in written.modules:
        got = delta_matrix(consumer_delta(written, "llama.cpp", m), torch.float64)
        assert _rel(got, _peft_delta(bf, m)) < 1e-2
