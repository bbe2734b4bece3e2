"""What each consumer computes from an adapter's files, and where that differs from PEFT.

* :func:`adapter_features` finds the parts of an adapter a consumer may treat differently (see
  :data:`~lorasurg.consumers.rules.FEATURES`), module by module or tensor by tensor.
* :func:`consumer_scale` / :func:`consumer_delta`: the scale and the LoRA factors one consumer applies to one
  module (``delta = scale * B @ A``, plus ``scale * lora_B.bias`` where it reads the bias), or None when it
  applies nothing there. PEFT's own reading is the reference.
* :func:`consumer_findings`: for each consumer, what it refuses, drops silently or misreads, and the modules
  on which its scale differs from PEFT's, with the factor, as plain :class:`ConsumerFinding` records.
* :func:`consumer_verdicts`: one line per consumer, for ``inspect``.

Tied heads: a LoRA on an ``lm_head`` whose weight is the input embedding's, and on that embedding. The files do
not say that a head is tied; pass ``tied`` (names of the tied output modules and of the embeddings they share a
weight with), or let :func:`tied_heads` recognise what ``extract`` writes for a tied head (the embedding's factors,
transposed): the embedding it mirrors is then tied too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Collection, Iterable, Optional, Union

import torch

from ..engine.factors import LoraFactors, lora_scale
from ..io.adapter import TOKENS_PART, Adapter
from .layouts import layout_features, layout_violations, treatment_for
from .rules import CONSUMERS, FEATURES, Consumer, parse_consumers

__all__ = [
    "REWRITING_INITS",
    "ConsumerFinding",
    "ConsumerVerdict",
    "tied_heads",
    "tied_modules",
    "is_norm_key",
    "adapter_features",
    "peft_scale",
    "consumer_scale",
    "consumer_delta",
    "module_energy",
    "bias_energy",
    "consumer_findings",
    "consumer_verdicts",
    "MODULE_FEATURES",
]

#: init_lora_weights values with which PEFT rewrites the base weights when it loads the adapter.
REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
_OUTPUT_LEAVES = ("lm_head",)
_SCALE_FEATURES = ("rank_pattern", "alpha_pattern", "rslora")
#: Features of whole modules: a consumer that refuses or drops one applies no LoRA on that module.
MODULE_FEATURES = ("embedding_lora", "tied_embedding_lora", "output_layer_lora", "tied_head_lora", "conv_lora", "moe_target_parameters",
                   "vision_tower", "checkpoint_tower_names")

Consumers = Union[str, Iterable[str], None]


@dataclass(frozen=True)
class ConsumerFinding:
    """One way a consumer reads an adapter differently from PEFT.

    Attributes:
        consumer: the consumer's name (``vllm``, ``llama.cpp``, ``vllm<0.32``).
        code: ``<treatment>:<feature>`` (``refuses:lora_bias``, ``drops:saved_norms``, ``misreads:fan_in_fan_out_lora``,
            ``model-dependent:embedding_lora``), ``scale`` (a different scale on some modules), ``legacy-scale``
            (the same for vLLM before 0.32) or ``max-rank`` (above vLLM's default --max-lora-rank).
        severity: ``error`` (the consumer fails, drops something silently or computes another delta) or
            ``warning`` (depends on the model or the serving settings).
        message: what happens, with the numbers.
        hint: what to do.
        modules: the modules or tensors concerned (empty when the whole adapter is).
    """

    consumer: str
    code: str
    severity: str
    message: str
    hint: str
    modules: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {**asdict(self), "modules": list(self.modules)}


@dataclass(frozen=True)
class ConsumerVerdict:
    """Whether one consumer reads an adapter as PEFT does, in one line."""

    consumer: str
    same_as_peft: bool
    line: str

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ features


def tied_heads(adapter: Adapter) -> set[str]:
    """Output modules (leaf ``lm_head``) whose factors are an embedding module's, transposed (``A_head =
    B_emb.T``, ``B_head = A_emb.T``): how ``extract`` writes the LoRA of a head tied to the input embedding."""
    return {head for head, _ in _mirrored_pairs(adapter)}


def tied_modules(adapter: Adapter) -> set[str]:
    """The heads of :func:`tied_heads` and the embeddings they mirror."""
    return {name for pair in _mirrored_pairs(adapter) for name in pair}


def _mirrored_pairs(adapter: Adapter) -> set[tuple[str, str]]:
    """``(head, embedding)`` pairs of :func:`tied_heads`."""
    embeddings = {n: m for n, m in adapter.modules.items() if m.embedding}
    found = set()
    for name, mod in adapter.modules.items():
        if mod.embedding or name.rsplit(".", 1)[-1] not in _OUTPUT_LEAVES:
            continue
        for emb_name, emb in embeddings.items():
            if (mod.A.shape == emb.B.T.shape and mod.B.shape == emb.A.T.shape
                    and torch.equal(mod.A, emb.B.T) and torch.equal(mod.B, emb.A.T)):
                found.add((name, emb_name))
    return found


def is_norm_key(key: str) -> bool:
    """Whether a saved tensor key is a norm weight as llama.cpp's converter tells them (``_layernorm``/``.norm``)."""
    return "_layernorm" in key or ".norm" in key


