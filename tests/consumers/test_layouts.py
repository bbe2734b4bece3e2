"""The MoE and multimodal layout rules (lorasurg.consumers.layouts), each on a tiny hand-made adapter written to
safetensors in the test and read back: what each consumer reads, refuses or drops, and the conditions it puts on
per-expert LoRA. Sources: PEFT 0.21.2 (measured, tests/parity/test_moe_layouts.py), vLLM 0.34.0, llama.cpp 0c1e57098;
each rule's own source is in the data (``Condition.source``, ``Rule.source``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorasurg.consumers import CONSUMERS, FEATURES, adapter_features, consumer_findings
from lorasurg.consumers.layouts import (
    CONDITIONS,
    checkpoint_experts,
    expert_groups,
    fused_expert_modules,
    layout_violations,
)
from lorasurg.io.adapter import Adapter

H, I = 8, 6  # hidden size, expert intermediate size
PROJ = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
MIXTRAL = {"w1": (I, H), "w3": (I, H), "w2": (H, I)}
NEW_FEATURES = ("moe_per_expert", "moe_target_parameters", "vision_tower", "checkpoint_tower_names")


def write(directory: Path, modules: dict[str, tuple[int, int, int]], **config) -> Path:
    """An adapter directory: ``{module: (rank, out, in)}`` with seeded random factors, and its config."""
    gen = torch.Generator().manual_seed(len(modules))
    state = {}
    for name, (r, out, inp) in modules.items():
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, inp, generator=gen) * 0.3
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out, r, generator=gen) * 0.3
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, directory / "adapter_model.safetensors")
    leaves = sorted({n.rsplit(".", 1)[-1] for n in modules})
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": leaves}
    cfg.update(config)
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    return directory


def experts(layers=2, n=4, r=4, proj=PROJ, block="mlp", skip=(), rank=None) -> dict[str, tuple[int, int, int]]:
    """``{module: (rank, out, in)}`` for every expert and projection (``rank(name)`` overrides r)."""
    out = {}
    for L in range(layers):
        for e in range(n):
            for p, (o, i) in proj.items():
                name = f"model.layers.{L}.{block}.experts.{e}.{p}"
                if name not in skip:
                    out[name] = ((rank(name) if rank else None) or r, o, i)
    return out


def load(tmp_path: Path, modules, **config) -> Adapter:
    return Adapter.load(write(tmp_path / "a", modules, **config), strict=False)


def codes(adapter: Adapter, consumer: str) -> set[str]:
    return {v.condition.code for v in layout_violations(adapter, consumer)}


# ------------------------------------------------------------------------------------------------ the data


def test_every_layout_rule_and_condition_names_its_source():
    assert set(NEW_FEATURES) <= set(FEATURES)
    for name in ("vllm", "llama.cpp"):
        assert set(NEW_FEATURES) <= set(CONSUMERS[name].rules), name
    for consumer, table in CONDITIONS.items():
        for feature, conditions in table.items():
            assert feature in FEATURES
            for c in conditions:
                assert c.treatment in ("refuses", "drops", "misreads") and c.says and c.source.file, (consumer, c)


def test_treatments_per_consumer():
    """PEFT reads per-expert and fused experts and model-named towers, not checkpoint-named towers; vLLM reads
    per-expert, fused only for is_3d_moe_weight classes, drops towers; llama.cpp reads per-expert, refuses fused,
    drops towers."""
    t = {n: {f: CONSUMERS[n].treatment(f) for f in NEW_FEATURES} for n in ("peft", "vllm", "llama.cpp")}
    assert t["peft"] == {"moe_per_expert": "reads", "moe_target_parameters": "reads", "vision_tower": "reads",
                         "checkpoint_tower_names": "drops"}
    assert t["vllm"] == {"moe_per_expert": "reads", "moe_target_parameters": "model-dependent",
                         "vision_tower": "drops", "checkpoint_tower_names": "drops"}
    assert t["llama.cpp"] == {"moe_per_expert": "reads", "moe_target_parameters": "refuses",
                              "vision_tower": "drops", "checkpoint_tower_names": "drops"}


# ------------------------------------------------------------------------------------------------ recognising


def test_layouts_recognised_from_names(tmp_path):
    mods = {**experts(layers=1, n=2), "model.layers.0.self_attn.q_proj": (4, H, H),
            "model.visual.blocks.0.attn.qkv": (4, 3 * H, H), "visual.merger.mlp.0": (4, H, H)}
    f = adapter_features(load(tmp_path, mods))
    assert len(f["moe_per_expert"]) == 6
    assert f["vision_tower"] == ["model.visual.blocks.0.attn.qkv"]
    assert f["checkpoint_tower_names"] == ["visual.merger.mlp.0"]
    assert "moe_target_parameters" not in f


def test_mixtral_names_are_experts_too(tmp_path):
    a = load(tmp_path, experts(proj=MIXTRAL, block="block_sparse_moe"))
    groups = expert_groups(a.modules)
    assert list(groups) == ["model.layers.0.block_sparse_moe.experts", "model.layers.1.block_sparse_moe.experts"]
    assert groups["model.layers.0.block_sparse_moe.experts"].projections == {"w1", "w2", "w3"}
    assert all(codes(a, c) == set() for c in ("peft", "vllm", "llama.cpp"))


def test_fused_target_parameters_layout(tmp_path):
    """PEFT's ParamWrapper keys: experts.base_layer (gate_up_proj, A (r*E, H), B (2I, r*E)) and experts
    (down_proj, A (r*E, I), B (H, r*E)); only with target_parameters in the config."""
    E, r = 4, 2
    mods = {"model.layers.0.mlp.experts.base_layer": (r * E, 2 * I, H), "model.layers.0.mlp.experts": (r * E, H, I),
            "model.layers.0.self_attn.q_proj": (r, H, H)}
    a = load(tmp_path, mods, r=r, target_modules=["q_proj"],
             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    assert set(fused_expert_modules(a)) == {"model.layers.0.mlp.experts.base_layer", "model.layers.0.mlp.experts"}
    assert sorted(adapter_features(a)["moe_target_parameters"]) == sorted(fused_expert_modules(a))
    without = load(tmp_path / "b", mods, r=r, target_modules=["q_proj", "experts", "base_layer"])
    assert "moe_target_parameters" not in adapter_features(without)


# ------------------------------------------------------------------------------------------------ per-expert


def test_complete_per_expert_adapter_breaks_no_condition(tmp_path):
    a = load(tmp_path, experts())
    assert all(codes(a, c) == set() for c in ("peft", "vllm", "llama.cpp"))
    assert [f for f in consumer_findings(a, "vllm,llama.cpp") if f.severity == "error"] == []


def test_missing_expert_is_refused_by_every_consumer(tmp_path):
    a = load(tmp_path, experts(skip=tuple(f"model.layers.1.mlp.experts.3.{p}" for p in PROJ)))
    for c in ("peft", "vllm", "llama.cpp"):
        (v,) = [v for v in layout_violations(a, c) if v.condition.code == "all-experts"]
        assert v.where == ("model.layers.1.mlp.experts",) and "expert(s) 3 of 4 missing" in v.detail
        assert v.condition.treatment == "refuses"
    found = {(f.consumer, f.code) for f in consumer_findings(a, "vllm,llama.cpp")}
    assert {("vllm", "refuses:moe_per_expert"), ("llama.cpp", "refuses:moe_per_expert")} <= found


def test_base_checkpoint_gives_the_number_of_experts(tmp_path):
    """The adapter alone cannot tell that expert 4 and 5 (of 6) are missing in every layer, nor a whole layer; the
    base checkpoint's keys can."""
    a = load(tmp_path, experts(layers=2, n=4))
    keys = [f"model.layers.{L}.mlp.experts.{e}.{p}.weight" for L in range(3) for e in range(6) for p in PROJ]
    counts = checkpoint_experts(keys + ["model.layers.0.mlp.gate.weight"])
    assert counts == {f"model.layers.{L}.mlp.experts": 6 for L in range(3)}
    (v,) = [v for v in layout_violations(a, "peft", counts) if v.condition.code == "all-experts"]
    assert "expert(s) 4-5 of 6 missing" in v.detail


