"""``lorasurg residualize``: the residual base and initial adapter of PiSSA/OLoRA, written offline.

:mod:`.targets` selects the targets (by the model's names, experts one by one) and lays out the initial adapter as
PEFT loads it; :mod:`.run` streams BASE through the shared checkpoint rewriter (its docstring states the
math); :mod:`.report` is what it returns.
"""

from .report import ResidualizeReport, ResidualModule
from .run import residualize

__all__ = ["residualize", "ResidualizeReport", "ResidualModule"]
