"""Each consumer rule on a hand-checked example; each docstring cites the consumer source it was read from.

Versions: PEFT 0.21.2; vLLM 0.34.0 (and 0.31.0 for ``vllm<0.32``); llama.cpp 0c1e57098, as vendored in
llama-cpp-python 0.3.36. Line numbers are those of these versions.
"""

from __future__ import annotations

import math

import pytest
import torch

from lorasurg import LoraConfig
from lorasurg.consumers import (
    CONSUMERS,
    FEATURES,
    adapter_features,
    consumer_delta,
    consumer_findings,
    consumer_scale,
    consumer_verdicts,
    parse_consumers,
    prepare_for,
)
from lorasurg.engine.factors import delta_matrix
from lorasurg.errors import ConfigError, InputError
from lorasurg.io.adapter import Adapter, AdapterModule


def _lin(name: str, r: int, out: int = 6, inp: int = 5, seed: int = 0, **kw) -> AdapterModule:
    g = torch.Generator().manual_seed(seed)
    return AdapterModule(name, torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g), **kw)


def _adapter(config: LoraConfig, *mods: AdapterModule, extra=None) -> Adapter:
    return Adapter(config, {m.name: m for m in mods}, dict(extra or {}))


def _codes(adapter, consumer):
    return {f.code: f for f in consumer_findings(adapter, consumer)}


# ------------------------------------------------------------------------------------------------ scales
MIXED = LoraConfig(r=22, lora_alpha=22, target_modules=["q", "v"], rank_pattern={"v": 4}, alpha_pattern={"v": 4})


def test_peft_scale_from_patterns():
    """PEFT: scale = alpha_m / r_m from rank_pattern/alpha_pattern (peft/tuners/lora/model.py lines 309-312,
    peft/tuners/lora/layer.py lines 278-281). v: 4/4 = 1; q: 22/22 = 1."""
    a = _adapter(MIXED, _lin("l.q", 22), _lin("l.v", 4))
    assert consumer_scale(a, "peft", "l.v") == 1.0 and consumer_scale(a, "peft", "l.q") == 1.0


def test_vllm_reads_the_patterns_since_0_32():
    """vLLM 0.34.0: PEFTHelper.get_rank_and_scaling matches rank_pattern/alpha_pattern keys as PEFT does
    (vllm/lora/peft_helper.py lines 129-160): v gets 4/4 = 1."""
    a = _adapter(MIXED, _lin("l.q", 22), _lin("l.v", 4))
    assert consumer_scale(a, "vllm", "l.v") == 1.0
    assert "scale" not in _codes(a, "vllm")


def test_vllm_before_0_32_uses_one_global_scale():
    """vLLM 0.31.0: vllm_lora_scaling_factor = lora_alpha / r (or / sqrt(r) with rsLoRA) for the whole adapter
    (vllm/lora/peft_helper.py lines 60-65). With r=8, lora_alpha=16, rsLoRA, a rank-2 module with alpha 4:
    PEFT 4/sqrt(2), vLLM<0.32 16/sqrt(8) = 4*sqrt(2), i.e. 2x. Reported as a warning under vllm."""
    cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q", "v"], rank_pattern={"v": 2},
                     alpha_pattern={"v": 4})
    a = _adapter(cfg, _lin("l.q", 8), _lin("l.v", 2))
    assert consumer_scale(a, "vllm<0.32", "l.v") == pytest.approx(16 / math.sqrt(8))
    assert consumer_scale(a, "peft", "l.v") == pytest.approx(4 / math.sqrt(2))
    legacy = _codes(a, "vllm")["legacy-scale"]
    assert legacy.severity == "warning" and legacy.modules == ("l.v",)
    assert legacy.message.startswith("vLLM before 0.32 applies 2x PEFT's scale on 1 module(s)")


def test_llama_cpp_scale_is_global_alpha_over_tensor_rank():
    """llama.cpp: get_scale = alpha / b->ne[0] (src/llama-adapter.h lines 53-57), alpha from the config's
    lora_alpha only (convert_lora_to_gguf.py line 528). 22 / 4 = 5.5 where PEFT has 1."""
    a = _adapter(MIXED, _lin("l.q", 22), _lin("l.v", 4))
    assert consumer_scale(a, "llama.cpp", "l.v") == 5.5 and consumer_scale(a, "llama.cpp", "l.q") == 1.0
    f = _codes(a, "llama.cpp")["scale"]
    assert f.modules == ("l.v",) and "5.5x PEFT's scale on 1 module(s): lora_alpha=22 with rank 4" in f.message