def test_missing_projection(tmp_path):
    a = load(tmp_path, experts(skip=tuple(f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(4))))
    for c in ("peft", "vllm", "llama.cpp"):
        (v,) = [v for v in layout_violations(a, c) if v.condition.code == "all-projections"]
        assert v.where[0] == "model.layers.0.mlp.experts.0" and "no down_proj" in v.detail


def test_ranks_within_a_layer_and_across_layers(tmp_path):
    """vLLM and llama.cpp stack a layer's experts per projection: one rank there; PEFT needs the config's r on every
    expert (per-layer ranks too)."""
    in_layer = load(tmp_path, experts(rank=lambda n: 2 if n.endswith("experts.0.up_proj") else None),
                    rank_pattern={r"^model\.layers\.\d\.mlp\.experts\.0\.up_proj": 2})
    assert codes(in_layer, "vllm") == codes(in_layer, "llama.cpp") == {"group-rank"}
    assert codes(in_layer, "peft") == {"one-rank"}
    per_layer = load(tmp_path / "b", experts(rank=lambda n: 2 if ".layers.0." in n else None),
                     rank_pattern={r"^model\.layers\.0\..*": 2})
    assert codes(per_layer, "vllm") == codes(per_layer, "llama.cpp") == set()
    assert codes(per_layer, "peft") == {"one-rank"}


