"""Packed checkpoints: the kept weights of every N:M layer plus bit-packed in-group indices.

A packed file is a safetensors file whose ``nmrestore`` metadata holds a JSON header (format,
model, scale, the embedded recipe, N:M per layer and per route, routes, tasks, and a SHA-256 over
the tensors and the header). It restores the *masked* model (ranks, per-route N, any method state)
with every route's effective weights equal to the original's, so ``eval``/``infer`` behave
identically, and ``squash_`` of the restored model gives the dense-with-zeros weights of any route.

Encoding of a masked layer (chosen per layer, the smallest exact one that applies):

* ``ranked`` -- every route's mask is ``rank < N_r`` (uniform, one-shot, SR-STE, SLS,
  ClassPruning's nested routes). Let K = max_r N_r. Each group of M stores its K best weights *in
  rank order* with their in-group indices, ``ceil(log2 M)`` bits each. The order carries the
  ranks, so every route (rank < N_r for any N_r <= K) restores exactly at no extra cost: K values
  + K indices per group, whatever the number of routes. Packing each route on its own would cost
  ``sum_r N_r`` values; the largest route plus a uint8 rank per kept weight costs 8 more bits per
  kept weight. Positions no route keeps get weight 0 and ranks K..M-1 in index order (no route's
  mask depends on those).
* ``banded`` -- the same masks when the largest route keeps (nearly) the whole group, as in
  ClassPruning's 8/16/32 of 32: the dense values plus, per weight, the index of the first route
  keeping it (``ceil(log2(bands))`` bits), whichever of ranked/banded is smaller. Ranks come back
  band by band (index order inside a band), which is all any route's mask depends on.
* ``full`` -- every route keeps the whole group (N = M, e.g. a layer SLS left dense): the dense
  weight alone; ranks are rebuilt as 0..M-1 (no mask depends on them).
* ``union`` -- masks that are not rank prefixes (PNG's per-task bit fields): the values at the
  positions any route keeps, plus a 1-bit-per-weight bitmap of those positions; the mask's own
  state (ranks, task bits) is kept exactly in the small-integer section.
* ``dense`` -- a layer whose weight carries other parametrizations besides the N:M mask.

Every other tensor (biases, dense layers, ``route_n``, learned scores) is stored as it is, except
bool/uint8 tensors whose values fit in fewer than 8 bits, which are bit-packed. Weights dropped by
every route come back as +0.0, so the restored dense-with-zeros weights equal the original's in
value (a pruned negative weight squashes to -0.0 in the original; both are the same number in
every computation).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nmrestore.engine.checkpoint import (
    _atomic_save_tensors,
    load_model_state,
)
from nmrestore.engine.loading import PACKED_FORMAT, load_any, read_header, read_packed
from nmrestore.engine.packed_format import (
    PackedLayer,
    banded_cheaper,
    bitpack,
    mask_index,
    masks_per_route,
    packed_digest,
    prefix_sizes,
    rank_cuts,
    small_int_bits,
    state_keys,
    top_k_by_rank,
)
from nmrestore.errors import CheckpointError
from nmrestore.methods.png.tasks import select_task
from nmrestore.sparsity import nm
from nmrestore.sparsity.api import squash_
from nmrestore.sparsity.parametrization import nm_layers, set_route

META_KEY = "nmrestore"


#: Header keys owned by the packed format (everything else is the source checkpoint's metadata).
_OWN_KEYS = ("format", "sha256", "packed")


@dataclass
class PackedReport:
    """What :func:`save_packed` wrote and how it compares with the dense fp32 checkpoint.

    ``dense_bytes`` is the tensor bytes of the squashed model (what a dense fp32 checkpoint of it
    holds); ``theory_bytes`` is values + ``ceil(log2 M)``-bit indices for packed layers and dense
    bytes for everything else; ``file_bytes`` is the packed file on disk (header included).
    """

    path: Path
    file_bytes: int
    tensor_bytes: int
    dense_bytes: int
    theory_bytes: int
    routes: int
    layers: list[PackedLayer] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Packed file bytes / dense fp32 tensor bytes."""
        return self.file_bytes / self.dense_bytes if self.dense_bytes else 1.0

    @property
    def theory_ratio(self) -> float:
        return self.theory_bytes / self.dense_bytes if self.dense_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["path"] = str(self.path)
        payload["ratio"] = self.ratio
        payload["theory_ratio"] = self.theory_ratio
        return payload

    def summary(self) -> str:
        return (
            f"{self.path}: {self.file_bytes:,} bytes, {self.ratio:.1%} of the dense fp32 tensors "
            f"({self.dense_bytes:,} bytes; theory {self.theory_ratio:.1%}), "
            f"{len(self.layers)} N:M layer(s), {self.routes} route(s)"
        )