def adapter_features(adapter: Adapter, tied: Optional[Collection[str]] = None) -> dict[str, list[str]]:
    """``{feature: names}`` for every feature of :data:`~lorasurg.consumers.rules.FEATURES` the adapter has.

    Names are module names, or for ``modules_to_save``/``saved_norms`` tensor keys (without
    ``base_model.model.``); a feature of the whole config is listed as ``config.<field>=<value>``. PEFT's
    saved copies of an embedding's base weight (``*.base_layer.weight``) are no delta and are not listed.

    Args:
        tied: names of output modules tied to the input embedding and of that embedding; None: :func:`tied_heads`
            and the embeddings they mirror.
    """
    cfg = adapter.config
    tied_set = tied_modules(adapter) if tied is None else set(tied)
    found: dict[str, list[str]] = {f: [] for f in FEATURES}
    for name, mod in adapter.modules.items():
        r, alpha = adapter.rank_alpha(name)
        leaf = name.rsplit(".", 1)[-1]
        if r != cfg.r:
            found["rank_pattern"].append(name)
        if alpha != cfg.lora_alpha:
            found["alpha_pattern"].append(name)
        if cfg.use_rslora:
            found["rslora"].append(name)
        if mod.bias is not None:
            found["lora_bias"].append(name)
        if mod.magnitude is not None:
            found["dora"].append(name)
        if mod.embedding:
            found["embedding_lora"].append(name)
            if name in tied_set:
                found["tied_embedding_lora"].append(name)
        elif name in tied_set:
            found["tied_head_lora"].append(name)
        elif leaf in _OUTPUT_LEAVES:
            found["output_layer_lora"].append(name)
        if mod.kind.startswith("conv"):
            found["conv_lora"].append(name)
        elif mod.kind == "linear" and cfg.fan_in_fan_out and leaf not in _OUTPUT_LEAVES:
            found["fan_in_fan_out_lora"].append(name)
    if cfg.use_dora and not found["dora"]:
        found["dora"].append("config.use_dora=true")
    tokens = {f"{m}.{TOKENS_PART}" for m in adapter.token_rows()}
    for key in adapter.extra:
        if key.endswith(".base_layer.weight"):
            continue
        if key in tokens:
            found["trainable_tokens"].append(key)
            continue
        found["saved_norms" if is_norm_key(key) else "modules_to_save"].append(key)
    if cfg.layer_replication:
        found["layer_replication"].append(f"config.layer_replication={cfg.layer_replication}")
    init = cfg.init_lora_weights
    if isinstance(init, str) and init.lower().split("_niter")[0] in REWRITING_INITS:
        found["init_weights"].append(f"config.init_lora_weights={init}")
    for feature, names in layout_features(adapter).items():
        found[feature].extend(names)
    return {f: names for f, names in found.items() if names}