def test_per_expert_alpha_and_rslora_are_misread_by_peft_only(tmp_path):
    """PEFT applies lora_alpha / r to the fused experts (per-expert alpha_pattern ignored) and sqrt(2) x the rsLoRA
    scale to gate_up_proj; vLLM folds each expert's own scale into B (pack_moe, lora_weights.py 185-189)."""
    a = load(tmp_path, experts(), alpha_pattern={r"^model\.layers\.0\.mlp\.experts\.1\.gate_proj": 16})
    assert codes(a, "peft") == {"one-alpha"} and codes(a, "vllm") == set()
    b = load(tmp_path / "b", experts(), use_rslora=True)
    assert codes(b, "peft") == {"no-rslora"} and codes(b, "vllm") == set()


def test_dropout_dora_bias_refused_by_peft_with_experts(tmp_path):
    a = load(tmp_path, experts(), lora_dropout=0.05)
    (v,) = layout_violations(a, "peft")
    assert v.condition.code == "plain-options" and v.detail == "lora_dropout=0.05" and len(v.where) == 24


def test_shared_experts_and_dense_mlp_are_dropped_by_peft(tmp_path):
    """Next to per-expert LoRA, PEFT moves gate/up/down targets to target_parameters: the shared experts' and a
    dense layer's LoRA are dropped, unless the config lists them in target_parameters as <module>.weight."""
    others = {"model.layers.0.mlp.shared_experts.gate_proj": (4, I, H), "model.layers.2.mlp.down_proj": (4, H, I)}
    a = load(tmp_path, {**experts(), **others})
    (v,) = layout_violations(a, "peft")
    assert v.condition.code == "non-expert-mlp" and v.condition.treatment == "drops" and set(v.where) == set(others)
    listed = load(tmp_path / "b", {**experts(), **others}, target_parameters=[f"{m}.weight" for m in others])
    assert codes(listed, "peft") == set()
    assert codes(a, "vllm") == codes(a, "llama.cpp") == set()


def test_model_types_peft_does_not_convert(tmp_path):
    """Qwen2-MoE: PEFT converts no per-expert config for it, so with the model type known the one PEFT condition is
    converted-type (every expert dropped); its shared expert is then read as a plain linear layer. A config in the
    converted form (target_parameters) is read; vLLM and llama.cpp are indifferent to the type."""
    mods = {**experts(), "model.layers.0.mlp.shared_expert.gate_proj": (4, I, H)}
    a = load(tmp_path, mods)
    (v,) = layout_violations(a, "peft", model_type="qwen2_moe")
    assert v.condition.code == "converted-type" and v.condition.treatment == "drops" and len(v.where) == 24
    assert codes(a, "peft") == {"non-expert-mlp"}  # type unknown: taken as a type PEFT converts
    assert {v.condition.code for v in layout_violations(a, "peft", model_type="qwen3_moe")} == {"non-expert-mlp"}
    converted = load(tmp_path / "b", mods, target_parameters=["gate_up_proj", "down_proj"])
    assert layout_violations(converted, "peft", model_type="qwen2_moe") == []
    assert layout_violations(a, "vllm", model_type="qwen2_moe") == []


