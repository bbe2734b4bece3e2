"""Checkpoint keys placed among a transformers-5 model's parameters by transformers' own conversion rules.

On the MoE and multimodal fixture families (fixtures/families.py): every key is placed, and the model's tensors
rebuilt from the checkpoint by the key map (renames copied, expert slots stacked) equal what
``from_pretrained`` loads, bit for bit (copies, so exact on every machine).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorasurg.io.architecture import meta_model
from lorasurg.io.checkpoint import Checkpoint
from lorasurg.io.keymap import build_keymap
from lorasurg.targeting import exact_target_modules

transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
FAMILIES = {"qwen3_moe": "moe", "mixtral": "moe", "qwen2_moe": "moe", "deepseek_v3": "moe", "gpt_oss": "moe",
            "qwen2_vl": "vlm", "llava": "vlm"}
FUSED = {"qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3"}  # checkpoints that store experts one by one


def base_of(family: str) -> Path:
    return FIXTURES / FAMILIES[family] / family / "base"


def shapes_of(path: Path) -> dict[str, tuple[int, ...]]:
    with Checkpoint.open(path) as ckpt:
        return {name: ckpt.shape(name) for name in ckpt.names()}


def loaded(path: Path) -> dict[str, torch.Tensor]:
    config = json.loads((path / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    return cls.from_pretrained(path, dtype=torch.float32).state_dict()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_key_is_placed_and_rebuilds_the_loaded_model(family):
    path = base_of(family)
    config = json.loads((path / "config.json").read_text())
    keymap = build_keymap(meta_model(config), shapes_of(path))
    assert keymap.unplaced == {}
    stored = load_file(str(path / "model.safetensors"))
    model = loaded(path)
    for key, name in keymap.renamed.items():
        assert torch.equal(stored[key], model[name]), (key, name)
    assert bool(keymap.slots) == (family in FUSED)
    for parameter, (experts, parts) in keymap.fused.items():
        rebuilt = torch.empty_like(model[parameter])
        slots = keymap.slots_of(parameter)
        assert len(slots) == experts * parts
        for key, slot in slots:
            rebuilt[slot.expert, slot.rows[0]:slot.rows[1]] = stored[key]  # (out_j, in) block of expert e
        assert torch.equal(rebuilt, model[parameter]), parameter
    covered = set(keymap.renamed.values()) | set(keymap.fused)
    assert covered == set(model), sorted(set(model) ^ covered)[:5]


def test_mixtral_renames_before_fusing():
    keymap = build_keymap(meta_model(json.loads((base_of("mixtral") / "config.json").read_text())),
                          shapes_of(base_of("mixtral")))
    up = keymap.slots["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    assert (up.parameter, up.expert, up.part, up.parts, up.rows) == ("model.layers.1.mlp.experts.gate_up_proj", 2, 1,
                                                                     2, (16, 32))
    assert keymap.renamed["model.layers.1.block_sparse_moe.gate.weight"] == "model.layers.1.mlp.gate.weight"


def test_a_missing_expert_leaves_its_fused_parameter_unplaced(tmp_path):
    target = tmp_path / "base"
    shutil.copytree(base_of("qwen3_moe"), target)
    tensors = load_file(str(target / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    keymap = build_keymap(meta_model(json.loads((target / "config.json").read_text())), shapes_of(target))
    gate_up = [k for k in tensors if k.startswith("model.layers.1.mlp.experts.") and "down_proj" not in k]
    assert sorted(keymap.unplaced) == sorted(gate_up)
    reason = keymap.unplaced[gate_up[0]]
    assert "model.layers.1.mlp.experts.gate_up_proj" in reason and "(2, 1)" in reason  # expert 2, part 1 missing
    assert "model.layers.1.mlp.experts.down_proj" in keymap.fused  # the other parameter is whole


def test_a_key_the_model_lacks_is_unplaced_with_the_reason():
    shapes = dict(shapes_of(base_of("qwen2_vl")))
    shapes["visual.blocks.9.attn.qkv.weight"] = (96, 32)
    keymap = build_keymap(meta_model(json.loads((base_of("qwen2_vl") / "config.json").read_text())), shapes)
    assert list(keymap.unplaced) == ["visual.blocks.9.attn.qkv.weight"]
    assert "model.visual.blocks.9.attn.qkv.weight" in keymap.unplaced["visual.blocks.9.attn.qkv.weight"]


def test_an_unsupported_conversion_is_unplaced_not_guessed(monkeypatch):
    from transformers.core_model_loading import Chunk, WeightConverter

    from lorasurg.io import keymap as keymap_module

    def rules(model):
        return [WeightConverter("mlp.gate_up_proj.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
                                operations=[Chunk(dim=0)])]

    monkeypatch.setattr(keymap_module, "conversion_rules", rules)
    config = json.loads((FIXTURES / "tiny-llama" / "base" / "config.json").read_text())
    shapes = {"model.layers.0.mlp.gate_up_proj.weight": (256, 64), "model.norm.weight": (64,)}
    keymap = build_keymap(meta_model(config), shapes)
    assert keymap.renamed == {"model.norm.weight": "model.norm.weight"}
    assert "Chunk(dim=0)" in keymap.unplaced["model.layers.0.mlp.gate_up_proj.weight"]


# ------------------------------------------------------------------------------------------------ descriptions


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_multimodal_modules_are_named_as_the_model_names_them(family):
    with Checkpoint.open(base_of(family)) as ckpt:
        description = ckpt.describe()
    model = meta_model(ckpt.config)
    model_names = {name for name, _ in model.named_modules() if name}
    assert description.names  # the towers are renamed
    for module, info in description.modules.items():
        if info.kind is None:
            continue
        name = description.model_name(module)
        assert name in model_names, (module, name)
        assert description.checkpoint_module(name) == module
        if info.weight_shape is not None:
            assert f"{module}.weight" in ckpt
    assert description.input_embedding == ("model.embed_tokens" if family == "qwen2_vl"
                                           else "language_model.model.embed_tokens")
    assert set(description.all_module_names()) >= model_names


def test_experts_are_linear_modules_under_their_checkpoint_names():
    with Checkpoint.open(base_of("qwen3_moe")) as ckpt:
        description = ckpt.describe()
        infos = ckpt.module_infos()
        shape = ckpt.shape("model.layers.0.mlp.experts.1.up_proj.weight")
    expert = "model.layers.0.mlp.experts.1.up_proj"
    assert infos[expert].kind == "linear" and infos[expert].weight_shape == shape and not infos[expert].has_bias
    assert description.experts[expert].parameter == "model.layers.0.mlp.experts.gate_up_proj"
    assert description.model_name(expert) == expert and description.checkpoint_module(expert) == expert
    assert expert in description.all_module_names()
    gate_up = description.parameters["model.layers.0.mlp.experts.gate_up_proj"]
    assert (gate_up.experts, gate_up.out_features, gate_up.in_features, gate_up.transposed, gate_up.stored) == (
        4, 32, 32, False, None)


def test_gpt_oss_experts_are_stored_fused_and_transposed():
    with Checkpoint.open(base_of("gpt_oss")) as ckpt:
        description = ckpt.describe()
    assert description.experts == {}
    down = description.parameters["model.layers.1.mlp.experts.down_proj"]
    # (experts, in, out): intermediate 16 in, hidden 32 out; gate_up_proj comes first among the module's parameters
    assert (down.shape, down.transposed, down.in_features, down.out_features) == ((4, 16, 32), True, 16, 32)
    assert down.stored == "model.layers.1.mlp.experts.down_proj"
    gate_up = description.parameters["model.layers.1.mlp.experts.gate_up_proj"]
    assert gate_up.position < down.position


def test_target_modules_never_use_a_bare_number():
    names = ["model.visual.merger.mlp", "model.visual.merger.mlp.0", "model.visual.merger.mlp.2", "model.layers.0"]
    assert exact_target_modules(["model.visual.merger.mlp.2"], names) == ["model.visual.merger.mlp.2"]
