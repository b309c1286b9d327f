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


def short_repr(value: object, limit: int = 80) -> str:
    """A bounded ``repr`` for error messages about user data.

    ``reprlib`` stops after a few items and levels, so a YAML alias bomb or a huge list in a
    recipe or checkpoint costs nothing to describe (a plain ``repr`` once expanded one to 2.75 GB).
    """
    import reprlib

    shortener = reprlib.Repr()
    shortener.maxlevel = 3
    shortener.maxstring = shortener.maxother = shortener.maxlong = limit
    shortener.maxlist = shortener.maxtuple = shortener.maxdict = shortener.maxset = 6
    try:
        text = shortener.repr(value)
    except (ValueError, RecursionError):  # e.g. an int of more than 4300 digits
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
