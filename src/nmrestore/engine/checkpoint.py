"""Checkpoints: one safetensors file (tensors + metadata) and a human-readable JSON sidecar.

The ``.safetensors`` file is the source of truth and is written atomically (temp file in the same
folder, fsync, ``os.replace``), so a kill at any moment leaves either the old or the new file.
Its metadata holds the sidecar's JSON and a SHA-256 over the metadata *and* the tensor bytes
(:func:`integrity_digest`, the scheme packed files use too), checked on load; the ``.json``
beside it repeats the metadata (recipe, step, metrics, sparsity state) for people and tools and
is never read back. Nothing is ever unpickled: untrusted checkpoints cannot run code.

The digest detects damage and edits made without recomputing it; it is not a signature. What a
loaded file may ask for is therefore checked as well: the embedded recipe goes through the recipe
schema, the model's size is estimated before it is built, weights must be finite and N:M ranks
must be a permutation of 0..M-1 in every group (:func:`load_model_state`).

Format ``nmrestore-checkpoint/1`` (before the digest covered metadata) is refused with a message
saying how to re-save it: ``load_checkpoint(path, allow_legacy=True)`` still reads it, checking
the tensor digest only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from nmrestore.errors import CheckpointError, short_repr
from nmrestore.integrity import DIGEST_KEY, canonical_json, integrity_digest  # noqa: F401 (re-exported; shared with compiled files)
from nmrestore.integrity import tensor_digest as _digest
from nmrestore.io_atomic import as_os_error, atomic_path, atomic_write_bytes

FORMAT = "nmrestore-checkpoint/2"
#: Written before the digest covered the metadata: read only with ``allow_legacy=True``.
LEGACY_FORMAT = "nmrestore-checkpoint/1"
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."
RNG_KEY = "rng.torch"


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
    meta.pop(DIGEST_KEY, None)
    meta = json.loads(json.dumps(meta, default=str))  # exactly what a reader will parse and hash
    meta[DIGEST_KEY] = integrity_digest(tensors, meta)
    text = json.dumps(meta, sort_keys=True)
    _atomic_save_tensors(path, tensors, {"nmrestore": text})
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True, default=str).encode())
    return path


def parse_metadata(path: Path, header: dict[str, str]) -> dict[str, Any]:
    """The ``nmrestore`` JSON object of a safetensors header; :class:`CheckpointError` if absent or broken."""
    if "nmrestore" not in header:
        raise CheckpointError(f"{path} is not an nmrestore checkpoint (no 'nmrestore' metadata)")
    try:
        meta = json.loads(header["nmrestore"])
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise CheckpointError(f"{path}: corrupt metadata ({type(exc).__name__})") from exc
    if not isinstance(meta, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(meta), "a number")
        raise CheckpointError(f"{path}: corrupt metadata ({kind}, not a JSON object)")
    return meta


def check_metadata(path: Path, meta: dict[str, Any]) -> None:
    """Refuse metadata of the wrong shape before anything reads it (it was only hashed so far)."""
    step = meta.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: metadata 'step' must be a non-negative integer, got {short_repr(step)}")
    for key in ("model", "recipe", "optimizer", "train_state"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise CheckpointError(f"{path}: metadata {key!r} must be a JSON object, got {short_repr(meta[key])}")
    model = meta.get("model") or {}
    if "name" in model and not isinstance(model["name"], str):
        raise CheckpointError(f"{path}: metadata model.name must be a string, got {short_repr(model['name'])}")
    scale = model.get("scale", 1)
    if isinstance(scale, bool) or not isinstance(scale, int):
        raise CheckpointError(f"{path}: metadata model.scale must be an integer, got {short_repr(scale)}")


def load_checkpoint(path: str | Path, allow_legacy: bool = False) -> Checkpoint:
    """Read and verify a checkpoint; :class:`CheckpointError` for missing, foreign or tampered files.

    ``allow_legacy=True`` also reads format ``nmrestore-checkpoint/1``, whose digest covers the
    tensors only (its metadata is then trusted as it is): use it once, on a file you made, to
    re-save it (``model_from_checkpoint`` then ``save_checkpoint``).
    """
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
    meta = parse_metadata(path, header)
    fmt = meta.get("format")
    expected = meta.get(DIGEST_KEY)
    if fmt == LEGACY_FORMAT and allow_legacy:
        ok = expected == _digest(tensors)
    elif fmt == LEGACY_FORMAT:
        raise CheckpointError(
            f"{path} was written by an older nmrestore ({LEGACY_FORMAT}) whose checksum does not cover "
            "its metadata; if you trust it, re-save it: load_checkpoint(path, allow_legacy=True), "
            "model_from_checkpoint, save_checkpoint"
        )
    elif fmt != FORMAT:
        raise CheckpointError(f"{path}: unsupported format {short_repr(fmt)} (expected {FORMAT})")
    else:
        ok = isinstance(expected, str) and expected == integrity_digest(tensors, meta)
    if not ok:
        raise CheckpointError(f"{path}: checksum mismatch, the file was modified or is damaged")
    del meta[DIGEST_KEY]
    check_metadata(path, meta)
    model_state = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    optim_meta = meta.pop("optimizer", None)
    try:
        optimizer_state = _unflatten_optimizer(tensors, optim_meta) if optim_meta else None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: corrupt optimizer state ({type(exc).__name__})") from exc
    return Checkpoint(model_state, meta, optimizer_state, tensors.get(RNG_KEY), path)


def upgrade_legacy_checkpoints(folder: Path) -> list[Path]:
    """Re-save, in place, every format-/1 checkpoint under ``folder`` whose tensor digest verifies.

    For caches this tool wrote itself (the benchmark's dense and PNG runs), which would otherwise
    be retrained; never call it on files from elsewhere. Returns the files upgraded.
    """
    from safetensors import safe_open

    upgraded = []
    for path in sorted(Path(folder).rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = parse_metadata(path, f.metadata() or {})
            if meta.get("format") != LEGACY_FORMAT:
                continue
            tensors = load_file(str(path))
        except (CheckpointError, SafetensorError, OSError, ValueError, RuntimeError):
            continue  # not ours, or damaged: the normal loader will say so
        if meta.pop(DIGEST_KEY, None) != _digest(tensors):
            continue
        meta["format"] = FORMAT
        meta[DIGEST_KEY] = integrity_digest(tensors, meta)
        _atomic_save_tensors(path, tensors, {"nmrestore": json.dumps(meta, sort_keys=True)})
        upgraded.append(path)
    return upgraded


def check_compatible(ckpt: Checkpoint, model_name: str, scale: int | None) -> None:
    """Refuse a checkpoint of another architecture or scale (None: any scale), naming both."""
    saved = ckpt.meta.get("model", {})
    if saved.get("name") != model_name or (scale is not None and int(saved.get("scale", -1)) != scale):
        raise CheckpointError(
            f"{ckpt.path}: checkpoint is for model {saved.get('name')!r} x{saved.get('scale')}, "
            f"not {model_name!r} x{scale}"
        )


def _check_finite(state: dict[str, Tensor], source: str) -> None:
    """Refuse NaN/Inf weights: they would run and print ``nan`` figures or write black images."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: tensor {key} holds NaN or Inf values")


