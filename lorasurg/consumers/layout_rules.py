"""The conditions each consumer puts on the MoE LoRA layouts it reads, as data, with the version and source each
was read from (and, for PEFT, the measurement: ``python -m tools.probes.peft_moe``); the name patterns that tell the
layouts apart. The logic that applies them is :mod:`lorasurg.consumers.layouts`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .rules import Source

__all__ = ["PROJECTIONS", "EXPERT_NAME", "FUSED_NAME", "TOWER_NAME", "CHECKPOINT_TOWER_NAME", "MLP_LEAVES", "Condition",
           "PEFT_OPTIONS", "PEFT_CONVERTED_TYPE", "CONDITIONS", "VLLM_FUSED_MOE_TYPES"]

#: The gated-MLP projections of a routed expert as checkpoints name them: (gate, up, down). transformers 5 fuses
#: gate and up into ``gate_up_proj`` (``conversion_mapping``: patterns ``qwen2_moe`` and ``mixtral``).
PROJECTIONS: tuple[tuple[str, str, str], ...] = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
#: ``<block>.experts.<index>.<projection>``: a per-expert module (block: the MoE layer's ``…experts``).
EXPERT_NAME = re.compile(r"^(?P<block>.+\.experts)\.(?P<index>\d+)\.(?P<proj>[^.]+)$")
#: A module of PEFT's ParamWrapper on fused experts: ``<block>.experts`` or ``<block>.experts.base_layer``.
FUSED_NAME = re.compile(r"^(?P<block>.+\.experts)(?P<nest>(?:\.base_layer)*)$")
#: Vision tower or connector under transformers-5 module names (Qwen2-VL/2.5-VL ``model.visual``; Llava, Gemma 3,
#: Mistral 3 ``model.vision_tower`` and ``model.multi_modal_projector``).
TOWER_NAME = re.compile(r"(?:^|\.)(?:visual|vision_tower|multi_modal_projector)\.")
#: The same under the checkpoint's top-level names (what transformers' conversion rules rename to ``model.…``).
CHECKPOINT_TOWER_NAME = re.compile(r"^(?:visual|vision_tower|multi_modal_projector)\.")
MLP_LEAVES = {p for triple in PROJECTIONS for p in triple}

_PEFT = "0.21.2"
_CONV = "peft/utils/transformers_weight_conversion.py"
_PROBE = "measured: python -m tools.probes.peft_moe (CONSUMERS-MOE.md)"
_V = "0.34.0"
_L = "0c1e57098"


@dataclass(frozen=True)
class Condition:
    """One condition a consumer puts on a layout it reads.

    Attributes:
        code: short name (``all-experts``, ``all-projections``, ``one-rank``, ``group-rank``, ``one-alpha``,
            ``no-rslora``, ``non-expert-mlp``, ``both-parameters``, ``plain-options``).
        treatment: what the consumer does when the condition is broken (``refuses``, ``drops``, ``misreads``).
        says: what the condition is and what breaking it does, in a sentence.
        source: where it was read (and, for PEFT, measured).
    """

    code: str
    treatment: str
    says: str
    source: Source


def _peft(where: str) -> Source:
    return Source("PEFT", _PEFT, f"{_CONV} ({_PROBE})", where)


#: PEFT's ParamWrapper, which PEFT 0.21.2 also makes of per-expert LoRA on transformers 5.
PEFT_OPTIONS = Condition(
    "plain-options", "refuses",
    "no lora_dropout, use_dora, lora_bias or fan_in_fan_out: PEFT on transformers 5 loads MoE expert LoRA into "
    "its ParamWrapper, which refuses them (\"lora.ParamWrapper does not work with lora_dropout != 0\")",
    Source("PEFT", _PEFT, f"peft/tuners/lora/layer.py ({_PROBE})", "ParamWrapper.__init__ (lines 2366-2372)"))

#: PEFT converts per-expert LoRA only for some model types (:func:`lorasurg.consumers.experts.peft_converts_experts`).
PEFT_CONVERTED_TYPE = Condition(
    "converted-type", "drops",
    "the model type is one PEFT converts per-expert LoRA for (the mixtral and qwen2_moe conversion patterns: Mixtral, "
    "Qwen3-MoE, DeepSeek-V2/V3, OLMoE, GLM-4.5 MoE, ...; not Qwen2-MoE itself, nor types whose checkpoints hold "
    "fused experts): otherwise the per-expert tensors match no module and are dropped silently; a config already "
    "in the converted form (target_parameters gate_up_proj and down_proj, rank and alpha '.*\\.gate_up_proj' at "
    "2 r and 2 lora_alpha) loads exactly",
    _peft("_convert_peft_config_moe (line 415: returns for a type without a conversion pattern)"))

_PEFT_EXPERTS = (
    PEFT_CONVERTED_TYPE,
    PEFT_OPTIONS,
    Condition("all-experts", "refuses",
              "every expert of an adapted MoE layer needs factors: PEFT on transformers 5 merges the experts' "
              "factors into one LoRA on the fused parameter (size mismatch on load otherwise)",
              _peft("build_peft_weight_mapping (lines 202-330: MergeModulelist over the experts)")),
    Condition("all-projections", "refuses",
              "gate, up and down projections all adapted: gate without up is refused (\"Cannot convert PEFT "
              "target(s) ... because they are fused into gate_up_proj\"), gate and up without down load nothing "
              "(missing-keys warning)",
              _peft("_convert_peft_config_moe (lines 402-482)")),
    Condition("one-rank", "refuses",
              "every routed-expert module at the config's r: the fused LoRA's rank is r (2r for gate_up_proj) from "
              "rank_pattern looked up on the fused parameter's name, so per-expert or per-layer ranks fail to load",
              _peft("_convert_peft_config_moe (line 474: rank_pattern['.*\\.gate_up_proj'] = 2 r)")),
    Condition("one-alpha", "misreads",
              "no per-expert alpha_pattern: its keys name the per-expert modules, which the fused parameters do "
              "not match, so lora_alpha / r applies to every expert, silently",
              _peft("_convert_peft_config_moe (line 477: alpha_pattern['.*\\.gate_up_proj'] = 2 lora_alpha)")),
    Condition("no-rslora", "misreads",
              "no use_rslora: gate_up_proj gets rank 2r and alpha 2 lora_alpha, so its rsLoRA scale "
              "2 alpha / sqrt(2 r) is sqrt(2) times the experts' own, silently",
              _peft("_convert_peft_config_moe (lines 474-478: rank and alpha doubled for gate_up_proj)")),
    Condition("non-expert-mlp", "drops",
              "no LoRA on gate/up/down projections outside the routed experts (shared experts, dense MLP layers) "
              "unless the config lists each in target_parameters as '<module>.weight': their target_modules "
              "entries move to target_parameters, so their tensors are dropped, silently",
              _peft("_convert_peft_config_moe (lines 444-458: target_modules entries ending in a projection move)")),
)
_VLLM_EXPERTS = (
    Condition("all-experts", "refuses",
              "every expert of an adapted MoE layer has factors for gate, up and down (AssertionError in "
              "pack_moe otherwise)",
              Source("vLLM", _V, "vllm/lora/lora_weights.py", "PackedLoRALayerWeights.pack_moe (lines 196-208)")),
    Condition("all-projections", "refuses",
              "gate, up and down projections all adapted for every expert of an adapted layer (pack_moe asserts "
              "w1, w2 and w3 for each expert)",
              Source("vLLM", _V, "vllm/lora/lora_weights.py", "PackedLoRALayerWeights.pack_moe (lines 196-208)")),
    Condition("group-rank", "refuses",
              "one rank per projection among a layer's experts (\"The experts of ... have different LoRA ranks "
              "for the same projection, which is not supported\")",
              Source("vLLM", _V, "vllm/lora/lora_weights.py", "PackedLoRALayerWeights.pack_moe (lines 178-184)")),
)
_LLAMA_EXPERTS = (
    Condition("all-experts", "refuses",
              "every expert of an adapted MoE layer has factors for gate, up and down: the converter stacks a "
              "layer's experts once it holds 3 x n_experts of them (\"Unprocessed experts\" otherwise)",
              Source("llama.cpp", _L, "conversion/qwen.py, conversion/llama.py, conversion/deepseek.py",
                     "Qwen2MoeModel.modify_tensors/prepare_tensors (qwen.py 131-156); LlamaModel (llama.py 266-290)")),
    Condition("all-projections", "refuses",
              "gate, up and down projections all adapted (the same count of 3 x n_experts per layer)",
              Source("llama.cpp", _L, "conversion/qwen.py", "Qwen2MoeModel.modify_tensors (lines 131-145)")),
    Condition("group-rank", "refuses",
              "one rank per projection among a layer's experts: their factors are stacked into one 3-D LoRA tensor "
              "(torch.stack fails otherwise)",
              Source("llama.cpp", _L, "convert_lora_to_gguf.py", "LoraTorchTensor.__torch_function__ (lines 234-242)")),
)

#: ``{consumer: {feature: conditions}}`` for the layouts a consumer reads; ``vllm<0.32`` shares ``vllm``'s.
CONDITIONS: dict[str, dict[str, tuple[Condition, ...]]] = {
    "peft": {
        "moe_per_expert": _PEFT_EXPERTS,
        "moe_target_parameters": (PEFT_OPTIONS,),
    },
    "vllm": {
        "moe_per_expert": _VLLM_EXPERTS,
        "moe_target_parameters": (
            Condition("both-parameters", "refuses",
                      "gate_up_proj and down_proj both adapted: `experts.base_layer` (gate_up_proj) and `experts` "
                      "(down_proj) are read as a pair (assertion otherwise)",
                      Source("vLLM", _V, "vllm/lora/model_manager.py",
                             "LoRAModelManager._stack_moe_lora_weights (lines 975-1000)")),
        ),
    },
    "llama.cpp": {"moe_per_expert": _LLAMA_EXPERTS},
}
CONDITIONS["vllm<0.32"] = CONDITIONS["vllm"]

#: model_type -> the vLLM class marked ``is_3d_moe_weight`` that serves it: vLLM reads fused (``target_parameters``)
#: expert LoRA for these and refuses it for every other MoE class (:func:`~lorasurg.consumers.layouts.treatment_for`).
VLLM_FUSED_MOE_TYPES: dict[str, Source] = {
    t: Source("vLLM", _V, f"vllm/model_executor/models/{f}", f"{cls}.is_3d_moe_weight (line {line})")
    for t, f, cls, line in (("gpt_oss", "gpt_oss.py", "GptOssForCausalLM", 1372),
                            ("qwen3_vl_moe", "qwen3_vl_moe.py", "Qwen3VLMoeForConditionalGeneration", 233),
                            ("qwen3_5_moe", "qwen3_5.py", "Qwen3_5MoeForConditionalGeneration", 705),
                            ("qwen3_omni_moe", "qwen3_omni_moe_thinker.py",
                             "Qwen3OmniMoeThinkerForConditionalGeneration", 1625))
}
