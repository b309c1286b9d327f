"""ClassPruning's training program and evaluation: the method-level code that builds on the engine.

:mod:`.stages` is what ``nmrestore train`` runs for ``method: classpruning`` (found through
``ClassPruningConfig.training_program``), :mod:`.tasks` the loss of each stage, :mod:`.evaluation`
the scoring through the patch pipeline (``eval``, ``infer --adaptive``, benchmark rows).
"""

from nmrestore.methods.classpruning.program.stages import has_progress, train_adaptive

__all__ = ["has_progress", "train_adaptive"]
