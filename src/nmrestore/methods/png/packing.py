"""PNG's storage form (in memory): union values, per-task masks, task layers; restores every task bit-exactly.

This is the form :func:`~nmrestore.methods.png.storage.png_storage` measures bytes on; the file format
for any sparse checkpoint (PNG's included) is :mod:`nmrestore.export.packed`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from nmrestore.errors import SparsityError
from nmrestore.methods.png.tasks import owned_prefixes, owner_of, png_masks, png_task_names
from nmrestore.sparsity import nm

Category = str  # "shared_values" | "shared_masks" | "shared_dense" | "task:<name>"


@dataclass
class PNGPacked:
    """Everything needed to run every task: named tensors, each in one storage category."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    categories: dict[str, Category] = field(default_factory=dict)
    encodings: dict[str, str] = field(default_factory=dict)  # mask tensor -> "bitmap" | "index"
    tasks: tuple[str, ...] = ()
    ns: tuple[int, ...] = ()
    m: int = 0

    def add(self, name: str, tensor: Tensor, category: Category) -> None:
        """Store ``tensor`` (a CPU copy) under ``name`` in ``category``."""
        if name in self.tensors:
            raise SparsityError(f"packed tensor {name!r} added twice")
        self.tensors[name] = tensor.detach().cpu().contiguous()
        self.categories[name] = category

    def nbytes(self, category: Category | None = None) -> int:
        """Bytes of every tensor (of ``category`` when given)."""
        return sum(
            t.numel() * t.element_size()
            for name, t in self.tensors.items()
            if category is None or self.categories[name] == category
        )


def mask_nbytes(numel: int, n: int, m: int) -> int:
    """Bytes of one N:M mask over ``numel`` weights: a bitmap or packed indices, whichever is smaller."""
    bitmap = math.ceil(numel / 8)
    index = math.ceil(numel // m * n * nm.index_bits(m) / 8)
    return min(bitmap, index)


def _encode_mask(keep: Tensor, n: int, m: int, in_axis: int) -> tuple[Tensor, str]:
    numel = keep.numel()
    if mask_nbytes(numel, n, m) < math.ceil(numel / 8):
        ones = keep.float()
        packed = nm.pack(ones, nm.ranks_from_scores(ones, m, in_axis), n, m, in_axis)
        return packed.indices, "index"
    bits = np.packbits(keep.detach().cpu().numpy().reshape(-1).astype(np.uint8))
    return torch.from_numpy(bits.copy()), "bitmap"


def _decode_mask(data: Tensor, encoding: str, shape: tuple[int, ...], n: int, m: int, in_axis: int) -> Tensor:
    numel = math.prod(shape)
    if encoding == "bitmap":
        bits = np.unpackbits(data.numpy())[:numel].astype(bool)
        return torch.from_numpy(bits.copy()).reshape(shape)
    group_shape = nm.to_groups(torch.empty(shape), m, in_axis).shape[:-1]
    packed = nm.PackedNM(torch.ones(*group_shape, n), data, shape, n, m, in_axis)
    return nm.unpack(packed) != 0


def shared_task_ns(model: nn.Module) -> tuple[int, ...]:
    for _, _, mask in png_masks(model):
        if mask.shared:
            return tuple(int(v) for v in mask.route_n)
    raise SparsityError("the model has no shared PNG layer")


def pack_png(model: nn.Module) -> PNGPacked:
    """The deployable multi-task model: union values, per-task masks, dense parts, task layers.

    Shared masked layers store the values of positions any task keeps (fp32, row-major) and one
    mask per task; a task's own layers store their kept values and one mask; every other tensor
    (dense layers, biases) is stored as is, in the category of the task that owns it ("shared"
    when none does). A task not pruned yet counts as dense (its mask keeps every position).
    """
    masks = png_masks(model)
    if not masks:
        raise SparsityError("the model has no PNG masks (sparsify_ it with PNGConfig first)")
    tasks = png_task_names(model, masks[0][2].num_tasks)
    ns = shared_task_ns(model)
    m = masks[0][2].m
    packed = PNGPacked(tasks=tasks, ns=ns, m=m)
    prefixes = owned_prefixes(model, tasks)
    masked_ids: set[int] = set()
    for name, module, mask in masks:
        weight = module.parametrizations.weight.original.detach()
        masked_ids.add(id(module.parametrizations.weight.original))
        if mask.shared:
            packed.add(f"{name}.values", weight[mask.union_mask()], "shared_values")
            for t, task in enumerate(tasks):
                data, encoding = _encode_mask(mask.task_mask(t), ns[t], m, mask.in_axis)
                packed.add(f"{name}.mask.{task}", data, "shared_masks")
                packed.encodings[f"{name}.mask.{task}"] = encoding
        else:
            task = tasks[mask.owner]
            n = int(mask.route_n[0])
            keep = mask.task_mask(mask.owner)
            packed.add(f"{name}.values", weight[keep], f"task:{task}")
            data, encoding = _encode_mask(keep, n, m, mask.in_axis)
            packed.add(f"{name}.mask.{task}", data, f"task:{task}")
            packed.encodings[f"{name}.mask.{task}"] = encoding
    for pname, param in model.named_parameters():
        if id(param) in masked_ids:
            continue
        owner = owner_of(pname, prefixes)
        packed.add(pname, param, "shared_dense" if owner < 0 else f"task:{tasks[owner]}")
    return packed


@torch.no_grad()
def unpack_png_(model: nn.Module, packed: PNGPacked) -> nn.Module:
    """Load a :class:`PNGPacked` into a model of the same architecture carrying PNG masks."""
    masked_ids: set[int] = set()
    tasks = packed.tasks
    for name, module, mask in png_masks(model):
        original = module.parametrizations.weight.original
        masked_ids.add(id(original))
        shape = tuple(original.shape)
        bits = torch.zeros(shape, dtype=torch.uint8)
        if mask.shared:
            for t, task in enumerate(tasks):
                key = f"{name}.mask.{task}"
                keep = _decode_mask(
                    packed.tensors[key], packed.encodings[key], shape, packed.ns[t], packed.m, mask.in_axis
                )
                bits |= keep.to(torch.uint8) << t
            mask.route_n.copy_(torch.tensor(packed.ns))
        else:
            task = tasks[mask.owner]
            key = f"{name}.mask.{task}"
            n = packed.ns[mask.owner]
            keep = _decode_mask(packed.tensors[key], packed.encodings[key], shape, n, packed.m, mask.in_axis)
            bits = keep.to(torch.uint8) << mask.owner
            mask.route_n.fill_(n)
        mask.task_bits.copy_(bits.to(mask.task_bits.device))
        mask._mask_cache.clear()
        dense = torch.zeros(shape, dtype=original.dtype)
        dense[mask.union_mask().cpu()] = packed.tensors[f"{name}.values"].to(original.dtype)
        original.copy_(dense.to(original.device))
    for pname, param in model.named_parameters():
        if id(param) not in masked_ids:
            param.copy_(packed.tensors[pname].to(param.device))
    return model