def _tensor_nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _tasks_of(model: nn.Module, meta: dict[str, Any]) -> Any:
    """Task names for the header: the source metadata's, else a model's ``tasks`` attribute."""
    if meta.get("tasks") is not None:
        return meta["tasks"]
    tasks = getattr(model, "tasks", None)
    if isinstance(tasks, list | tuple) and all(isinstance(t, str | int) for t in tasks):
        return list(tasks)
    return None


@torch.no_grad()
def save_packed(model: nn.Module, path: str | Path, meta: dict[str, Any] | None = None) -> PackedReport:
    """Write ``model`` (masked, any number of routes) as a packed checkpoint; atomic.

    ``meta`` is the source checkpoint's metadata (its ``recipe`` lets :func:`load_packed` rebuild
    the model without being handed one); optimizer state is never stored.
    """
    path = Path(path)
    meta = {k: v for k, v in (meta or {}).items() if k not in (*_OWN_KEYS, "optimizer")}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors: dict[str, Tensor] = {}
    handled: set[str] = set()
    mask_state: set[str] = set()  # keys of mask modules' own state (not part of the dense model)
    layers: list[PackedLayer] = []
    layer_meta: dict[str, dict[str, Any]] = {}
    theory = 0
    for name, module, mask in nm_layers(model):
        index = mask_index(module, mask)
        keys = state_keys(name, index)
        original_key, ranks_key, route_n_key = keys["original"], keys["ranks"], keys["route_n"]
        mask_state.update(k for k in state if k.startswith(keys["mask"]))
        if route_n_key in state and state[route_n_key].dtype == torch.int64:
            handled.add(route_n_key)  # N per route is in the header (restored from there)
        original = state[original_key]
        m, in_axis = mask.m, mask.in_axis
        route_n = tuple(int(v) for v in mask.route_n)
        dense_bytes = _tensor_nbytes(original)
        route_masks = masks_per_route(mask)
        sizes = prefix_sizes(mask, route_masks)
        entry: dict[str, Any] = {
            "shape": list(original.shape),
            "m": m,
            "in_axis": in_axis,
            "route_n": list(route_n),
            "mask": index,  # position of the N:M mask among the weight's parametrizations
            "dtype": str(original.dtype).removeprefix("torch."),
        }
        bits = nm.index_bits(m)
        if len(module.parametrizations.weight) != 1:
            encoding, kept, stored = "dense", m, dense_bytes
            theory += dense_bytes
        elif sizes is not None and min(sizes) == m:
            encoding, kept = "full", m
            tensors[f"values:{name}"] = original.contiguous()
            stored = dense_bytes
            theory += dense_bytes
            handled.update((original_key, ranks_key))
        elif sizes is not None and banded_cheaper(original, sizes, m):
            # every position is stored anyway: a band id per weight beats an index per weight
            encoding, kept = "banded", max(sizes)
            cuts = sorted(set(sizes))
            band = torch.bucketize(state[ranks_key].long(), torch.tensor(cuts), right=True)
            band_bits = max(1, (len(cuts) - (1 if kept == m else 0)).bit_length())
            values = torch.where(
                band < len(cuts), original, torch.zeros((), dtype=original.dtype)
            ).contiguous()
            tensors[f"values:{name}"] = values
            tensors[f"bands:{name}"] = bitpack(band, band_bits)
            entry["cuts"], entry["band_bits"] = cuts, band_bits
            stored = _tensor_nbytes(values) + tensors[f"bands:{name}"].numel()
            theory += stored
            handled.update((original_key, ranks_key))
        elif sizes is not None:
            encoding, kept = "ranked", max(sizes)
            order = top_k_by_rank(state[ranks_key], kept, m, in_axis)
            values = torch.gather(nm.to_groups(original, m, in_axis), -1, order).contiguous()
            tensors[f"values:{name}"] = values
            tensors[f"indices:{name}"] = bitpack(order, bits)
            stored = _tensor_nbytes(values) + tensors[f"indices:{name}"].numel()
            theory += nm.packed_nbytes(original.numel(), kept, m, original.element_size())
            handled.update((original_key, ranks_key))
        else:
            encoding = "union"
            union = torch.stack(route_masks).any(0)
            values = original[union].contiguous()
            tensors[f"values:{name}"] = values
            tensors[f"union:{name}"] = bitpack(union, 1)
            stored = _tensor_nbytes(values) + tensors[f"union:{name}"].numel()
            theory += stored
            kept = int(nm.to_groups(union, m, in_axis).sum(-1).max())
            handled.add(original_key)  # the mask's own state goes in the small-int section
            cuts = rank_cuts(state[ranks_key], route_n, m, in_axis)
            if cuts is not None:  # ranks that only order a few bands (PNG: kept first) cost a band id
                band_bits = max(1, len(cuts).bit_length())
                band = torch.bucketize(state[ranks_key].long(), torch.tensor(cuts), right=True)
                tensors[f"rankbands:{name}"] = bitpack(band, band_bits)
                entry["rank_cuts"], entry["rank_bits"] = cuts, band_bits
                handled.add(ranks_key)
        entry["encoding"] = encoding
        entry["kept"] = kept
        layer_meta[name] = entry
        layers.append(
            PackedLayer(name, encoding, tuple(original.shape), m, route_n, kept, in_axis, stored, dense_bytes)
        )

    dense_total = sum(_tensor_nbytes(v) for k, v in state.items() if k not in mask_state)
    small_keys = []
    for key, value in state.items():
        if key in handled:
            continue
        bits = small_int_bits(value)
        if bits is not None:
            tensors[f"small:{key}"] = bitpack(value, bits)
            small_keys.append([key, list(value.shape), str(value.dtype).removeprefix("torch."), bits])
        else:
            tensors[f"dense:{key}"] = value.contiguous()
        if key not in mask_state:
            theory += _tensor_nbytes(value)
    routes = max((len(layer.route_n) for layer in layers), default=1)
    header = {
        **meta,
        "format": PACKED_FORMAT,
        "packed": {
            "layers": layer_meta,
            "small": small_keys,
            "routes": routes,
            "tasks": _tasks_of(model, meta),
            "dense_bytes": dense_total,
            "theory_bytes": theory,
        },
    }
    header = json.loads(json.dumps(header, default=str))  # what a reader will parse
    header["sha256"] = packed_digest(tensors, header)
    _atomic_save_tensors(path, tensors, {META_KEY: json.dumps(header, sort_keys=True)})
    return PackedReport(
        path,
        path.stat().st_size,
        sum(_tensor_nbytes(t) for t in tensors.values()),
        dense_total,
        theory,
        routes,
        layers,
    )


