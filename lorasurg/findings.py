"""The vocabulary of ``lorasurg validate``: every finding code, its severity and what it means, in one table.

A :class:`Finding` is one problem found in an adapter or a config: a stable ``code`` (a key of :data:`CODES`),
``where`` (the module, tensor key, config field or file it concerns), ``message`` (the evidence: values,
shapes, counts) and ``fix`` (what to do). Its severity comes from the code's row in :data:`CODES`:

* ``error``: PEFT (or a consumer named with ``--for``) refuses the adapter, or loads it and quietly does
  something other than what it says;
* ``warning``: it loads and works, but something is probably not what its author meant;
* ``info``: worth knowing, nothing wrong.

Codes are stable: a code is never renamed or reused for another meaning. New checks add rows here (and a
line in the README's table, which a test compares with this one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Severity", "SEVERITIES", "Code", "CODES", "Finding"]

Severity = Literal["error", "warning", "info"]
#: Severities, most severe first.
SEVERITIES: tuple[str, ...] = ("error", "warning", "info")


@dataclass(frozen=True)
class Code:
    """One row of the vocabulary: a finding code's severity, the area of its check, and its one-line meaning."""

    severity: str
    area: str
    summary: str


CODES: dict[str, Code] = {
    # files: what is on disk
    "file-missing": Code("error", "files", "the adapter directory lacks adapter_config.json or its weights file"),
    "file-unreadable": Code(
        "error", "files", "a file cannot be read: truncated or corrupt safetensors, invalid JSON, a .bin that needs code"
    ),
    "file-bin": Code("info", "files", "the weights are a pickle-based adapter_model.bin; safetensors is safer to share"),
    "key-foreign": Code("error", "files", "a tensor key does not start with base_model.model. (not a PEFT adapter key)"),
    "module-incomplete": Code("error", "files", "a module has lora_A without lora_B, or the reverse"),
    # the config alone
    "config-invalid": Code("error", "config", "a value or combination of values PEFT's LoraConfig refuses"),
    "config-warning": Code("warning", "config", "a setting PEFT accepts with a warning, then ignores or changes"),
    "config-unknown-key": Code("info", "config", "a config key PEFT 0.21.2 does not know (written by a newer PEFT?)"),
    "init-reinit": Code(
        "warning", "config",
        "a saved adapter names an init (pissa, olora, corda, loftq, lora_ga, eva) that PEFT runs again on load",
    ),
    "alpha-sign": Code(
        "warning", "config", "lora_alpha (or an alpha_pattern value) is 0 or negative: the delta vanishes or is subtracted"
    ),
    # the config against the base model
    "target-unmatched": Code("error", "targets", "a target_modules entry matches no module of the base model"),
    "target-none-selected": Code(
        "error", "targets", "target_modules selects no module: every match is excluded or outside layers_to_transform"
    ),
    "target-unsupported": Code("error", "targets", "target_modules selects a module of a type LoRA cannot wrap"),
    "exclude-unmatched": Code("warning", "targets", "an exclude_modules entry excludes no module target_modules selects"),
    "layers-out-of-range": Code("error", "targets", "a layers_to_transform index is not a layer of the base model"),
    "layers-pattern-unmatched": Code("error", "targets", "a layers_pattern occurs in no module name of the base model"),
    "pattern-unmatched": Code(
        "error", "targets", "a rank_pattern/alpha_pattern key matches no targeted module (PEFT ignores it silently)"
    ),
    "rank-too-large": Code("warning", "targets", "r exceeds min(out, in) of a targeted layer: the extra rank is wasted"),
    "save-unmatched": Code("error", "targets", "a modules_to_save entry matches no module of the base model"),
    # the tensors against the config
    "tensor-untargeted": Code("error", "tensors", "LoRA tensors of a module the config does not target (PEFT ignores them)"),
    "rank-mismatch": Code("error", "tensors", "a module's stored rank differs from r / rank_pattern"),
    "rank-inconsistent": Code("error", "tensors", "lora_A's rows differ from lora_B's columns"),
    "bias-unflagged": Code("error", "tensors", "lora_B.bias tensors but lora_bias is false (PEFT drops them silently)"),
    "bias-missing": Code("warning", "tensors", "lora_bias is true but a module has no lora_B.bias (PEFT warns, uses 0)"),
    "bias-on-embedding": Code("error", "tensors", "lora_bias with a LoRA on an embedding (PEFT refuses it)"),
    "bias-shape": Code("error", "tensors", "a lora_B.bias whose shape is not (out_features,)"),
    "magnitude-missing": Code("error", "tensors", "use_dora is true but a module has no lora_magnitude_vector"),
    "magnitude-unflagged": Code("error", "tensors", "a lora_magnitude_vector but use_dora is false (PEFT drops it)"),
    "magnitude-shape": Code("error", "tensors", "a lora_magnitude_vector without one entry per output"),
    "save-tensor-missing": Code("error", "tensors", "a modules_to_save module has no saved tensors in the adapter"),
    "dtype-mixed": Code("warning", "tensors", "tensors of one role (lora_A, lora_B, ...) stored in different dtypes"),
    # the tensors against the base model
    "module-missing": Code("error", "base", "a LoRA module of the adapter is not in the base model (another model?)"),
    "kind-mismatch": Code("error", "base", "the LoRA's layer kind (linear, embedding, conv) differs from the base layer's"),
    "shape-mismatch": Code(
        "error", "base", "a tensor does not fit its base layer (in/out features, vocabulary, kernel, fan_in_fan_out)"
    ),
    "extra-unmatched": Code("warning", "base", "a non-LoRA tensor (modules_to_save copy) the base model has no place for"),
    "replication-invalid": Code(
        "error", "base", "layer_replication does not fit the base model (no layer stack, or a range past its layers)"
    ),
    "key-checkpoint-name": Code(
        "error", "base", "a module or tensor keyed by the checkpoint's name, which the model names otherwise (PEFT misses it)"
    ),
    # trainable tokens (trainable_token_indices)
    "tokens-unflagged": Code(
        "error", "tokens", "trainable-token rows for a module trainable_token_indices does not name (PEFT ignores them)"
    ),
    "tokens-missing": Code(
        "error", "tokens", "trainable_token_indices names a module the file has no rows for (PEFT keeps the base rows)"
    ),
    "tokens-shape": Code("error", "tokens", "trainable-token rows that do not fit their indices or their layer"),
    "tokens-conflict": Code(
        "error", "tokens", "a module with trainable tokens is also a LoRA target or in modules_to_save (PEFT refuses)"
    ),
    "tokens-need-resize": Code(
        "warning", "tokens", "a trainable-token index past the base's rows: resize its token embeddings before loading"
    ),
    # mixtures of experts and target_parameters, as PEFT 0.21.2 loads them on transformers 5
    "parameter-unmatched": Code("error", "experts", "a target_parameters entry matches no parameter of the base model"),
    "parameter-refused": Code(
        "error", "experts", "target_parameters (or per-expert LoRA PEFT converts to them) with a setting PEFT's "
        "ParamWrapper refuses: lora_dropout, lora_bias, DoRA, fan_in_fan_out"
    ),
    "expert-unconverted": Code(
        "error", "experts",
        "per-expert LoRA on a model type whose config PEFT does not convert (Qwen2-MoE), its fused parameters not in "
        "target_parameters: dropped silently"
    ),
    "expert-fused-part": Code(
        "error", "experts", "one part of a fused expert projection is targeted without the other (gate_proj, up_proj)"
    ),
    "expert-missing": Code("error", "experts", "an expert of an adapted MoE layer has no LoRA (PEFT's conversion fails)"),
    "expert-layer-missing": Code(
        "warning", "experts", "an MoE layer PEFT adapts has no expert LoRA at all (missing keys, zero delta)"
    ),
    "expert-rank": Code(
        "error", "experts", "experts of a layer's projection differ in rank, or differ from the rank PEFT builds (r)"
    ),
    "expert-scale": Code(
        "error", "experts", "PEFT's conversion reads experts at another scale than the adapter gives them"
    ),
    "dense-converted": Code(
        "error", "experts", "a dense layer named like an expert projection, which PEFT's MoE conversion leaves unadapted"
    ),
    # values
    "value-nonfinite": Code("error", "values", "a tensor holds NaN or inf"),
    "untrained": Code("warning", "values", "lora_B (and lora_B.bias) is zero on every module: the adapter is a no-op"),
    # the consumers named with --for (vLLM, llama.cpp): how each reads the adapter, compared with PEFT
    "consumer-refuses": Code(
        "error", "consumers", "a --for consumer refuses to load (or convert) part of the adapter"
    ),
    "consumer-drops": Code(
        "error", "consumers", "a --for consumer loads the adapter but silently leaves part of it out"
    ),
    "consumer-misreads": Code(
        "error", "consumers", "a --for consumer applies part of the adapter other than PEFT does"
    ),
    "consumer-scale": Code(
        "error", "consumers", "a --for consumer applies another scale than PEFT on some modules (the factor is given)"
    ),
    "consumer-model-dependent": Code(
        "warning", "consumers", "a --for consumer reads this part only for some base models (vLLM: embedding, lm_head)"
    ),
    "consumer-legacy-scale": Code(
        "warning", "consumers", "vLLM before 0.32 (one scale for the adapter) applies another scale than PEFT"
    ),
    "consumer-max-rank": Code("warning", "consumers", "a rank above vLLM's default --max-lora-rank of 16"),
    # GGUF LoRA files (llama.cpp's format), as llama.cpp's loader reads them
    "gguf-metadata": Code(
        "error", "gguf", "general.type is not adapter, adapter.type not lora, or general.architecture missing"
    ),
    "gguf-architecture": Code("error", "gguf", "the file's general.architecture is not the base model's"),
    "gguf-tensor-unexpected": Code(
        "error", "gguf", "a tensor that is neither half of a .lora_a/.lora_b pair nor a norm (llama.cpp stops)"
    ),
    "gguf-alpha": Code("warning", "gguf", "adapter.lora.alpha missing or 0: llama.cpp applies scale 1, not alpha / r"),
    # the run itself
    "check-skipped": Code("info", "run", "a check could not run (no --base, or the config is unusable)"),
}
"""Every finding code: severity, area and one-line meaning. The README's table of codes mirrors this one."""


@dataclass(frozen=True)
class Finding:
    """One problem found by ``lorasurg validate``.

    Attributes:
        code: a key of :data:`CODES` (stable; see the README's table).
        where: what it concerns: a module name, a tensor key, a config field (``rank_pattern['q']``) or a file.
        message: what is wrong, with the evidence (values, shapes, counts).
        fix: what to do about it.
        modules: every module or tensor key concerned, when the finding concerns several (``where`` then names
            the first and how many more); empty otherwise.
    """

    code: str
    where: str
    message: str
    fix: str = ""
    modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown finding code {self.code!r}; add it to lorasurg.findings.CODES")

    @property
    def severity(self) -> str:
        """``error``, ``warning`` or ``info``, from the code's row in :data:`CODES`."""
        return CODES[self.code].severity

    def __str__(self) -> str:
        """``"<where>: <message>"``: the one-line form :meth:`lorasurg.Adapter.problems` lists."""
        return f"{self.where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        out = {"severity": self.severity, "code": self.code, "where": self.where, "message": self.message,
               "fix": self.fix}
        if self.modules:
            out["modules"] = list(self.modules)
        return out
