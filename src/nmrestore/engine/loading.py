"""Loading any checkpoint nmrestore writes: a training checkpoint, a packed or a compiled file, as a model.

The one loader under every command that reads a model (eval, infer, export, speed) and the Python
API: :func:`load` (model and recipe), :func:`load_any` (the verified
:class:`~nmrestore.engine.checkpoint.Checkpoint`, dispatched on the file's header). Reading a packed
file lives here, below ``export/`` which writes them, so loading never needs the exporters.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from nmrestore.engine.checkpoint import FORMAT as CHECKPOINT_FORMAT
from nmrestore.engine.checkpoint import Checkpoint, check_metadata, load_checkpoint, parse_metadata
from nmrestore.engine.packed_format import (
    bitunpack,
    canonical_ranks,
    check_order,
    packed_digest,
    ranks_from_order,
    state_keys,
)
from nmrestore.engine.runner import model_from_checkpoint
from nmrestore.errors import CheckpointError
from nmrestore.recipes.schema import ModelSpec, Recipe, recipe_from_dict
from nmrestore.runtime.compiled import is_compiled, read_compiled
from nmrestore.sparsity import nm

__all__ = ["PACKED_FORMAT", "is_packed", "load", "load_any", "read_header", "read_packed"]

#: The packed file format (``nmrestore export --format packed``).
PACKED_FORMAT = "nmrestore-packed/1"


def read_header(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    return parse_metadata(path, metadata)


def is_packed(path: str | Path) -> bool:
    """True when ``path`` is a readable packed checkpoint (by its header; contents not verified)."""
    try:
        return read_header(Path(path)).get("format") == PACKED_FORMAT
    except CheckpointError:
        return False


def _restore_state(path: Path, header: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    packed = header["packed"]
    state: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if key.startswith("dense:"):
            state[key[len("dense:") :]] = value
    for key, shape, dtype, bits in packed.get("small", []):
        shape = [int(v) for v in shape]
        ints = bitunpack(tensors[f"small:{key}"], math.prod(shape), int(bits)).reshape(shape)
        state[key] = ints.bool() if dtype == "bool" else ints
    for name, entry in packed["layers"].items():
        keys = state_keys(name, int(entry["mask"]))
        if keys["route_n"] not in state:
            state[keys["route_n"]] = torch.tensor([int(n) for n in entry["route_n"]], dtype=torch.int64)
        encoding = entry["encoding"]
        shape = tuple(int(s) for s in entry["shape"])
        m, in_axis, kept = int(entry["m"]), int(entry["in_axis"]), int(entry["kept"])
        if encoding == "dense":
            continue
        if encoding == "full":
            original = tensors[f"values:{name}"]
            if tuple(original.shape) != shape:
                raise CheckpointError(
                    f"{path}: packed layer {name!r} has shape {tuple(original.shape)}, not {shape}"
                )
            state[keys["original"]] = original
            order = torch.arange(m).expand(
                *nm.to_groups(torch.empty(shape, dtype=torch.uint8), m, in_axis).shape
            )
            state[keys["ranks"]] = nm.from_groups(order.to(torch.uint8), shape, in_axis)
            continue
        if encoding == "union":
            union = bitunpack(tensors[f"union:{name}"], math.prod(shape), 1).reshape(shape).bool()
            values = tensors[f"values:{name}"]
            if values.dim() != 1 or values.numel() != int(union.sum()):
                raise CheckpointError(
                    f"{path}: packed layer {name!r} holds {values.numel()} values for {int(union.sum())} kept positions"
                )
            original = torch.zeros(shape, dtype=values.dtype)
            original[union] = values
            state[keys["original"]] = original
            if "rank_cuts" in entry:
                band = bitunpack(tensors[f"rankbands:{name}"], math.prod(shape), int(entry["rank_bits"]))
                state[keys["ranks"]] = canonical_ranks(band.reshape(shape), m, in_axis)
            continue
        if encoding == "banded":
            values = tensors[f"values:{name}"]
            if tuple(values.shape) != shape:
                raise CheckpointError(
                    f"{path}: packed layer {name!r} has shape {tuple(values.shape)}, not {shape}"
                )
            cuts = [int(c) for c in entry["cuts"]]
            band = bitunpack(tensors[f"bands:{name}"], values.numel(), int(entry["band_bits"])).reshape(
                shape
            )
            if int(band.max()) > len(cuts):
                raise CheckpointError(
                    f"{path}: packed layer {name!r} has a band id beyond its {len(cuts)} routes"
                )
            state[keys["original"]] = values
            # ranks: band by band, in-group index order inside a band (every route's mask is a band prefix)
            state[keys["ranks"]] = canonical_ranks(band, m, in_axis)
            continue
        if encoding != "ranked":
            raise CheckpointError(f"{path}: packed layer {name!r} has an unknown encoding {encoding!r}")
        groups_shape = nm.to_groups(torch.empty(shape, dtype=torch.uint8), m, in_axis).shape
        values = tensors[f"values:{name}"]
        if tuple(values.shape) != (*groups_shape[:-1], kept):
            raise CheckpointError(
                f"{path}: packed layer {name!r} holds values of shape {tuple(values.shape)}"
            )
        order = (
            bitunpack(tensors[f"indices:{name}"], values.numel(), nm.index_bits(m))
            .reshape(values.shape)
            .long()
        )
        check_order(order, m, name)
        dense_groups = torch.zeros(groups_shape, dtype=values.dtype)
        dense_groups.scatter_(-1, order, values)
        state[keys["original"]] = nm.from_groups(dense_groups, shape, in_axis)
        state[keys["ranks"]] = nm.from_groups(ranks_from_order(order, m).to(torch.uint8), shape, in_axis)
    return state


def read_packed(path: str | Path) -> Checkpoint:
    """Verify a packed file and rebuild the masked model's ``state_dict`` (no model built).

    Returns a :class:`~nmrestore.engine.checkpoint.Checkpoint` whose ``meta`` is the source
    checkpoint's (recipe, model, sparsity...) plus ``packed``, so every loader that takes a
    checkpoint takes a packed file too. :class:`CheckpointError` on a missing, foreign, tampered
    or damaged file.
    """
    path = Path(path)
    header = read_header(path)
    fmt = header.get("format")
    if fmt == CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is a training checkpoint, not a packed one; load it with load_checkpoint "
            "or pack it with `nmrestore export --format packed`"
        )
    if fmt != PACKED_FORMAT:
        raise CheckpointError(f"{path}: unsupported format {fmt!r} (expected {PACKED_FORMAT})")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    if header.get("sha256") != packed_digest(tensors, header):
        raise CheckpointError(f"{path}: checksum mismatch, the packed file was modified or is damaged")
    try:
        state = _restore_state(path, header, tensors)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise CheckpointError(f"{path}: corrupt packed checkpoint ({type(exc).__name__}: {exc})") from exc
    meta = {k: v for k, v in header.items() if k not in ("sha256", "format")}
    check_metadata(path, meta)
    return Checkpoint(state, meta, None, None, path)


def load_any(path: str | Path) -> Checkpoint:
    """A training or a packed checkpoint, dispatched on the file's header (run folders too)."""
    candidate = Path(path)
    if candidate.is_file() and is_packed(candidate):
        return read_packed(candidate)
    if candidate.is_file() and is_compiled(candidate):  # no masks or checkpoint inside: say what takes it
        raise CheckpointError(
            f"{candidate} is a compiled engine file: `nmrestore infer`, `nmrestore speed --checkpoint`, "
            "nmrestore.load and load_compiled take it; other commands need the checkpoint it was compiled from"
        )
    return load_checkpoint(candidate)


