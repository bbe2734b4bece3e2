"""``lorasurg fuse``: an adapter merged into a checkpoint, laid out like it.

:mod:`.place` places the adapter's names (PEFT's, the model's namespace: towers, experts, ``target_parameters``) among
BASE's checkpoint keys; :mod:`.plan` checks the adapter against BASE and decides every tensor written (biases, modules_to_save, tied
weights) before anything is written; :mod:`.run` streams BASE through the shared checkpoint rewriter and states the
math; :mod:`.report` is what it returns.
"""

from .report import FusedModule, FuseReport
from .run import fuse

__all__ = ["fuse", "FuseReport", "FusedModule"]
