"""Broken adapters for the finding codes about mixtures of experts, ``target_parameters`` and multimodal names, on the
fixture families (fixtures/moe/*, fixtures/vlm/*): each starts from a consistent adapter in the layout PEFT 0.21.2
loads on transformers 5 (tests/surgery/moe_adapters.py) and breaks one condition of PEFT's loading. What PEFT does
with each is shown in tests/parity/test_validate_moe_parity.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lorasurg.io.adapter import Adapter, AdapterModule
from lorasurg.targeting import anchored_pattern_key

from tests.surgery.moe_adapters import base_of, checkpoint_named, family_adapter
from tests.surgery.validate.broken import Case, save

QWEN3 = "qwen3_moe"
L0 = "model.layers.0.mlp.experts"


def per_expert(**config) -> Adapter:
    """The consistent per-expert Qwen3-MoE adapter (attention and every expert, r=2, scale 2)."""
    return family_adapter(QWEN3, **config)


def drop(adapter: Adapter, keep: Callable[[str], bool]) -> Adapter:
    adapter.modules = {name: mod for name, mod in adapter.modules.items() if keep(name)}
    return adapter


def lower_rank(adapter: Adapter, module: str) -> Adapter:
    """``module`` cut to rank r-1, with a rank_pattern entry saying so (consistent as a transformers-4 adapter)."""
    mod = adapter.modules[module]
    r = mod.rank - 1
    adapter.modules[module] = AdapterModule(module, mod.A[:r].clone(), mod.B[:, :r].clone())
    key = anchored_pattern_key(module)
    adapter.config.rank_pattern = {**(adapter.config.rank_pattern or {}), key: r}
    adapter.config.alpha_pattern = {**(adapter.config.alpha_pattern or {}), key: 2 * r}
    return adapter


def _leaf_targets(d: Path) -> Path:
    """DeepSeek-V3 experts per expert, with target_modules the projections' leaf names as adapters for
    transformers 4 were written: the dense first layer's and the shared experts' gate/up/down_proj share them."""
    adapter = family_adapter("deepseek_v3", targets=("gate_proj", "up_proj", "down_proj"))
    return save(adapter, d, target_modules=["down_proj", "gate_proj", "up_proj"], target_parameters=None)


MOE_CASES: dict[str, Case] = {
    "key-checkpoint-name": Case(
        lambda d: save(checkpoint_named(family_adapter("qwen2_vl", targets=("q_proj",)), "qwen2_vl"), d),
        "model.layers.0.self_attn.q_proj and 1 more",
        r"keyed by the checkpoint's names, but the model .* names them otherwise \('model.layers.0.self_attn.q_proj' "
        r"is 'model.language_model.layers.0.self_attn.q_proj'\)", base=base_of("qwen2_vl")),
    "parameter-unmatched": Case(
        lambda d: save(fused := family_adapter(QWEN3, form="target-parameters"), d,
                       target_parameters=fused.config.target_parameters + ["experts.gate_proj"]),
        "target_parameters['experts.gate_proj']", r"is neither a parameter name of .* nor a '.'-suffix of one",
        base=base_of(QWEN3)),
    "parameter-refused": Case(lambda d: save(per_expert(), d, lora_dropout=0.05), "lora_dropout",
                              r"lora_dropout=0.05 with target_parameters: PEFT's ParamWrapper raises 'does not work "
                              r"with lora_dropout' when it wraps 4 parameter\(s\).*PEFT's MoE conversion moved",
                              base=base_of(QWEN3)),
    "expert-unconverted": Case(lambda d: save(family_adapter("qwen2_moe", form="per-expert"), d,
                                              target_parameters=None),  # as written for transformers 4
                               "model.layers.0.mlp.experts.0.down_proj and 23 more",
                               r"24 per-expert LoRA module\(s\) .* not 'qwen2_moe'", base=base_of("qwen2_moe")),
    "expert-fused-part": Case(
        lambda d: save(drop(per_expert(), lambda n: not n.endswith("up_proj")), d,
                       target_modules=["down_proj", "gate_proj", "q_proj", "v_proj"]),
        "target_modules", r"names \['gate_proj'\] but not \['up_proj'\], which transformers fuses with it into "
                          r"gate_up_proj: PEFT raises", base=base_of(QWEN3)),
    "expert-missing": Case(lambda d: save(drop(per_expert(), lambda n: n != f"{L0}.2.gate_proj"), d),
                           f"{L0}.2.gate_proj", r"1 of the 8 expert matrices fused into model.layers.0.mlp.experts."
                                                r"gate_up_proj have no LoRA", base=base_of(QWEN3)),
    "expert-layer-missing": Case(lambda d: save(drop(per_expert(), lambda n: "layers.1.mlp.experts" not in n), d),
                                 "model.layers.1.mlp.experts.gate_up_proj and 1 more",
                                 r"2 fused parameter\(s\) without any expert LoRA here", base=base_of(QWEN3)),
    "expert-rank": Case(lambda d: save(lower_rank(per_expert(), f"{L0}.1.up_proj"), d), f"{L0}.1.up_proj",
                        r"the experts of model.layers.0.mlp.experts.gate_up_proj have ranks \[1, 2\]",
                        base=base_of(QWEN3)),
    "expert-scale": Case(lambda d: save(per_expert(), d, alpha_pattern={anchored_pattern_key(f"{L0}.1.up_proj"): 8}),
                         f"{L0}.1.up_proj", r"reads model.layers.0.mlp.experts.gate_up_proj at scale 2 .* scale 4 "
                                            r"\(per-expert alpha_pattern", base=base_of(QWEN3)),
    "dense-converted": Case(_leaf_targets, "model.layers.0.mlp.down_proj and 5 more",
                            r"6 linear layer\(s\) those entries also selected .* are then not adapted",
                            base=base_of("deepseek_v3")),
}