# ------------------------------------------------------------------------------------------------ deltas


def peft_scale(adapter: Adapter, module: str) -> float:
    """PEFT's scale for ``module``: ``alpha_m / r_m`` (``/ sqrt(r_m)`` with rsLoRA), from the patterns."""
    r, alpha = adapter.rank_alpha(module)
    return lora_scale(r, alpha, adapter.config.use_rslora)


def consumer_scale(adapter: Adapter, consumer: str, module: str) -> float:
    """The scale ``consumer`` multiplies ``module``'s ``B @ A`` by (see :mod:`lorasurg.consumers.rules`)."""
    rule = _consumer(consumer).scale_rule
    cfg = adapter.config
    if rule == "pattern":
        return peft_scale(adapter, module)
    if rule == "global":
        return lora_scale(cfg.r, cfg.lora_alpha, cfg.use_rslora)
    if rule == "tensor-rank":
        alpha = float(cfg.lora_alpha)
        return alpha / adapter.modules[module].rank if alpha else 1.0
    raise AssertionError(f"unknown scale rule {rule!r}")


def consumer_delta(adapter: Adapter, consumer: str, module: str,
                   tied: Optional[Collection[str]] = None) -> Optional[LoraFactors]:
    """The LoRA ``consumer`` applies to ``module``: factors, its scale, the ``lora_B.bias`` and DoRA magnitude
    it reads; None when it applies no LoRA there (it drops or refuses that module's LoRA).

    ``delta_matrix(result)`` (:mod:`lorasurg.engine.factors`) is the ``(out, in)`` change ``scale * B @ A``;
    a model-dependent module (vLLM's embedding LoRA) is returned as read where the model supports it.
    Whether the consumer loads the adapter at all is :func:`consumer_findings`' business.
    """
    return _delta(adapter, _consumer(consumer), module, adapter_features(adapter, tied))


def _delta(adapter: Adapter, c: Consumer, module: str, features: dict[str, list[str]]) -> Optional[LoraFactors]:
    """:func:`consumer_delta` with the adapter's features already found."""
    mod = adapter.modules[module]
    for feature in MODULE_FEATURES:
        if module in features.get(feature, ()) and c.treatment(feature) in ("refuses", "drops"):
            return None
    cfg = adapter.config
    bias = mod.bias if cfg.lora_bias and c.treatment("lora_bias") == "reads" else None
    magnitude = mod.magnitude if cfg.use_dora and c.treatment("dora") == "reads" else None
    A, B = mod.A, mod.B
    if module in features.get("fan_in_fan_out_lora", ()) and c.treatment("fan_in_fan_out_lora") == "misreads":
        A, B = mod.B.T, mod.A.T  # the converter swaps and transposes the pair: the delta (B @ A).T
    return LoraFactors(mod.kind, A, B, consumer_scale(adapter, c.name, module), bias=bias, magnitude=magnitude)


def module_energy(adapter: Adapter, module: str) -> float:
    """``||scale * B @ A||_F**2`` of ``module`` as PEFT applies it, from the factors' Gram matrices."""
    mod = adapter.modules[module]
    r = mod.rank
    A = mod.A.reshape(r, -1).double()  # (r, in)
    B = mod.B.reshape(mod.B.shape[0], r).double()  # (out, r)
    gram = (B.T @ B) * (A @ A.T)  # (r, r) elementwise (r, r): sum of it is trace(B'B AA')
    return float(gram.sum()) * peft_scale(adapter, module) ** 2


def bias_energy(adapter: Adapter, module: str) -> float:
    """``||scale * lora_B.bias||**2`` of ``module`` (0 without a bias)."""
    bias = adapter.modules[module].bias
    if bias is None:
        return 0.0
    return float(bias.double().pow(2).sum()) * peft_scale(adapter, module) ** 2


