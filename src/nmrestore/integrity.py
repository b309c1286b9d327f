"""The one integrity digest of every file nmrestore writes with tensors and metadata.

Training checkpoints, packed files and compiled engine files store a SHA-256 over their tensors
(names, dtypes, shapes, bytes) *and* their metadata (canonical JSON without the digest field), so
editing a recipe, a layer table or a tactic decision breaks it just as flipping a weight bit does.
It lives here, below every layer, because ``runtime/`` (compiled files) may not import ``engine/``
(checkpoints); :mod:`nmrestore.engine.checkpoint` re-exports it.

The digest detects damage and edits made without recomputing it; it is not a signature, so readers
still validate what a verified file asks for.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import Tensor

#: The metadata field holding :func:`integrity_digest` (excluded from what it covers).
DIGEST_KEY = "sha256"


def tensor_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 of the tensors alone (names, dtypes, shapes, bytes): half of :func:`integrity_digest`."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def canonical_json(meta: dict[str, Any]) -> str:
    """The metadata as the digest sees it: sorted keys, the digest field left out."""
    return json.dumps({k: v for k, v in meta.items() if k != DIGEST_KEY}, sort_keys=True)


def integrity_digest(tensors: dict[str, Tensor], meta: dict[str, Any]) -> str:
    """SHA-256 over the tensors and the metadata (canonical JSON without the digest field)."""
    h = hashlib.sha256(tensor_digest(tensors).encode())
    h.update(canonical_json(meta).encode())
    return h.hexdigest()
