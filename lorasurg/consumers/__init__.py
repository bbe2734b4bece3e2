"""What PEFT, vLLM and llama.cpp each read from a PEFT LoRA adapter, and how to write one they all read alike.

* :mod:`.rules`: each consumer's reading rules as data (scale rule; what it reads, refuses, drops or misreads),
  with the version and source each rule was read from.
* :mod:`.reading`: the delta a consumer computes per module (:func:`consumer_delta`), and where it differs
  from PEFT (:func:`consumer_findings`, :func:`consumer_verdicts`).
* :mod:`.prepare`: :func:`prepare_for` rewrites an adapter so the named consumers compute PEFT's delta.
* :mod:`.layouts` (data in :mod:`.layout_rules`): which MoE and multimodal LoRA layouts each consumer serves and
  the conditions it puts on them (:data:`CONDITIONS`, :func:`layout_violations`); :mod:`.complete` completes
  per-expert LoRA losslessly for :func:`prepare_for`; :mod:`.experts` holds PEFT's MoE conversion rule by model
  type.
"""

from .layouts import CONDITIONS, Condition, Violation, layout_violations
from .prepare import ForReport, LeftOut, blocked_parts, prepare_for
from .reading import (
    ConsumerFinding,
    ConsumerVerdict,
    adapter_features,
    consumer_delta,
    consumer_findings,
    consumer_scale,
    consumer_verdicts,
    peft_scale,
    tied_heads,
    tied_modules,
)
from .rules import CHOICES, CONSUMERS, FEATURES, Consumer, Rule, Source, parse_consumers, with_serving

__all__ = [
    "CHOICES",
    "CONSUMERS",
    "FEATURES",
    "Consumer",
    "Rule",
    "Source",
    "parse_consumers",
    "with_serving",
    "ConsumerFinding",
    "ConsumerVerdict",
    "adapter_features",
    "consumer_delta",
    "consumer_findings",
    "consumer_scale",
    "consumer_verdicts",
    "peft_scale",
    "tied_heads",
    "tied_modules",
    "ForReport",
    "LeftOut",
    "prepare_for",
    "blocked_parts",
    "CONDITIONS",
    "Condition",
    "Violation",
    "layout_violations",
]