# ------------------------------------------------------------------------------------------------ findings


def consumer_findings(adapter: Adapter, consumers: Consumers = ("vllm", "llama.cpp"),
                      tied: Optional[Collection[str]] = None,
                      model_type: Optional[str] = None) -> list[ConsumerFinding]:
    """For each named consumer: what it refuses, drops silently or misreads, and where its scale differs from
    PEFT's (see :class:`ConsumerFinding`). ``vllm`` also reports, as warnings, where vLLM before 0.32 (one
    scale for the whole adapter) would differ. Empty for an adapter every named consumer reads as PEFT does.

    Args:
        consumers: names as ``--for`` takes them (``"vllm,llama.cpp"``, ``"all"``, a list); ``peft`` has none.
        tied: names of output modules tied to the input embedding; None: :func:`tied_heads`.
        model_type: the base's ``model_type``, when known: resolves what depends on it (vLLM's fused experts,
            :func:`~lorasurg.consumers.layouts.treatment_for`).
    """
    names = parse_consumers(consumers)
    features = adapter_features(adapter, tied)
    found: list[ConsumerFinding] = []
    for name in names:
        if name == "peft":
            continue
        c = CONSUMERS[name]
        found.extend(_feature_findings(c, features, model_type))
        found.extend(_layout_findings(adapter, c))
        found.extend(_scale_findings(adapter, c, features, code="scale", severity="error"))
        if name == "vllm":
            found.extend(_scale_findings(adapter, CONSUMERS["vllm<0.32"], features, code="legacy-scale",
                                         severity="warning", reported_as="vllm"))
            found.extend(_max_rank(adapter))
    return found


def consumer_verdicts(adapter: Adapter, consumers: Consumers = "all",
                      tied: Optional[Collection[str]] = None) -> list[ConsumerVerdict]:
    """One line per consumer: whether it reads the adapter as PEFT does, else the first differences."""
    verdicts = []
    for name in parse_consumers(consumers):
        c = CONSUMERS[name]
        if name == "peft":
            verdicts.append(ConsumerVerdict(name, True, f"{c.title} {c.version}: the reference"))
            continue
        found = consumer_findings(adapter, [name], tied)
        errors = [f for f in found if f.severity == "error"]
        warnings = [f for f in found if f.severity != "error"]
        if errors:
            listed = "; ".join(f.message for f in errors[:3]) + (f"; and {len(errors) - 3} more" if len(errors) > 3 else "")
            line = f"{c.title}: NOT as PEFT: {listed} (write it with --for {name})"
        elif warnings:
            line = f"{c.title}: as PEFT, except where noted: " + "; ".join(f.message for f in warnings[:3])
        else:
            line = f"{c.title}: reads it as PEFT does"
        verdicts.append(ConsumerVerdict(name, not errors, line))
    return verdicts


def _feature_findings(c: Consumer, features: dict[str, list[str]],
                      model_type: Optional[str] = None) -> list[ConsumerFinding]:
    out = []
    for feature, names in features.items():
        treatment = treatment_for(c, feature, model_type)
        if feature in _SCALE_FEATURES or treatment == "reads":
            continue
        rule = c.rules[feature]
        severity = "warning" if treatment == "model-dependent" else "error"
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        verb = {"refuses": "refuses", "drops": "drops silently", "misreads": "misreads",
                "model-dependent": "may refuse"}[treatment]
        message = f"{c.title} {verb} {FEATURES[feature]} ({len(names)}: {shown}): {rule.says}"
        hint = (f"write the adapter --for {_cli_name(c)} to leave this out (listed with its share of the delta); "
                f"source: {rule.source}")
        out.append(ConsumerFinding(c.name, f"{treatment}:{feature}", severity, message, hint, tuple(names)))
    return out


