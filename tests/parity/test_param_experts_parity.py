"""Per-expert-key adapters (transformers-4 layout) loaded on transformers-5 MoE models, against PEFT 0.21.2.

An adapter with ``model.layers.0.mlp.experts.3.gate_proj.lora_A.weight`` keys (Mixtral: ``block_sparse_moe.
experts.3.w1``) and config ``target_modules`` gate/up/down_proj and the router, loaded on a model whose experts are
fused parameters: lorasurg and PEFT convert it to LoRA on ``gate_up_proj``/``down_proj`` (``target_parameters``) with
the same tensors bit for bit, the same config and the same outputs, equal to the dense per-expert update; PEFT's
refusals are lorasurg errors; where PEFT is wrong (rsLoRA, Qwen2-MoE) lorasurg follows the per-expert definition.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

from lorasurg.errors import InputError, LorasurgError  # noqa: E402
from lorasurg.runtime import load_adapter, merge_and_unload, save_adapter  # noqa: E402
from lorasurg.runtime.walk import adapter_configs  # noqa: E402
from tests.parity.test_runtime_parity import _rel_diff  # noqa: E402
from tests.runtime.models import output  # noqa: E402
from tests.runtime.param_models import (  # noqa: E402
    EXPERTS,
    HIDDEN,
    INTER,
    LAYERS,
    PER_EXPERT_NAMES,
    mixtral,
    per_expert_tensors,
    qwen3_moe,
    token_input,
    write_per_expert_adapter,
)

BUILDERS = {"qwen3_moe": qwen3_moe, "mixtral": mixtral}
PREFIX = "base_model.model."


def _peft_load(build, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(build(), str(directory)).eval()


def _both(kind: str, directory):
    """PEFT's model and lorasurg's with the per-expert adapter at ``directory`` loaded."""
    build = BUILDERS[kind]
    return build, _peft_load(build, directory), load_adapter(build(), str(directory))


@torch.no_grad()
def _dense(model, state: dict[str, torch.Tensor], scale: float, names: tuple[str, ...], gate_up_scale: float = None):
    """``model`` with every per-expert LoRA of ``state`` added to the fused weights by hand, in float64:
    ``gate_up_proj[e] += s [B_g A_g; B_u A_u]``, ``down_proj[e] += s B_d A_d``, plain layers ``W += s B A``."""
    block, gate, up, down, router = names
    deltas = {}
    for key in state:
        if key.endswith("lora_A.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            B = state[key.replace("lora_A", "lora_B")].double()
            deltas[module] = B @ state[key].double()  # (out, r) @ (r, in)
    for layer in range(LAYERS):
        mlp = model.model.layers[layer].mlp
        pre = f"model.layers.{layer}.{block}."
        for e in range(EXPERTS):
            gu = torch.cat([deltas.pop(f"{pre}experts.{e}.{gate}"), deltas.pop(f"{pre}experts.{e}.{up}")])  # (2I, H)
            mlp.experts.gate_up_proj[e] += (gu * (gate_up_scale or scale)).float()
            mlp.experts.down_proj[e] += (deltas.pop(f"{pre}experts.{e}.{down}") * scale).float()
        for module in [m for m in deltas if m.startswith(pre)]:
            target = module.replace(f".{block}.", ".mlp.")
            model.get_submodule(target).weight += (deltas.pop(module) * scale).float()
    for module, delta in deltas.items():
        model.get_submodule(module).weight += (delta * scale).float()
    return model


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_per_expert_adapter_loads_with_peft_tensors_config_and_outputs(tmp_path, kind):
    build, theirs, ours = _both(kind, write_per_expert_adapter(kind, tmp_path / "adapter"))
    expected = {k.removeprefix(PREFIX): v for k, v in theirs.state_dict().items()}
    assert list(ours.state_dict()) == list(expected)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, expected[key]), key  # A concatenated, B block-diagonal: copies, so bit for bit
    ours_config, their_config = adapter_configs(ours)["default"], theirs.peft_config["default"]
    for field in ("target_modules", "target_parameters", "rank_pattern", "alpha_pattern", "r", "lora_alpha"):
        mine, peft_value = getattr(ours_config, field), getattr(their_config, field)
        assert (set(mine) if isinstance(mine, (list, set)) else mine) == (
            set(peft_value) if isinstance(peft_value, (list, set)) else peft_value), field
    x = token_input()
    with torch.no_grad():
        assert torch.equal(output(ours, x), output(theirs, x))
        dense = output(_dense(build(), per_expert_tensors(kind), 2.0, PER_EXPERT_NAMES[kind]), x)
        assert _rel_diff(output(ours, x), dense) < 1e-5  # the dense per-expert fine-tune
        assert _rel_diff(output(merge_and_unload(ours), x), dense) < 1e-5


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_the_converted_adapter_saves_like_peft_and_reloads_in_both(tmp_path, kind):
    build, theirs, ours = _both(kind, write_per_expert_adapter(kind, tmp_path / "adapter"))
    theirs.save_pretrained(str(tmp_path / "peft"))
    save_adapter(ours, str(tmp_path / "ours"))
    saved = {side: peft.utils.load_peft_weights(str(tmp_path / side)) for side in ("peft", "ours")}
    assert saved["ours"].keys() == saved["peft"].keys()
    assert all(torch.equal(saved["ours"][k], v) for k, v in saved["peft"].items())
    configs = {side: json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("peft", "ours")}
    for field in ("target_modules", "rank_pattern", "alpha_pattern", "r", "lora_alpha"):
        assert configs["ours"][field] == configs["peft"][field], field
    assert sorted(configs["ours"]["target_parameters"]) == sorted(configs["peft"]["target_parameters"])
    config = peft.LoraConfig.from_pretrained(str(tmp_path / "ours"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = peft.get_peft_model(build(), config).eval()
        result = peft.set_peft_model_state_dict(fresh, saved["ours"])
    assert [k for k in result.missing_keys if ".lora_" in k] == [] and result.unexpected_keys == []
    x = token_input()
    with torch.no_grad():
        assert torch.equal(output(_peft_load(build, tmp_path / "ours"), x), output(ours, x))
        assert torch.equal(output(load_adapter(build(), str(tmp_path / "ours")), x), output(ours, x))


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("broken,expected", [
    (dict(skip={(1, 3, "gate"), (1, 3, "up"), (1, 3, "down")}), r"layers\.1\..*missing \(expert, part\) \[\(3, 0\)"),
    (dict(ranks={(0, 2, "down"): 3}), r"experts\.2\.(down_proj|w2): stored rank 3, config gives r=2"),
    (dict(ranks={(0, 2, "down"): 3}, config="pattern"), r"different ranks \{0: 2, 1: 2, 2: 3, 3: 2\}"),
    (dict(skip={(layer, e, "up") for layer in range(LAYERS) for e in range(EXPERTS)}, config="no_up"),
     r"missing \(expert, part\) \[\(0, 1\), \(1, 1\)"),
    (dict(config=dict(lora_dropout=0.1)), "lora_dropout"),
])
def test_what_peft_cannot_load_is_a_clear_error(tmp_path, kind, broken, expected):
    block, gate, up, down, router = PER_EXPERT_NAMES[kind]
    names = {"gate": gate, "up": up, "down": down}
    skip = {(layer, e, names[p]) for layer, e, p in broken.get("skip", ())}
    ranks = {(layer, e, names[p]): r for (layer, e, p), r in broken.get("ranks", {}).items()}
    config = broken.get("config")
    if config == "no_up":
        config = dict(target_modules=["q_proj", gate, down, router])
    elif config == "pattern":  # a rank_pattern that gives one expert its own rank
        config = dict(rank_pattern={f"layers.0.{block}.experts.2.{down}": 3})
    directory = write_per_expert_adapter(kind, tmp_path, config=config, skip=skip, ranks=ranks)
    with pytest.raises((RuntimeError, ValueError)):
        _peft_load(BUILDERS[kind], directory)
    model = BUILDERS[kind]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LorasurgError, match=expected) as err:
        load_adapter(model, str(directory))
    assert "experts" in str(err.value) and str(tmp_path) in str(err.value)
    assert list(model.state_dict()) == list(before) and adapter_configs(model) == {}  # the model is untouched


def test_rslora_keeps_each_experts_scale_where_peft_is_off_by_sqrt_2(tmp_path):
    _, theirs, ours = _both("qwen3_moe", write_per_expert_adapter("qwen3_moe", tmp_path, config=dict(use_rslora=True)))
    scale = 4 / 2 ** 0.5  # alpha / sqrt(r)
    x = token_input()
    with torch.no_grad():
        dense = output(_dense(qwen3_moe(), per_expert_tensors("qwen3_moe"), scale, PER_EXPERT_NAMES["qwen3_moe"]), x)
        assert _rel_diff(output(ours, x), dense) < 1e-5
        peft_like = _dense(qwen3_moe(), per_expert_tensors("qwen3_moe"), scale, PER_EXPERT_NAMES["qwen3_moe"],
                           gate_up_scale=scale * 2 ** 0.5)  # PEFT doubles alpha with r: alpha 8 / sqrt(4)
        assert _rel_diff(output(theirs, x), output(peft_like, x)) < 1e-5
        assert _rel_diff(output(theirs, x), dense) > 1e-3
    assert adapter_configs(ours)["default"].alpha_pattern == {r".*\.gate_up_proj": pytest.approx(4 * 2 ** 0.5)}


def _qwen2_moe(seed: int = 0):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=48, moe_intermediate_size=INTER,
                         shared_expert_intermediate_size=16, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=EXPERTS, num_experts_per_tok=2)
    return Qwen2MoeForCausalLM(cfg).eval()


def test_qwen2_moe_routed_and_shared_experts_are_both_kept_where_peft_drops_the_routed_ones(tmp_path):
    from safetensors.torch import save_file

    state = {k: v for k, v in per_expert_tensors("qwen3_moe", router=False).items() if "q_proj" not in k}
    gen = torch.Generator().manual_seed(5)
    for layer in range(LAYERS):
        for proj, (out, inp) in {"gate_proj": (16, HIDDEN), "up_proj": (16, HIDDEN), "down_proj": (HIDDEN, 16)}.items():
            key = f"{PREFIX}model.layers.{layer}.mlp.shared_expert.{proj}"
            state[f"{key}.lora_A.weight"] = torch.randn(2, inp, generator=gen) * 0.3
            state[f"{key}.lora_B.weight"] = torch.randn(out, 2, generator=gen) * 0.3
    peft.LoraConfig(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"]).save_pretrained(str(tmp_path))
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    ours = load_adapter(_qwen2_moe(), str(tmp_path))
    theirs = _peft_load(_qwen2_moe, tmp_path)
    x = token_input()
    with torch.no_grad():
        dense = output(_dense(_qwen2_moe(), state, 2.0, PER_EXPERT_NAMES["qwen3_moe"]), x)
        assert _rel_diff(output(ours, x), dense) < 1e-5
        assert _rel_diff(output(theirs, x), dense) > 1e-3  # PEFT 0.21.2 leaves the routed experts' LoRA out
    assert not any("experts.lora_A" in k for k in theirs.state_dict())


def test_an_adapter_for_another_model_still_names_its_modules(tmp_path):
    directory = write_per_expert_adapter("mixtral", tmp_path)
    with pytest.raises(InputError, match="not in the model"):
        load_adapter(qwen3_moe(), str(directory))


# ----------------------------------------------------------------- what extract writes for MoE models, in the runtime
@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_adapters_laid_out_for_peft_on_moe_fixtures_load_in_the_runtime_with_peft_outputs(tmp_path, family):
    """The exact adapters of tests/parity/test_moe_layout.py (per-expert keys, fused target_parameters, DeepSeek-V3's
    dense layers through ``<module>.weight``, gpt-oss's stored stacks): lorasurg's runtime gives PEFT's logits."""
    from lorasurg.config import LoraConfig
    from lorasurg.io.adapter import Adapter
    from lorasurg.surgery.adapter_layout import peft_layout
    from tests.parity.test_moe_layout import FIXTURES, IDS, changed_factors, load

    description, factors, ranks, stacks, extra, saved, model_type = changed_factors(family)
    layout = peft_layout(description, factors, ranks, model_type=model_type, stacks=stacks, extra=extra,
                         modules_to_save=saved)
    config = LoraConfig(**layout.fields, init_lora_weights=True, task_type="CAUSAL_LM")
    Adapter(config, layout.modules, layout.extra).save(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load(FIXTURES / family / "base"), tmp_path / "adapter").eval()
        ours = load_adapter(load(FIXTURES / family / "base"), str(tmp_path / "adapter"))
    with torch.no_grad():
        got, expected = output(ours, IDS), output(theirs, IDS)
        tuned = load(FIXTURES / family / "tuned")(IDS).logits
    assert _rel_diff(got, expected) < 1e-5
    assert float((got - tuned).abs().max()) <= 1e-4 * float(tuned.abs().max())