def test_llama_cpp_ignores_rslora():
    """llama.cpp has no rsLoRA (src/llama-adapter.h lines 53-57): r=4, lora_alpha=16, use_rslora gives PEFT
    16/2 = 8 but llama.cpp 16/4 = 4, i.e. 0.5x."""
    cfg = LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q"])
    a = _adapter(cfg, _lin("l.q", 4))
    assert consumer_scale(a, "peft", "l.q") == 8 and consumer_scale(a, "llama.cpp", "l.q") == 4
    assert "0.5x PEFT's scale" in _codes(a, "llama.cpp")["scale"].message
    assert "use_rslora not read" in _codes(a, "llama.cpp")["scale"].message


def test_llama_cpp_alpha_zero_means_scale_one():
    """get_scale: ``alpha ? adapter_scale * alpha / rank : adapter_scale`` (src/llama-adapter.h line 55)."""
    a = _adapter(LoraConfig(r=4, lora_alpha=0, target_modules=["q"]), _lin("l.q", 4))
    assert consumer_scale(a, "llama.cpp", "l.q") == 1.0 and consumer_scale(a, "peft", "l.q") == 0.0


# ------------------------------------------------------------------------------------------------ refusals and drops


def test_lora_bias_refused_by_vllm_and_llama_cpp():
    """vLLM: PEFTHelper._validate_features refuses lora_bias (vllm/lora/peft_helper.py lines 69-70) and
    parse_fine_tuned_lora_name raises on lora_B.bias (vllm/lora/utils.py lines 223-236). llama.cpp: the converter
    exits on any tensor that is not lora_A/B (convert_lora_to_gguf.py lines 467-483)."""
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q"], lora_bias=True)
    a = _adapter(cfg, _lin("l.q", 2, bias=torch.ones(6)))
    for consumer in ("vllm", "llama.cpp"):
        f = _codes(a, consumer)["refuses:lora_bias"]
        assert f.severity == "error" and f.modules == ("l.q",)
        assert consumer_delta(a, consumer, "l.q").bias is None
    assert torch.equal(consumer_delta(a, "peft", "l.q").bias, torch.ones(6))
    written, report = prepare_for(a, "vllm")
    assert written.config.lora_bias is False and written.modules["l.q"].bias is None
    (item,) = report.left_out
    # bias energy ||2 * 1||^2 * 6 over it plus the LoRA's ||2 B A||^2
    lora = float(delta_matrix(consumer_delta(a, "peft", "l.q"), torch.float64).pow(2).sum())
    assert item.share == pytest.approx(24 / (24 + lora))


def test_dora_refused_by_vllm_and_llama_cpp():
    """vLLM: "does not yet support DoRA" (vllm/lora/peft_helper.py lines 67-68). llama.cpp: lora_magnitude_vector
    stops the converter (convert_lora_to_gguf.py lines 467-483)."""
    a = _adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q"], use_dora=True),
                 _lin("l.q", 2, magnitude=torch.ones(6)))
    assert _codes(a, "vllm")["refuses:dora"].severity == "error"
    assert _codes(a, "llama.cpp")["refuses:dora"].severity == "error"


def test_modules_to_save_refused_and_saved_norms_dropped_by_llama_cpp():
    """vLLM refuses modules_to_save other than classifier/score (vllm/lora/peft_helper.py lines 57-66).
    llama.cpp's converter exits on a saved embedding (convert_lora_to_gguf.py lines 478-483) but keeps a norm
    (lines 476-478), which the loader then skips (src/llama-adapter.cpp lines 290-293): a silent drop."""
    cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["q"], modules_to_save=["embed_tokens", "norm"])
    extra = {"model.embed_tokens.weight": torch.ones(10, 5), "model.norm.weight": torch.ones(5)}
    a = _adapter(cfg, _lin("l.q", 2), extra=extra)
    assert adapter_features(a)["modules_to_save"] == ["model.embed_tokens.weight"]
    assert adapter_features(a)["saved_norms"] == ["model.norm.weight"]
    lc = _codes(a, "llama.cpp")
    assert lc["refuses:modules_to_save"].severity == "error"
    assert lc["drops:saved_norms"].severity == "error" and "silently" in lc["drops:saved_norms"].message
    assert {"refuses:modules_to_save", "refuses:saved_norms"} <= set(_codes(a, "vllm"))
    written, report = prepare_for(a, "llama.cpp", delta_energy={"model.norm.weight": 3.0})
    assert written.extra == {} and written.config.modules_to_save is None
    shares = {x.name: x.share for x in report.left_out}
    assert shares["model.embed_tokens.weight"] is None and shares["model.norm.weight"] > 0