def _layout_findings(adapter: Adapter, c: Consumer) -> list[ConsumerFinding]:
    """The MoE layout conditions ``c`` puts on the adapter (:func:`~lorasurg.consumers.layouts.layout_violations`)
    that it breaks, one finding per condition, coded ``<treatment>:<feature>``."""
    out = []
    for v in layout_violations(adapter, c.name):
        cond = v.condition
        message = f"{c.title} {cond.treatment} {FEATURES[v.feature]} here ({v.detail}): {cond.says}"
        how = ("completes experts and projections with zero factors and pads their ranks, losslessly"
               if v.feature == "moe_per_expert" else f"leaves the fused experts out for {c.title}")
        hint = f"write the adapter --for {_cli_name(c)} (lorasurg.prepare_for {how}); source: {cond.source}"
        out.append(ConsumerFinding(c.name, f"{cond.treatment}:{v.feature}", "error", message, hint, v.where))
    return out


def _scale_findings(adapter: Adapter, c: Consumer, features: dict[str, list[str]], *, code: str,
                    severity: str, reported_as: Optional[str] = None) -> list[ConsumerFinding]:
    """Modules where ``c``'s scale differs from PEFT's, grouped by the factor (and, for llama.cpp, the rank)."""
    cfg = adapter.config
    groups: dict[tuple[float, int], list[str]] = {}
    for module in adapter.modules:
        if _delta(adapter, c, module, features) is None:
            continue
        ours, theirs = peft_scale(adapter, module), consumer_scale(adapter, c.name, module)
        if math.isclose(ours, theirs, rel_tol=1e-9, abs_tol=0.0):
            continue
        ratio = theirs / ours if ours else math.inf
        rank = adapter.modules[module].rank if c.scale_rule == "tensor-rank" else cfg.r
        groups.setdefault((float(f"{ratio:.6g}"), rank), []).append(module)
    out = []
    for (ratio, rank), modules in groups.items():
        if c.scale_rule == "tensor-rank":
            why = f"lora_alpha={_num(cfg.lora_alpha)} with rank {rank}"
            causes = [x for x in ("alpha_pattern", "rslora") if set(modules) & set(features.get(x, ()))]
            if causes:
                why += f" ({' and '.join('use_rslora' if x == 'rslora' else x for x in causes)} not read)"
        else:
            why = f"one scale for the whole adapter, lora_alpha/r = {_num(cfg.lora_alpha)}/{cfg.r}"
        shown = ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")
        message = f"{c.title} applies {ratio:g}x PEFT's scale on {len(modules)} module(s): {why} ({shown})"
        hint = (f"write the adapter --for {_cli_name(c)}: its factors are then scaled so that {c.title} computes "
                f"PEFT's delta; source: {c.scale_source}")
        out.append(ConsumerFinding(reported_as or c.name, code, severity, message, hint, tuple(modules)))
    return out


def _max_rank(adapter: Adapter) -> list[ConsumerFinding]:
    wrapped = adapter.parameter_wrapped()  # a target_parameters LoRA stores r * experts rows: its r is the config's
    top = max([m.rank for name, m in adapter.modules.items() if name not in wrapped]
              + [adapter.rank_alpha(p)[0] for p in adapter.config.target_parameters or []], default=0)
    if top <= 16:
        return []
    allowed = [1, 8, 16, 32, 64, 128, 256, 320, 512]
    need = next((a for a in allowed if a >= top), None)
    return [ConsumerFinding(
        "vllm", "max-rank", "warning",
        f"vLLM refuses ranks above --max-lora-rank, 16 by default; this adapter's largest rank is {top}",
        f"serve it with --max-lora-rank {need}" if need else "vLLM accepts ranks up to 512 only",
    )]


def _consumer(name: str) -> Consumer:
    try:
        return CONSUMERS[name]
    except KeyError:
        raise ValueError(f"unknown consumer {name!r}; expected one of {sorted(CONSUMERS)}") from None


def _cli_name(c: Consumer) -> str:
    return "vllm" if c.name.startswith("vllm") else c.name


def _num(x: float) -> str:
    return f"{x:g}"
