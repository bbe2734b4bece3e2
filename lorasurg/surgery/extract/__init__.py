"""``lorasurg extract``: a LoRA adapter from a full fine-tune, by truncated SVD of each weight delta.

The package reads as the steps of one run: :mod:`.plan` (what each tensor is for), :mod:`.process` (one
tensor pair: compare, then fit or carry), :mod:`.fit` and :mod:`.stream` (the SVD, in memory or streamed in
row blocks), :mod:`.experts` (the experts of a mixture-of-experts layer, fitted together by one batched SVD per
projection and layer), :mod:`.build` (the PEFT adapter, laid out by
:func:`~lorasurg.surgery.adapter_layout.peft_layout`) and :mod:`.report` (what became of every tensor). :mod:`.run`
composes them; its docstring states the math.
"""

from .report import ExtractReport
from .run import extract, extract_to_dir

__all__ = ["extract", "extract_to_dir", "ExtractReport"]