# ------------------------------------------------------------------------------------------------ fused, towers


def test_fused_experts_per_consumer(tmp_path):
    E, r = 4, 2
    both = {"model.layers.0.mlp.experts.base_layer": (r * E, 2 * I, H), "model.layers.0.mlp.experts": (r * E, H, I)}
    a = load(tmp_path, both, r=r, target_modules=[], target_parameters=["gate_up_proj", "down_proj"])
    found = {(f.consumer, f.code, f.severity) for f in consumer_findings(a, "vllm,llama.cpp")}
    assert ("vllm", "model-dependent:moe_target_parameters", "warning") in found
    assert ("llama.cpp", "refuses:moe_target_parameters", "error") in found
    assert codes(a, "vllm") == set()
    one = load(tmp_path / "b", {"model.layers.0.mlp.experts": (r * E, 2 * I, H)}, r=r, target_modules=[],
               target_parameters=["gate_up_proj"])
    assert codes(one, "vllm") == {"both-parameters"}
    dropout = load(tmp_path / "c", both, r=r, target_modules=[], target_parameters=["gate_up_proj", "down_proj"],
                   lora_dropout=0.1)
    assert codes(dropout, "peft") == {"plain-options"}


def test_vision_tower_dropped_by_vllm_and_llama_cpp(tmp_path):
    mods = {"model.visual.blocks.0.attn.qkv": (4, 3 * H, H),
            "model.language_model.layers.0.self_attn.q_proj": (4, H, H)}
    a = load(tmp_path, mods)
    found = {(f.consumer, f.code): f for f in consumer_findings(a, "vllm,llama.cpp")}
    for c in ("vllm", "llama.cpp"):
        f = found[(c, "drops:vision_tower")]
        assert f.modules == ("model.visual.blocks.0.attn.qkv",) and f.severity == "error"
    assert "enable-tower-connector-lora" in found[("vllm", "drops:vision_tower")].message


def test_checkpoint_tower_names(tmp_path):
    """visual.* / vision_tower.* / multi_modal_projector.* at the top: checkpoint names; PEFT on transformers 5 does
    not load them (tests/parity/test_moe_layouts.py shows it)."""
    mods = {"visual.blocks.0.attn.qkv": (4, 3 * H, H), "vision_tower.encoder.layers.0.mlp.fc1": (4, H, H),
            "multi_modal_projector.linear_1": (4, H, H), "language_model.model.layers.0.self_attn.q_proj": (4, H, H)}
    f = adapter_features(load(tmp_path, mods))
    assert f["checkpoint_tower_names"] == sorted(mods)[1:] and "vision_tower" not in f


@pytest.mark.parametrize("consumer", ["vllm", "llama.cpp"])
def test_one_finding_per_broken_condition(tmp_path, consumer):
    """Expert 3 of layer 0 lacks gate_proj; expert 1's up_proj has rank 2 in both layers: two conditions broken,
    one finding each, naming every place."""
    a = load(tmp_path, experts(skip=("model.layers.0.mlp.experts.3.gate_proj",),
                               rank=lambda n: 2 if n.endswith("experts.1.up_proj") else None),
             rank_pattern={r"^model\.layers\.\d\.mlp\.experts\.1\.up_proj": 2})
    mine = {f.message.split(" here ")[1].split(")")[0]: f for f in consumer_findings(a, consumer)
            if f.code == "refuses:moe_per_expert"}
    assert set(mine) == {"(model.layers.0.mlp.experts.3: no gate_proj",
                         "(model.layers.0.mlp.experts.*.up_proj: ranks [2, 4]; model.layers.1.mlp.experts.*.up_proj: "
                         "ranks [2, 4]"}
    assert all(f.severity == "error" and "--for" in f.hint for f in mine.values())
