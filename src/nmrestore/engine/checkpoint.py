"""Checkpoints: one safetensors file (tensors + metadata) and a human-readable JSON sidecar.

The ``.safetensors`` file is the source of truth and is written atomically (temp file in the same
folder, fsync, ``os.replace``), so a kill at any moment leaves either the old or the new file.
Its metadata holds the sidecar's JSON and a SHA-256 of the tensor bytes, checked on load; the
``.json`` beside it repeats the metadata (recipe, step, metrics, sparsity state) for people and
tools. Nothing is ever unpickled: untrusted checkpoints cannot run code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from nmrestore.errors import CheckpointError
from nmrestore.io_atomic import as_os_error, atomic_path, atomic_write_bytes

FORMAT = "nmrestore-checkpoint/1"
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."
RNG_KEY = "rng.torch"


def _digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _atomic_save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    # safetensors replaces the temp through its own 0600 file; atomic_path fixes the mode afterwards
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:  # a full disk etc. arrives wrapped: make it an OSError again
            raise as_os_error(exc, path) from exc


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"{OPTIM_PREFIX}{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(OPTIM_PREFIX):
            index, name = key[len(OPTIM_PREFIX) :].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


@dataclass
class Checkpoint:
    """A loaded checkpoint: model tensors, optional optimizer state and the metadata."""

    model_state: dict[str, Tensor]
    meta: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None
    rng_state: Tensor | None = None
    path: Path | None = field(default=None)

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    @property
    def is_sparse(self) -> bool:
        return any(".parametrizations." in k for k in self.model_state)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    with_rng: bool = True,
) -> Path:
    """Write ``model`` (+ optimizer, RNG) and ``meta`` atomically; returns the safetensors path."""
    path = Path(path)
    tensors = {MODEL_PREFIX + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = dict(meta)
    if optimizer is not None:
        optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
        tensors.update(optim_tensors)
        meta["optimizer"] = optim_meta
    if with_rng:
        tensors[RNG_KEY] = torch.get_rng_state()
    meta["format"] = FORMAT
    meta["sha256"] = _digest(tensors)
    text = json.dumps(meta, sort_keys=True, default=str)
    _atomic_save_tensors(path, tensors, {"nmrestore": text})
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True, default=str).encode())
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint; :class:`CheckpointError` for missing, foreign or tampered files."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "best.safetensors" if (path / "checkpoints").is_dir() else path / "best.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({exc})") from exc
    if "nmrestore" not in header:
        raise CheckpointError(f"{path} is not an nmrestore checkpoint (no 'nmrestore' metadata)")
    try:
        meta = json.loads(header["nmrestore"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt metadata ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported format {meta.get('format')!r} (expected {FORMAT})")
    expected = meta.pop("sha256", None)
    if expected != _digest(tensors):
        raise CheckpointError(f"{path}: checksum mismatch, the file was modified or is damaged")
    model_state = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    optim_meta = meta.pop("optimizer", None)
    optimizer_state = _unflatten_optimizer(tensors, optim_meta) if optim_meta else None
    return Checkpoint(model_state, meta, optimizer_state, tensors.get(RNG_KEY), path)


def check_compatible(ckpt: Checkpoint, model_name: str, scale: int) -> None:
    """Refuse a checkpoint of another architecture or scale, naming both."""
    saved = ckpt.meta.get("model", {})
    if saved.get("name") != model_name or int(saved.get("scale", -1)) != scale:
        raise CheckpointError(
            f"{ckpt.path}: checkpoint is for model {saved.get('name')!r} x{saved.get('scale')}, "
            f"not {model_name!r} x{scale}"
        )


def load_model_state(model: nn.Module, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """``load_state_dict`` with a one-line error for missing/unexpected keys or shape mismatches."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {missing[0]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {unexpected[0]}")
        if mismatched:
            k = mismatched[0]
            parts.append(f"shape mismatch e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}")
        raise CheckpointError(f"{source} does not fit this model: " + "; ".join(parts))
    model.load_state_dict(state)