def pack_checkpoint(checkpoint: str | Path, out: str | Path | None = None, allow_large: bool = False) -> PackedReport:
    """Pack a training checkpoint (any method, any number of routes; a packed one is re-packed).

    ``out`` defaults to ``<checkpoint stem>.packed.safetensors`` beside the checkpoint.
    """
    from nmrestore.engine.runner import model_from_checkpoint

    ckpt = load_any(checkpoint)
    model, _ = model_from_checkpoint(ckpt, allow_large=allow_large)
    assert ckpt.path is not None
    stem = ckpt.path.name.removesuffix(".safetensors").removesuffix(".packed")
    target = Path(out) if out is not None else ckpt.path.with_name(f"{stem}.packed.safetensors")
    if target.resolve() == ckpt.path.resolve():
        raise CheckpointError(f"refusing to overwrite the source checkpoint {ckpt.path} with its packed form")
    return save_packed(model, target, ckpt.meta)


def load_packed(
    path: str | Path,
    model: nn.Module | None = None,
    route: int | None = None,
    squash: bool = False,
    task: int | str | None = None,
) -> nn.Module:
    """Restore the model a packed file was written from.

    Without ``model`` the file's embedded recipe rebuilds it (as for a training checkpoint);
    with one, the state is loaded into it (it must have the same masked layers). The result is
    the masked model, every route restored; ``route`` (or ``task`` for a multi-task model) makes
    one active, and ``squash=True`` returns its dense-with-zeros form instead (the ONNX/TensorRT
    hand-off).
    """
    ckpt = read_packed(path)
    if model is None:
        if "recipe" not in ckpt.meta:
            raise CheckpointError(
                f"{path} has no embedded recipe; pass the model: load_packed(path, model=...)"
            )
        from nmrestore.engine.runner import model_from_checkpoint

        model, _ = model_from_checkpoint(ckpt)
    else:
        load_model_state(model, ckpt.model_state, str(path))
    if task is not None:
        select_task(model, task)
    if route is not None:
        set_route(model, route)
    if squash:
        squash_(model)
    return model


def packed_layers(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(layer, entry)`` of a packed file's header (N per route, M, encoding), without verifying."""
    header = read_header(Path(path))
    if header.get("format") != PACKED_FORMAT:
        raise CheckpointError(f"{path} is not a packed checkpoint")
    yield from header["packed"]["layers"].items()
