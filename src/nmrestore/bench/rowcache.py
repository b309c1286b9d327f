"""Finished fine-tune rows kept in a JSON file, so a study spread over days never retrains one.

A row is keyed by its method, budget and a hash of its fine-tune recipe in which the dense checkpoint
is named by its own digest (not by the cache folder it happens to be in): the same recipe from the
same dense model is the same row.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from nmrestore.bench.config import _VOLATILE_TRAIN_KEYS, CACHE_VERSION
from nmrestore.errors import NMRestoreError
from nmrestore.io_atomic import atomic_write_text
from nmrestore.recipes.schema import Recipe

__all__ = ["load_row_cache", "row_digest", "store_rows"]

Row = dict[str, Any]


def row_digest(recipe: Recipe, dense_digest: str) -> str:
    """A fine-tune's identity: its recipe with volatile keys dropped and ``init_from`` = the dense digest."""
    data = recipe.model_dump(mode="json")
    data.pop("name", None)
    data["train"]["init_from"] = dense_digest
    for key in _VOLATILE_TRAIN_KEYS:
        data["train"].pop(key, None)
    text = json.dumps({"version": CACHE_VERSION, "recipe": data}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_row_cache(path: Path | None) -> dict[str, Row]:
    """The cached rows by key ({} without a file); a file that is not a cache is refused."""
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {str(k): dict(v) for k, v in data["rows"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NMRestoreError(f"{path}: not a benchmark row cache ({type(exc).__name__}: {exc})") from None


def store_rows(path: Path | None, rows: list[Row]) -> None:
    """Add the rows that carry a ``cache_key`` to the cache at ``path`` (written atomically)."""
    fresh = {r["cache_key"]: r for r in rows if r.get("cache_key")}
    if path is None or not fresh:
        return
    cache = load_row_cache(path)
    cache.update({k: {key: v for key, v in r.items() if key != "cache_key"} for k, r in fresh.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"rows": cache}, indent=1, default=str))
