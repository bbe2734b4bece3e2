"""``lorasurg residualize``: the residual base and initial adapter of PiSSA/OLoRA, written offline.

:mod:`.run` plans the targets and streams BASE through the shared checkpoint rewriter (its docstring states the
math); :mod:`.report` is what it returns.
"""

from .report import ResidualizeReport, ResidualModule
from .run import residualize

__all__ = ["residualize", "ResidualizeReport", "ResidualModule"]