def _check_nm_state(model: nn.Module, source: str) -> None:
    """Every N:M layer's ranks are a permutation of 0..M-1 per group and each route's N is in 1..M.

    Anything else is a forged or damaged file: all-zero ranks keep every weight (a dense model
    reported as 2:4), ranks >= M index past the keep table.
    """
    from nmrestore.sparsity import nm
    from nmrestore.sparsity.parametrization import nm_layers

    for name, _, mask in nm_layers(model):
        if not nm.ranks_are_permutations(mask.ranks, mask.m, mask.in_axis):
            raise CheckpointError(
                f"{source}: layer {name}: N:M ranks are not a permutation of 0..{mask.m - 1} in every group"
            )
        route_n = mask.route_n
        if route_n.numel() == 0 or bool(((route_n < 1) | (route_n > mask.m)).any()):
            raise CheckpointError(
                f"{source}: layer {name}: N per route must be in 1..M={mask.m}, got {short_repr(route_n.tolist())}"
            )


def load_model_state(model: nn.Module, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """``load_state_dict`` with a one-line error for missing/unexpected keys or shape mismatches.

    The state is checked as untrusted input: finite values before loading, and valid N:M ranks
    and N after (the model is left half-loaded on an error; callers discard it).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {missing[0]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {short_repr(unexpected[0])}")
        if mismatched:
            k = mismatched[0]
            parts.append(f"shape mismatch e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}")
        raise CheckpointError(f"{source} does not fit this model: " + "; ".join(parts))
    _check_finite(state, source)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # e.g. a complex tensor where a float one belongs
        raise CheckpointError(f"{source} does not fit this model ({str(exc)[:200]})") from exc
    _check_nm_state(model, source)
