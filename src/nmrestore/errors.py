"""The project's own error types.

Every failure a user can cause (a bad image, a bad recipe, a checkpoint of another model, a
budget that cannot be met) raises one of these, so the CLI can answer with one line and exit
code 2 instead of a traceback, and library users can catch ``NMRestoreError``.
"""

from __future__ import annotations


class NMRestoreError(Exception):
    """Base class of every error nmrestore raises on purpose."""


class ImageError(NMRestoreError):
    """An image file cannot be read or used (unreadable, truncated, unsupported mode, too large)."""


class DatasetError(NMRestoreError):
    """A dataset folder is empty, mis-laid, or its LR/HR pairs do not match."""


class RecipeError(NMRestoreError):
    """A recipe has an unknown key, a wrong type or an impossible value."""


class CheckpointError(NMRestoreError):
    """A checkpoint is missing, tampered with, or belongs to another model or scale."""


class SparsityError(NMRestoreError):
    """An N:M request cannot be applied (M divides no layer, N outside 1..M, broken pattern)."""


class BudgetError(NMRestoreError):
    """A compute budget cannot be met (e.g. below 1:M on every prunable layer)."""


class TrainingError(NMRestoreError):
    """Training cannot go on (NaN/Inf loss); the last good checkpoint is kept."""