def test_embedding_lora_depends_on_the_vllm_model_class():
    """vLLM reads embedding LoRA only for model classes listing it in embedding_modules (vllm/lora/utils.py
    get_supported_lora_modules lines 248-262; vllm/model_executor/models/llama.py lines 479-482; Qwen2 lists none).
    llama.cpp reads it (convert_lora_to_gguf.py lines 470-471, 521-523; src/llama-graph.cpp build_inp_embd)."""
    g = torch.Generator().manual_seed(1)
    emb = AdapterModule("model.embed_tokens", torch.randn(2, 10, generator=g), torch.randn(5, 2, generator=g),
                        embedding=True)
    a = _adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["embed_tokens", "q"]), emb, _lin("l.q", 2))
    f = _codes(a, "vllm")["model-dependent:embedding_lora"]
    assert f.severity == "warning"
    assert consumer_delta(a, "vllm", "model.embed_tokens") is not None  # read where the model supports it
    assert "model-dependent:embedding_lora" not in _codes(a, "llama.cpp")
    written, report = prepare_for(a, "vllm")  # left out: served everywhere
    assert list(written.modules) == ["l.q"] and report.left_out[0].feature == "embedding_lora"
    assert written.config.target_modules == {"q"}


def test_tied_head_refused_by_llama_cpp():
    """A tied head has no output.weight in the base GGUF: the loader throws "does not exist in base model"
    (src/llama-adapter.cpp lines 333-336), or the converter raises for archs that drop the tied head
    (convert_lora_to_gguf.py lines 501-508). Recognised as extract writes it: the embedding's factors transposed."""
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(2, 10, generator=g), torch.randn(5, 2, generator=g)
    emb = AdapterModule("model.embed_tokens", A, B, embedding=True)
    head = AdapterModule("lm_head", B.T.contiguous(), A.T.contiguous())
    a = _adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["embed_tokens", "lm_head"]), emb, head)
    assert adapter_features(a)["tied_head_lora"] == ["lm_head"]
    assert _codes(a, "llama.cpp")["refuses:tied_head_lora"].modules == ("lm_head",)
    assert consumer_delta(a, "llama.cpp", "lm_head") is None
    untied = adapter_features(a, tied=[])
    assert "tied_head_lora" not in untied and untied["output_layer_lora"] == ["lm_head"]


def test_fan_in_fan_out_lora_is_transposed_by_llama_cpp():
    """GPT2Model.modify_tensors transposes c_attn/c_proj/c_fc (conversion/gpt2.py lines 33-34) and the LoRA
    pair with it (convert_lora_to_gguf.py LoraTorchTensor.permute swaps and transposes A and B), but PEFT stores
    those factors as for nn.Linear: llama.cpp applies (B @ A).T (or refuses a non-square layer,
    src/llama-adapter.cpp lines 365-366)."""
    a = _adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["c_proj"], fan_in_fan_out=True),
                 _lin("h.0.attn.c_proj", 2, out=4, inp=4))
    peft = delta_matrix(consumer_delta(a, "peft", "h.0.attn.c_proj"))
    ours = delta_matrix(consumer_delta(a, "llama.cpp", "h.0.attn.c_proj"))
    torch.testing.assert_close(ours, peft.T)
    assert _codes(a, "llama.cpp")["misreads:fan_in_fan_out_lora"].severity == "error"
    assert "misreads:fan_in_fan_out_lora" not in _codes(a, "vllm")


def test_conv_lora():
    """vLLM puts LoRA on LinearBase/MoE layers only (vllm/lora/utils.py lines 259-260; others are unexpected,
    vllm/lora/lora_model.py lines 281-285). llama.cpp applies LoRA in build_lora_mm/build_lora_mm_id/
    build_inp_embd only (src/llama-graph.cpp lines 1520-1552, 2403-2417), never to a convolution."""
    g = torch.Generator().manual_seed(3)
    conv = AdapterModule("c", torch.randn(2, 3, 3, 3, generator=g), torch.randn(4, 2, 1, 1, generator=g))
    a = _adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["c", "q"]), conv, _lin("l.q", 2))
    assert _codes(a, "vllm")["refuses:conv_lora"].modules == ("c",)
    assert _codes(a, "llama.cpp")["drops:conv_lora"].modules == ("c",)
    assert consumer_delta(a, "llama.cpp", "c") is None and consumer_delta(a, "peft", "c") is not None


