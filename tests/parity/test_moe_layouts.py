"""PEFT 0.21.2 on transformers 5 against the MoE / multimodal layout rules of lorasurg.consumers.layouts.

Tiny Qwen3-MoE and Mixtral (4 experts, 2 layers; Mixtral names its experts block_sparse_moe.experts.E.w1/w2/w3),
DeepSeek-V3 (a dense first layer, then shared + routed experts) and Qwen2-VL, built with ``from_config`` and saved
with ``save_pretrained``. Per-expert adapters are written under the checkpoint's names; the reference is the dense
fine-tune: the checkpoint with ``W += s * B @ A`` on every adapted matrix, loaded with ``from_pretrained``. What the
rules say PEFT refuses, it raises on; what they say it misreads or drops, it loads with other outputs; and the same
adapters written by ``prepare_for(adapter, "peft")`` load with no missing key and the dense fine-tune's outputs.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from lorasurg import LoraConfig  # noqa: E402
from lorasurg.consumers import adapter_features, consumer_delta, prepare_for  # noqa: E402
from lorasurg.consumers.layouts import layout_violations  # noqa: E402
from lorasurg.engine.factors import delta_matrix  # noqa: E402
from lorasurg.io.adapter import Adapter, AdapterModule  # noqa: E402
from lorasurg.targeting import anchored_pattern_key  # noqa: E402

H, I, E, V = 32, 12, 4, 64
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
NAMES = {"mixtral": ("w1", "w3", "w2")}


def _config(kind: str):
    common = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                  max_position_embeddings=64)
    if kind == "qwen3_moe":
        return transformers.AutoConfig.for_model(kind, intermediate_size=I, moe_intermediate_size=I, num_experts=E,
                                                 num_experts_per_tok=2, head_dim=8, mlp_only_layers=[], **common)
    if kind == "mixtral":
        return transformers.AutoConfig.for_model(kind, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2,
                                                 head_dim=8, **common)
    return transformers.AutoConfig.for_model(  # deepseek_v3: layer 0 dense, layer 1 shared + routed experts
        kind, intermediate_size=I, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **{**common, "num_key_value_heads": 4})


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """``{kind: checkpoint directory}``, every matrix random (so every expert is routed to)."""
    out = {}
    for kind in ("qwen3_moe", "mixtral", "deepseek_v3"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(kind))
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.2)
        out[kind] = tmp_path_factory.mktemp(kind)
        model.save_pretrained(out[kind])
    return out


def expert_adapter(base, kind, *, skip=lambda key: False, rank=lambda key: 4, alpha=lambda key: 8.0,
                   extra=lambda key: False, **config) -> Adapter:
    """Per-expert LoRA on every expert matrix of the checkpoint (minus ``skip``), plus the matrices ``extra``
    selects; ranks and alphas per module through anchored patterns."""
    gen = torch.Generator().manual_seed(1)
    state = load_file(base / "model.safetensors")
    mods, ranks, alphas = {}, {}, {}
    for key in sorted(state):
        name = key.removesuffix(".weight")
        if not ((".experts." in key and key.endswith(".weight")) or extra(key)) or skip(key):
            continue
        out, inp = state[key].shape
        r = rank(key)
        mods[name] = AdapterModule(name, torch.randn(r, inp, generator=gen) * 0.3,
                                   torch.randn(out, r, generator=gen) * 0.3)
        if r != 4:
            ranks[anchored_pattern_key(name)] = r
        if alpha(key) != 8.0:
            alphas[anchored_pattern_key(name)] = alpha(key)
    targets = sorted({n.rsplit(".", 1)[-1] for n in mods})
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas, **config)
    return Adapter(cfg, mods)


def dense_logits(base, adapter: Adapter, tuned) -> torch.Tensor:
    """Logits of the checkpoint with PEFT's delta of every module of ``adapter`` added to its matrix (written to
    the directory ``tuned``)."""
    state = load_file(base / "model.safetensors")
    for name in adapter.modules:
        key = f"{name}.weight"
        state[key] = (state[key] + delta_matrix(consumer_delta(adapter, "peft", name))).contiguous()
    tuned.mkdir(exist_ok=True)
    save_file(state, tuned / "model.safetensors", metadata={"format": "pt"})
    (tuned / "config.json").write_text((base / "config.json").read_text())
    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(tuned).eval()(IDS).logits


def peft_logits(base, adapter: Adapter, directory):
    """PEFT's logits for ``adapter`` saved to ``directory``, and its missing-keys warnings."""
    adapter.save(directory, force=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(model, directory).eval()
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    with torch.no_grad():
        return loaded(IDS).logits, missing


def close(a, b) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def _ends(*suffixes):
    return lambda key: key.endswith(suffixes)


# ------------------------------------------------------------------------------------------------ the rules hold

CASES = {  # case -> (adapter kwargs, the PEFT condition it breaks, what PEFT does)
    "complete": (dict(), None, "reads"),
    "missing-expert": (dict(skip=lambda k: ".layers.1." in k and ".experts.3." in k), "all-experts", "refuses"),
    "no-down": (dict(skip=_ends("down_proj.weight", "w2.weight")), "all-projections", "misreads"),
    "expert-rank": (dict(rank=lambda k: 2 if ".experts.0." in k else 4), "one-rank", "refuses"),
    "expert-alpha": (dict(alpha=lambda k: 16.0 if ".experts.1." in k else 8.0), "one-alpha", "misreads"),
    "rslora": (dict(use_rslora=True), "no-rslora", "misreads"),
    "dropout": (dict(lora_dropout=0.05), "plain-options", "refuses"),
}


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("case", list(CASES))
def test_peft_reads_per_expert_lora_as_the_rules_say(bases, tmp_path, kind, case):
    """Each condition broken alone: PEFT raises where the rule says refuses, loads other outputs where it says
    misreads (no-down: the gate/up LoRA is not applied either, with a missing-keys warning); the complete adapter
    gives the dense fine-tune's logits."""
    kwargs, condition, treatment = CASES[case]
    base = bases[kind]
    adapter = expert_adapter(base, kind, **kwargs)
    assert {v.condition.code for v in layout_violations(adapter, "peft")} == ({condition} if condition else set())
    if treatment == "refuses":
        with pytest.raises((RuntimeError, ValueError)):
            peft_logits(base, adapter, tmp_path / "a")
        return
    logits, missing = peft_logits(base, adapter, tmp_path / "a")
    assert close(logits, dense_logits(base, adapter, tmp_path / "tuned")) == (treatment == "reads")
    assert bool(missing) == (case == "no-down")


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("case", [c for c in CASES if c != "complete"])
def test_prepared_for_peft_loads_exactly(bases, tmp_path, kind, case):
    """prepare_for(adapter, "peft") gives every expert and projection, one rank and scale, no dropout: PEFT loads it
    with no missing key and gives the dense fine-tune of the input adapter (missing matrices: zero delta)."""
    base = bases[kind]
    adapter = expert_adapter(base, kind, **CASES[case][0])
    prepared, _ = prepare_for(adapter, "peft")
    assert layout_violations(prepared, "peft") == []
    logits, missing = peft_logits(base, prepared, tmp_path / "a")
    assert missing == [] and close(logits, dense_logits(base, adapter, tmp_path / "tuned"))


def test_peft_drops_shared_experts_and_dense_mlp_unless_listed(bases, tmp_path):
    """DeepSeek-V3: LoRA on the shared experts and on layer 0's dense MLP is dropped (no warning); listing those
    modules in target_parameters as <module>.weight makes PEFT load them exactly."""
    base = bases["deepseek_v3"]
    others = re.compile(r"(shared_experts\.|layers\.0\.mlp\.)(gate|up|down)_proj\.weight$")
    adapter = expert_adapter(base, "deepseek_v3", extra=lambda k: bool(others.search(k)))
    (v,) = layout_violations(adapter, "peft")
    assert v.condition.code == "non-expert-mlp" and len(v.where) == 6
    dense = dense_logits(base, adapter, tmp_path / "tuned")
    logits, missing = peft_logits(base, adapter, tmp_path / "a")
    assert not close(logits, dense) and missing == []
    adapter.config.target_parameters = [f"{m}.weight" for m in v.where]
    logits, missing = peft_logits(base, adapter, tmp_path / "b")
    assert close(logits, dense) and missing == []


def test_peft_ignores_tower_lora_under_checkpoint_names(tmp_path):
    """Qwen2-VL: PEFT 0.21.2 loads the tower LoRA saved under the model's names (model.visual.*) and none saved
    under the checkpoint's (visual.*): it warns of missing keys and keeps B = 0."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(model_type="qwen2_vl_text", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         rope_parameters=dict(rope_type="default", mrope_section=[2, 1, 1])),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2))
    model = transformers.AutoModelForImageTextToText.from_config(cfg)
    names = [n for n, m in model.named_modules() if n.endswith("attn.qkv")]
    gen = torch.Generator().manual_seed(2)
    mods = {n: AdapterModule(n, torch.randn(2, 32, generator=gen), torch.randn(96, 2, generator=gen)) for n in names}
    renamed = {n.removeprefix("model."): AdapterModule(n.removeprefix("model."), m.A, m.B) for n, m in mods.items()}
    for label, modules, loaded in (("model", mods, True), ("checkpoint", renamed, False)):
        Adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["qkv"]), modules).save(tmp_path / label, force=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pm = peft.PeftModel.from_pretrained(transformers.AutoModelForImageTextToText.from_config(cfg),
                                                tmp_path / label)
        b = dict(pm.named_parameters())[f"base_model.model.{names[0]}.lora_B.default.weight"]
        assert torch.equal(b.detach(), mods[names[0]].B) == loaded, label
        assert any("missing adapter keys" in str(w.message) for w in caught) != loaded, label
        features = adapter_features(Adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["qkv"]), modules))
        assert ("checkpoint_tower_names" in features) != loaded and ("vision_tower" in features) == loaded