def _load_compiled(path: Path, allow_large: bool) -> tuple[nn.Module, Recipe]:
    """A compiled engine file: the engine, and the recipe it records (else one naming the model)."""
    file = read_compiled(path)
    build = file.build_spec
    spec = {"name": build.name, "scale": build.scale, "kwargs": build.kwargs}
    source = f"{path} (embedded recipe)"
    if file.meta.get("recipe") is not None:
        recipe = recipe_from_dict(file.meta["recipe"], source)
    else:
        recipe = Recipe(model=ModelSpec.model_validate(spec))
    if recipe.model.model_dump(mode="json") != ModelSpec.model_validate(spec).model_dump(mode="json"):
        raise CheckpointError(f"{path}: the embedded recipe's model differs from the one the file rebuilds")
    return file.build(allow_large=allow_large), recipe


def load(path: str | Path, allow_large: bool = False) -> tuple[nn.Module, Recipe]:
    """The model a checkpoint (training or packed, any method) was saved from, and its recipe.

    Everything read is verified first (digest over metadata and tensors, the embedded recipe, model
    keywords and size, finite weights, N:M ranks); ``allow_large`` lifts the size limit. A compiled
    engine file (``nmrestore compile``, :func:`~nmrestore.runtime.save_compiled`) gives its engine,
    ready to run, with tactic decisions as recorded.
    """
    candidate = Path(path)
    if candidate.is_file() and is_compiled(candidate):
        return _load_compiled(candidate, allow_large)
    return model_from_checkpoint(load_any(path), allow_large=allow_large)