def test_vllm_refuses_base_rewriting_inits():
    """PEFTHelper._init_is_supported refuses pissa/olora/corda/loftq (vllm/lora/peft_helper.py lines 71-101);
    prepare_for writes init_lora_weights=true and says the adapter belongs on its residual base."""
    a = _adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q"], init_lora_weights="pissa_niter_4"), _lin("l.q", 2))
    assert _codes(a, "vllm")["refuses:init_weights"].severity == "error"
    written, report = prepare_for(a, "vllm")
    assert written.config.init_lora_weights is True and "residual base" in report.notes[0]


def test_vllm_max_lora_rank_warning():
    """vLLM refuses ranks above --max-lora-rank, default 16 (vllm/config/lora.py line 33; PEFTHelper.validate_legal,
    vllm/lora/peft_helper.py lines 195-205)."""
    a = _adapter(LoraConfig(r=24, lora_alpha=24, target_modules=["q"]), _lin("l.q", 24))
    f = _codes(a, "vllm")["max-rank"]
    assert f.severity == "warning" and "--max-lora-rank 32" in f.hint


# ------------------------------------------------------------------------------------------------ prepare_for details


def test_rescale_splits_the_factor_between_A_and_B_and_keeps_the_sign():
    """A negative alpha_pattern gives a negative PEFT scale: B carries the sign, A and B sqrt(|c|) each."""
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["q", "v"], alpha_pattern={"v": -8})
    a = _adapter(cfg, _lin("l.q", 4), _lin("l.v", 4, seed=1))
    written, report = prepare_for(a, "vllm")
    assert report.rescaled == {"l.v": -2.0}
    torch.testing.assert_close(written.modules["l.v"].A, a.modules["l.v"].A * math.sqrt(2))
    torch.testing.assert_close(written.modules["l.v"].B, a.modules["l.v"].B * -math.sqrt(2))
    assert written.config.alpha_pattern == {} and written.config.lora_alpha == 4


def test_untargeting_a_regex_target_uses_exclude_modules():
    g = torch.Generator().manual_seed(1)
    emb = AdapterModule("model.embed_tokens", torch.randn(2, 10, generator=g), torch.randn(5, 2, generator=g),
                        embedding=True)
    a = _adapter(LoraConfig(r=2, lora_alpha=2, target_modules=r".*(embed_tokens|q)"), emb, _lin("l.q", 2))
    written, _ = prepare_for(a, "vllm")
    assert written.config.exclude_modules == {"model.embed_tokens"} and written.problems() == []


def test_nothing_left_is_refused():
    g = torch.Generator().manual_seed(1)
    conv = AdapterModule("c", torch.randn(2, 3, 3, 3, generator=g), torch.randn(4, 2, 1, 1, generator=g))
    with pytest.raises(InputError, match="nothing of this adapter can be written for llama.cpp.*conv_lora"):
        prepare_for(_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["c"]), conv), "llama.cpp")


def test_parse_consumers():
    assert parse_consumers("all") == ("peft", "vllm", "llama.cpp")
    assert parse_consumers("llama.cpp, VLLM") == ("vllm", "llama.cpp")
    assert parse_consumers(["vllm", "peft,llama.cpp"]) == ("peft", "vllm", "llama.cpp")
    assert parse_consumers(None) == ("peft",)
    with pytest.raises(ConfigError, match="unknown consumer.*'tgi'.*peft, vllm, llama.cpp or all"):
        parse_consumers("vllm,tgi")


def test_every_rule_names_its_source():
    for c in CONSUMERS.values():
        assert c.version and c.scale_source.file
        for feature, rule in c.rules.items():
            assert feature in FEATURES and rule.source.file and rule.source.version and rule.says


def test_verdicts_one_line_each():
    a = _adapter(MIXED, _lin("l.q", 22), _lin("l.v", 4))
    lines = {v.consumer: v for v in consumer_verdicts(a)}
    assert set(lines) == {"peft", "vllm", "llama.cpp"}
    assert lines["vllm"].same_as_peft and lines["vllm"].line == "vLLM: as PEFT, except where noted: " + \
        "vLLM refuses ranks above --max-lora-rank, 16 by default; this adapter's largest rank is 22"
    assert not lines["llama.cpp"].same_as_peft and "5.5x" in lines["llama.cpp"].line
    assert all("\n" not in v.line for v in lines.values())
