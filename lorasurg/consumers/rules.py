"""How PEFT, vLLM and llama.cpp read a PEFT LoRA adapter, as data.

Each consumer has a *scale rule* (the factor it multiplies ``B @ A`` by, per module) and a *treatment* for
each feature an adapter can hold (:data:`FEATURES`). Every rule names the version and the source file and
function it was read from; the wording is ours. Treatments:

=====================  ======================================================================================
``reads``              read as PEFT reads it
``refuses``            loading (or converting) the adapter fails
``drops``              loaded, but that part is silently not applied
``misreads``           loaded and applied, but not as PEFT applies it
``model-dependent``    read as PEFT reads it for some base models and refused for others
=====================  ======================================================================================

Scale rules (``r_m`` is module ``m``'s rank, ``alpha_m`` its alpha from ``rank_pattern``/``alpha_pattern``):

* PEFT 0.21.2: ``alpha_m / r_m`` (rsLoRA: ``alpha_m / sqrt(r_m)``);
* vLLM 0.34.0: the same (``rank_pattern``/``alpha_pattern`` are read since 0.32.0);
  vLLM up to 0.31.0 (``vllm<0.32`` here): one scale for the whole adapter, ``lora_alpha / r`` from the
  config's global values (rsLoRA: ``/ sqrt(r)``);
* llama.cpp: ``lora_alpha / r_m``, the config's global ``lora_alpha`` (no pattern, no rsLoRA) over the rank
  each tensor pair has (``lora_alpha == 0`` means scale 1).

What :func:`~lorasurg.consumers.prepare.prepare_for` writes so that a consumer computes PEFT's delta is its
``layout``: ``patterns`` (PEFT's own per-module patterns), ``uniform-scale`` (every module at the config's
global scale, so both vLLM rules agree) or ``tensor-rank`` (no ``alpha_pattern``, no rsLoRA, factors scaled so
that ``lora_alpha / r_m`` is each module's scale).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Union

from ..errors import ConfigError

__all__ = [
    "TREATMENTS",
    "FEATURES",
    "LAYOUTS",
    "Source",
    "Rule",
    "Consumer",
    "CONSUMERS",
    "CHOICES",
    "HIDDEN",
    "parse_consumers",
    "with_serving",
]

TREATMENTS = ("reads", "refuses", "drops", "misreads", "model-dependent")
LAYOUTS = ("patterns", "uniform-scale", "tensor-rank")

#: feature -> what it is, in an adapter. Scale features (``rank_pattern``, ``alpha_pattern``, ``rslora``) are
#: handled by the scale rule; the others are parts a consumer may refuse or drop.
FEATURES: dict[str, str] = {
    "rank_pattern": "per-module ranks in rank_pattern",
    "alpha_pattern": "per-module alphas in alpha_pattern",
    "rslora": "use_rslora (scale alpha / sqrt(r))",
    "lora_bias": "lora_B.bias tensors (lora_bias)",
    "dora": "DoRA magnitude vectors (use_dora)",
    "modules_to_save": "whole modules saved in modules_to_save",
    "saved_norms": "norm weights saved in modules_to_save",
    "embedding_lora": "LoRA on an embedding (lora_embedding_A/B)",
    "output_layer_lora": "LoRA on the output layer lm_head",
    "tied_head_lora": "LoRA on an lm_head tied to the input embedding",
    "tied_embedding_lora": "LoRA on an input embedding that the output head is tied to",
    "conv_lora": "LoRA on convolution layers",
    "fan_in_fan_out_lora": "LoRA on layers stored (in, out) (fan_in_fan_out, GPT-2 Conv1D)",
    "init_weights": "init_lora_weights that rewrite the base weights on load (pissa, olora, corda, loftq)",
    "trainable_tokens": "trainable-token rows (trainable_token_indices, token_adapter.trainable_tokens_delta)",
    "layer_replication": "a replicated stack of layers (layer_replication), each copy with its own LoRA",
    # mixtures of experts and multimodal models (lorasurg.consumers.layouts: recognisers and conditions)
    "moe_per_expert": "per-expert LoRA modules under the checkpoint's names (mlp.experts.E.gate_proj, "
                      "block_sparse_moe.experts.E.w1)",
    "moe_target_parameters": "LoRA on fused 3-D experts through target_parameters (PEFT's ParamWrapper: "
                             "mlp.experts.base_layer / mlp.experts)",
    "vision_tower": "LoRA on a multimodal model's vision tower or connector (model.visual, model.vision_tower, "
                    "model.multi_modal_projector)",
    "checkpoint_tower_names": "vision tower or connector LoRA under the checkpoint's top-level names (visual.*, "
                              "vision_tower.*, multi_modal_projector.*)",
}

_SCALE_FEATURES = ("rank_pattern", "alpha_pattern", "rslora")


@dataclass(frozen=True)
class Source:
    """Where a rule was read: project, version, file and function (lines as of that version)."""

    project: str
    version: str
    file: str
    where: str

    def __str__(self) -> str:
        return f"{self.project} {self.version}, {self.file}: {self.where}"


@dataclass(frozen=True)
class Rule:
    """How one consumer treats one feature (see the module docstring for the treatments)."""

    feature: str
    treatment: str
    says: str
    source: Source

    def __post_init__(self) -> None:
        if self.treatment not in TREATMENTS:
            raise ValueError(f"unknown treatment {self.treatment!r}; expected one of {TREATMENTS}")
        if self.feature not in FEATURES:
            raise ValueError(f"unknown feature {self.feature!r}; expected one of {tuple(FEATURES)}")


@dataclass(frozen=True)
class Consumer:
    """One program that loads PEFT adapters.

    Attributes:
        name: what ``--for`` calls it.
        title: its name in messages.
        version: the version the rules were read from.
        scale_rule: ``pattern`` (PEFT's per-module rule), ``global`` (one scale from the config's ``r`` and
            ``lora_alpha``) or ``tensor-rank`` (global ``lora_alpha`` over each tensor pair's rank, no rsLoRA).
        scale_source: where the scale rule was read.
        layout: what ``prepare_for`` writes for it (:data:`LAYOUTS`).
        rules: feature -> :class:`Rule`; a feature missing here is read as PEFT reads it.
        notes: facts that depend on the serving set-up rather than on the adapter.
    """

    name: str
    title: str
    version: str
    scale_rule: str
    scale_source: Source
    layout: str
    rules: Mapping[str, Rule] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def treatment(self, feature: str) -> str:
        """How this consumer treats ``feature`` (``reads`` when no rule says otherwise)."""
        rule = self.rules.get(feature)
        return rule.treatment if rule is not None else "reads"

    def carries(self, feature: str) -> bool:
        """Whether a file written for this consumer can hold ``feature`` and mean what PEFT means by it.

        Scale features are always carried (``prepare_for`` rewrites the scale for the consumer).
        """
        return feature in _SCALE_FEATURES or self.treatment(feature) == "reads"


def _rules(*rules: Rule) -> dict[str, Rule]:
    return {r.feature: r for r in rules}


# ------------------------------------------------------------------------------------------------ PEFT
_PEFT = Source("PEFT", "0.21.2", "peft/tuners/lora/layer.py", "LoraLayer.update_layer (scaling, lines 278-281)")
PEFT = Consumer(
    name="peft",
    title="PEFT",
    version="0.21.2",
    scale_rule="pattern",
    scale_source=_PEFT,
    layout="patterns",
    rules={
        "checkpoint_tower_names": Rule(
            "checkpoint_tower_names", "drops",
            "on transformers 5 loads no vision-tower or connector LoRA under the checkpoint's names (it warns of "
            "missing keys for model.visual.* / model.vision_tower.*): Qwen2-VL's renaming rules are keyed by class "
            "name, which PEFT's conversion never looks up, and the Llava family's are undone by its suffix check",
            Source("PEFT", "0.21.2", "peft/utils/transformers_weight_conversion.py (measured: python -m "
                   "tools.probes.peft_vlm)",
                   "convert_peft_adapter_state_dict_for_transformers (line 569: returns for a model_type with no "
                   "mapping; lines 606-626: a rename to a suffix of the key is undone)")),
    },
    notes=("the reference: lorasurg's outputs are defined by what PEFT computes from them",
           "per-expert (MoE) LoRA is read on transformers 5 under the conditions of lorasurg.consumers.layouts"),
)

# ------------------------------------------------------------------------------------------------ vLLM
_V = "0.34.0"
_V_HELPER = "vllm/lora/peft_helper.py"
_V_FEATURES = Source("vLLM", _V, _V_HELPER, "PEFTHelper._validate_features (lines 54-88)")
_V_MOE = Source("vLLM", _V, "vllm/lora/model_manager.py + vllm/lora/utils.py",
                "process_packed_modules_mapping (utils.py 401-437), _validate_moe_lora_format (model_manager.py "
                "1326-1345), _stack_moe_lora_weights (975-1070)")
_V_TOWER = Source("vLLM", _V, "vllm/lora/model_manager.py + vllm/config/lora.py",
                  "_maybe_init_mm (lines 219-290), _create_lora_modules (515-526: 'no matching PunicaWrapper "
                  "... will be ignored'); enable_tower_connector_lora (config/lora.py 61)")
_V_MODULES = Source(
    "vLLM", _V, "vllm/lora/utils.py + vllm/lora/lora_model.py",
    "get_supported_lora_modules (utils.py 248-262) and check_unexpected_modules (lora_model.py 250-285); "
    "embedding_modules per model class, e.g. models/llama.py 479-482 (Qwen2 declares none)",
)
VLLM = Consumer(
    name="vllm",
    title="vLLM",
    version=_V,
    scale_rule="pattern",
    scale_source=Source("vLLM", _V, _V_HELPER,
                        "PEFTHelper._scaling and get_rank_and_scaling (lines 124-160; patterns since 0.32.0)"),
    layout="uniform-scale",
    rules=_rules(
        Rule("lora_bias", "refuses", "refuses lora_bias: true, and a lora_B.bias tensor is an unsupported weight",
             Source("vLLM", _V, f"{_V_HELPER} + vllm/lora/utils.py",
                    "PEFTHelper._validate_features (lines 69-70); parse_fine_tuned_lora_name (utils.py 223-236)")),
        Rule("dora", "refuses", "does not support DoRA", _V_FEATURES),
        Rule("modules_to_save", "refuses", "refuses modules_to_save other than a classifier/score head", _V_FEATURES),
        Rule("saved_norms", "refuses", "refuses modules_to_save other than a classifier/score head", _V_FEATURES),
        Rule("embedding_lora", "model-dependent",
             "reads embedding LoRA only for model classes that declare it in embedding_modules (Llama does, "
             "Qwen2 does not); others refuse the adapter", _V_MODULES),
        Rule("output_layer_lora", "model-dependent",
             "reads lm_head LoRA only for model classes that declare it in embedding_modules", _V_MODULES),
        Rule("tied_head_lora", "model-dependent",
             "reads lm_head LoRA only for model classes that declare it in embedding_modules", _V_MODULES),
        Rule("conv_lora", "refuses", "puts LoRA on linear (and MoE) layers only; other modules are unexpected",
             _V_MODULES),
        Rule("init_weights", "refuses",
             "refuses init_lora_weights pissa/olora/corda/loftq (PEFT would rewrite the base weights on load)",
             Source("vLLM", _V, _V_HELPER, "PEFTHelper._validate_features and _init_is_supported (lines 71-101)")),
        Rule("trainable_tokens", "refuses",
             "refuses the adapter: a trainable_tokens_delta tensor is neither lora_A/B nor lora_embedding_A/B, so "
             "it is an unsupported LoRA weight",
             Source("vLLM", _V, "vllm/lora/utils.py", "parse_fine_tuned_lora_name (utils.py 223-236)")),
        Rule("layer_replication", "misreads",
             "does not read layer_replication (PEFTHelper keeps only the config fields it knows): each copy's LoRA "
             "names a layer index of the replicated stack, which the served model does not have or holds another "
             "layer at", Source("vLLM", _V, _V_HELPER, "PEFTHelper.from_dict (fields it does not know are dropped)")),
        Rule("moe_per_expert", "reads",
             "reads per-expert LoRA for MoE classes with 2-D expert loading (Mixtral, Qwen2/3-MoE, DeepSeek, ...), "
             "stacking each layer's experts; classes marked is_3d_moe_weight (gpt-oss, Qwen3-VL-MoE, Qwen3.5-MoE) "
             "refuse it as unexpected modules unless --enable-mixed-moe-lora-format", _V_MOE),
        Rule("moe_target_parameters", "model-dependent",
             "reads fused target_parameters experts only for classes marked is_3d_moe_weight (gpt-oss, "
             "Qwen3-VL-MoE, Qwen3.5-MoE); other MoE classes refuse them (\"contains fused 3D MoE weights\") unless "
             "--enable-mixed-moe-lora-format and is_3d_lora_weight on the request", _V_MOE),
        *(Rule(f, "drops", "applies LoRA to the language model only: tower and connector modules get no LoRA "
                            "wrapper (a startup log line), unless --enable-tower-connector-lora on a class that "
                            "declares it (Qwen2-VL, Qwen2.5-VL, Llava, Gemma 3; not Mistral 3)", _V_TOWER)
          for f in ("vision_tower", "checkpoint_tower_names")),
    ),
    notes=(
        "vLLM refuses ranks above --max-lora-rank (default 16; allowed 1, 8, 16, 32, 64, 128, 256, 320, 512): "
        "vllm/config/lora.py line 33, PEFTHelper.validate_legal",
        "vLLM loads LoRA only for model classes that support it (GPT-2 does not in 0.34.0)",
    ),
)

#: vLLM before rank_pattern/alpha_pattern support: every other rule as in :data:`VLLM`.
VLLM_LEGACY = Consumer(
    name="vllm<0.32",
    title="vLLM before 0.32",
    version="0.31.0",
    scale_rule="global",
    scale_source=Source("vLLM", "0.31.0", _V_HELPER, "PEFTHelper.__post_init__ (lines 60-65)"),
    layout="uniform-scale",
    rules=VLLM.rules,
    notes=VLLM.notes,
)

# ------------------------------------------------------------------------------------------------ llama.cpp
_L = "0c1e57098 (vendored in llama-cpp-python 0.3.36)"
_L_CONVERT = Source("llama.cpp", _L, "convert_lora_to_gguf.py",
                    "LoraModel.get_tensors (lines 457-499): any tensor but lora_A/B, lora_embedding_A/B, "
                    "base_layer.weight and norms stops the converter")
LLAMA_CPP = Consumer(
    name="llama.cpp",
    title="llama.cpp",
    version=_L,
    scale_rule="tensor-rank",
    scale_source=Source("llama.cpp", _L, "src/llama-adapter.h + convert_lora_to_gguf.py",
                        "llama_adapter_lora_weight::get_scale (lines 53-57: rank = b->ne[0]); the converter writes "
                        "only lparams['lora_alpha'] (line 528)"),
    layout="tensor-rank",
    rules=_rules(
        Rule("rank_pattern", "reads", "takes each module's rank from its tensors", _L_CONVERT),
        Rule("alpha_pattern", "misreads", "ignores alpha_pattern: one lora_alpha for every module",
             Source("llama.cpp", _L, "convert_lora_to_gguf.py", "main (line 528) and set_gguf_parameters")),
        Rule("rslora", "misreads", "ignores use_rslora: scale lora_alpha / r_m, not / sqrt(r_m)",
             Source("llama.cpp", _L, "src/llama-adapter.h", "llama_adapter_lora_weight::get_scale (lines 53-57)")),
        Rule("lora_bias", "refuses", "the converter stops on lora_B.bias (not a lora_A or lora_B tensor)", _L_CONVERT),
        Rule("trainable_tokens", "refuses",
             "the converter stops on token_adapter.trainable_tokens_delta (not a lora_A or lora_B tensor)", _L_CONVERT),
        Rule("layer_replication", "misreads",
             "reads no layer_replication (only lora_alpha from the config): each copy's LoRA goes to the base layer "
             "of the same index, or to none past the base's layer count",
             Source("llama.cpp", _L, "convert_lora_to_gguf.py", "main (line 528): lparams['lora_alpha'] only")),
        Rule("dora", "refuses", "the converter stops on lora_magnitude_vector", _L_CONVERT),
        Rule("modules_to_save", "refuses", "the converter stops on whole saved modules (embeddings, heads, ...)",
             _L_CONVERT),
        Rule("saved_norms", "drops",
             "the converter keeps saved norm weights but the loader skips every *_norm.weight",
             Source("llama.cpp", _L, "convert_lora_to_gguf.py + src/llama-adapter.cpp",
                    "get_tensors (lines 476-478) and llama_adapter_lora_init_impl (llama-adapter.cpp 290-293)")),
        Rule("tied_head_lora", "refuses",
             "refuses lm_head LoRA when the head is tied to the input embedding (no output.weight in the base)",
             Source("llama.cpp", _L, "convert_lora_to_gguf.py + src/llama-adapter.cpp",
                    "LoraModel.modify_tensors (lines 501-508) and llama_adapter_lora_init_impl (llama-adapter.cpp "
                    "333-336)")),
        Rule("tied_embedding_lora", "refuses",
             "a tied head is the token embedding's tensor, and the head's matrix product looks its LoRA up by that "
             "tensor: it takes the embedding's pair, whose shapes do not fit a matrix product, and the graph stops "
             "(GGML_ASSERT ggml_can_mul_mat)",
             Source("llama.cpp", _L, "src/llama-graph.cpp + src/llama-model.cpp",
                    "build_lora_mm (the LoRA found by weight tensor); output = tok_embd when output.weight is absent")),
        Rule("conv_lora", "drops",
             "applies LoRA only in matrix products and the token-embedding lookup, never to a convolution",
             Source("llama.cpp", _L, "src/llama-graph.cpp", "build_lora_mm, build_lora_mm_id, build_inp_embd")),
        Rule("moe_per_expert", "reads",
             "stacks each layer's per-expert factors into ffn_{gate,up,down}_exps LoRA tensors",
             Source("llama.cpp", _L, "conversion/qwen.py + src/llama-graph.cpp",
                    "Qwen2MoeModel.modify_tensors (qwen.py 92-147); build_lora_mm_id (llama-graph.cpp 1555-1590)")),
        Rule("moe_target_parameters", "refuses",
             "the converter cannot place experts.base_layer / experts tensors (\"Unprocessed experts\" or \"Can not "
             "map tensor\")",
             Source("llama.cpp", _L, "conversion/qwen.py + conversion/base.py",
                    "Qwen2MoeModel.prepare_tensors (qwen.py 149-156); ModelBase.map_tensor_name (base.py 627-630)")),
        *(Rule(f, "drops", "the converter skips vision tower and projector tensors (they belong to the mmproj file, "
                            "which takes no LoRA)",
               Source("llama.cpp", _L, "convert_lora_to_gguf.py + conversion/base.py",
                      "LoraModel.get_tensors (line 466: filter_tensors); TextModel.filter_tensors (base.py 1387-1401)"))
          for f in ("vision_tower", "checkpoint_tower_names")),
        Rule("fan_in_fan_out_lora", "misreads",
             "transposes GPT-2 Conv1D LoRA as it transposes the base weight, but PEFT stores those factors in "
             "nn.Linear orientation: the delta is transposed (refused at load unless the layer is square)",
             Source("llama.cpp", _L, "conversion/gpt2.py + convert_lora_to_gguf.py",
                    "GPT2Model.modify_tensors (gpt2.py 33-34), LoraTorchTensor.permute; shape check in "
                    "llama-adapter.cpp 365-366")),
    ),
    notes=("llama.cpp reads the config's lora_alpha only; target_modules, r and the patterns are not read",),
)

#: llama.cpp reading a GGUF LoRA file that ``lorasurg export --to gguf`` wrote (``--to gguf`` names it): the loader's
#: rules, without the converter's. The factors of a layer stored ``(in, out)`` (GPT-2 ``Conv1D``) are PEFT's, in
#: ``nn.Linear`` orientation, and GGUF stores every such weight ``(out, in)``: written as they are, they are read as
#: PEFT reads them (the converter transposes them like the base weight).
LLAMA_CPP_GGUF = Consumer(
    name="llama.cpp-gguf",
    title="llama.cpp (GGUF)",
    version=_L,
    scale_rule="tensor-rank",
    scale_source=LLAMA_CPP.scale_source,
    layout="tensor-rank",
    rules={
        **LLAMA_CPP.rules,
        "lora_bias": Rule("lora_bias", "refuses", "has no GGUF form for lora_B.bias (the loader takes only "
                          "lora_a/lora_b pairs and norms)", Source("llama.cpp", _L, "src/llama-adapter.cpp",
                                                     "llama_adapter_lora_init_impl (unexpected suffix)")),
        "dora": Rule("dora", "refuses", "has no GGUF form for DoRA magnitudes (lora_a/lora_b pairs only)",
                     Source("llama.cpp", _L, "src/llama-adapter.cpp", "llama_adapter_lora_init_impl")),
        "modules_to_save": Rule("modules_to_save", "refuses",
                                "has no GGUF adapter form for whole saved modules (lora_a/lora_b pairs only)",
                                Source("llama.cpp", _L, "src/llama-adapter.cpp", "llama_adapter_lora_init_impl")),
        "trainable_tokens": Rule("trainable_tokens", "refuses",
                                 "has no GGUF adapter form for trainable-token rows (lora_a/lora_b pairs only)",
                                 Source("llama.cpp", _L, "src/llama-adapter.cpp", "llama_adapter_lora_init_impl")),
        "fan_in_fan_out_lora": Rule(
            "fan_in_fan_out_lora", "reads",
            "reads LoRA on (in, out) layers as PEFT does: lorasurg writes PEFT's nn.Linear-oriented factors against "
            "the (out, in) weight the GGUF holds",
            Source("llama.cpp", _L, "src/llama-adapter.cpp", "llama_adapter_lora_init_impl (shape checks)")),
    },
    notes=LLAMA_CPP.notes,
)

CONSUMERS: dict[str, Consumer] = {c.name: c for c in (PEFT, VLLM, VLLM_LEGACY, LLAMA_CPP, LLAMA_CPP_GGUF)}
#: what ``--for`` accepts (``all`` is every one of them).
CHOICES = ("peft", "vllm", "llama.cpp")
#: consumers a caller may name that ``--for`` does not offer: ``llama.cpp-gguf`` is what ``--to gguf`` writes for.
HIDDEN = ("llama.cpp-gguf",)


def with_serving(spec: Union[str, Iterable[str], None], serving: bool) -> tuple[str, ...]:
    """:func:`parse_consumers` of ``spec`` with ``--serving`` (an alias of ``--for vllm``) applied: ``vllm`` replaces
    the default ``peft``, or joins the consumers named."""
    names = parse_consumers(spec)
    if not serving:
        return names
    return ("vllm",) if names == ("peft",) else parse_consumers([*names, "vllm"])


def parse_consumers(spec: Union[str, Iterable[str], None], *, hidden: bool = True) -> tuple[str, ...]:
    """``"vllm,llama.cpp"``, ``"all"``, a list of names, or None (``peft``) -> the consumer names, in
    :data:`CHOICES` order (then :data:`HIDDEN`), without repeats.

    Args:
        hidden: accept the names of :data:`HIDDEN` too (``--for`` passes False: they are not its to offer).

    Raises:
        ConfigError: an unknown name (the message lists the choices).
    """
    if spec is None:
        return ("peft",)
    items = spec.split(",") if isinstance(spec, str) else [part for s in spec for part in str(s).split(",")]
    names = {item.strip().lower() for item in items if item.strip()}
    if not names:
        return ("peft",)
    if "all" in names:
        names = (names - {"all"}) | set(CHOICES)
    known = (*CHOICES, *HIDDEN) if hidden else CHOICES
    unknown = sorted(n for n in names if n not in known)
    if unknown:
        raise ConfigError(
            f"unknown consumer(s) {', '.join(map(repr, unknown))} for --for; choose from "
            f"{', '.join(CHOICES)} or all (comma-separated for several)"
        )
    return tuple(c for c in known if c in names)
