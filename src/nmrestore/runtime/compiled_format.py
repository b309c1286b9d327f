"""Checks on what a compiled engine file asks for, before any of it reaches the kernel.

The file's digest (:mod:`nmrestore.integrity`) detects damage and edits made without recomputing
it; it is not a signature. The CSR arrays go straight to C++ code that indexes the input with
them, so every index is bounded here (rows, input channels inside the row's conv group, kernel
positions, the (kh, channel, kw) order the kernel walks), and the metadata's shape is checked
field by field so a crafted file ends in :class:`~nmrestore.errors.CheckpointError`, never in a
``KeyError`` or an out-of-bounds read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nmrestore.errors import CheckpointError, short_repr
from nmrestore.runtime.layer_types import TACTICS
from nmrestore.runtime.packing import CSRWeight
from nmrestore.sparsity import nm

#: The format this module reads and writes; another ``nmrestore-compiled/*`` is refused by name.
COMPILED_FORMAT = "nmrestore-compiled/1"
#: The CSR arrays of one sparse layer, stored as ``"{field}:{layer}"``.
CSR_FIELDS = ("rowptr", "cin", "kpos", "values")
#: The metadata sections every compiled file has.
SECTIONS = ("model", "engine", "layers", "fused_residuals", "untouched", "decisions", "machine")
#: Longest input shape a decision may name (a batch of images is 4-D; Linear inputs a little more).
MAX_DECISION_DIMS = 8


def _fail(path: Path, message: str) -> CheckpointError:
    return CheckpointError(f"{path}: {message}")


def want(path: Path, value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    """``value`` if it is of ``kind`` (a bool is no int here), else :class:`CheckpointError`."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise _fail(path, f"{where} must be {'/'.join(k.__name__ for k in kinds)}, got {short_repr(value)}")
    if not isinstance(value, kinds):
        raise _fail(path, f"{where} must be {'/'.join(k.__name__ for k in kinds)}, got {short_repr(value)}")
    return value


def int_list(path: Path, value: Any, where: str, length: int | None = None, most: int = 8) -> list[int]:
    """A short list of non-negative ints (shapes, N:M, paddings)."""
    items = want(path, value, list, where)
    if (length is not None and len(items) != length) or len(items) > most:
        raise _fail(path, f"{where} has {len(items)} entries")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise _fail(path, f"{where} must hold non-negative integers, got {short_repr(items)}")
    return [int(v) for v in items]


def check_meta(path: Path, meta: dict[str, Any]) -> None:
    """Refuse metadata of the wrong shape (sections and their types) before anything reads it."""
    for section in SECTIONS:
        if section not in meta:
            raise _fail(path, f"no {section!r} section; not a complete compiled file")
    model = want(path, meta["model"], dict, "model")
    want(path, model.get("name"), str, "model.name")
    scale = want(path, model.get("scale"), int, "model.scale")
    if not 1 <= scale <= 8:
        raise _fail(path, f"model.scale must be between 1 and 8, got {scale}")
    want(path, model.get("kwargs"), dict, "model.kwargs")
    if meta.get("recipe") is not None:
        want(path, meta["recipe"], dict, "recipe")
    want(path, meta["engine"], dict, "engine")
    for name, entry in want(path, meta["layers"], dict, "layers").items():
        entry = want(path, entry, dict, f"layers[{name!r}]")
        if entry.get("kind") not in ("Conv2d", "Linear"):
            raise _fail(path, f"layer {name!r} has kind {short_repr(entry.get('kind'))}")
        shape = int_list(path, entry.get("shape"), f"layer {name!r} shape", most=4)
        if len(shape) != (4 if entry["kind"] == "Conv2d" else 2) or 0 in shape:
            raise _fail(path, f"layer {name!r} has shape {shape}")
        want(path, entry.get("groups"), int, f"layer {name!r} groups")
        if entry.get("nm") is not None:
            n, m = int_list(path, entry["nm"], f"layer {name!r} N:M", length=2)
            if not 1 <= n < m:
                raise _fail(path, f"layer {name!r} has N:M {n}:{m}")
        want(path, entry.get("why_dense"), str, f"layer {name!r} why_dense")
        want(path, entry.get("relu"), bool, f"layer {name!r} relu")
        want(path, entry.get("shuffle"), int, f"layer {name!r} shuffle")
        want(path, entry.get("bias"), bool, f"layer {name!r} bias")
        if entry.get("out_pad") is not None:
            int_list(path, entry["out_pad"], f"layer {name!r} out_pad", length=2)
    for name in want(path, meta["fused_residuals"], list, "fused_residuals"):
        want(path, name, str, "fused_residuals entry")
    for row in want(path, meta["untouched"], list, "untouched"):
        row = want(path, row, dict, "untouched entry")
        for key in ("layer", "kind", "reason"):
            want(path, row.get(key), str, f"untouched {key}")
    for row in want(path, meta["decisions"], list, "decisions"):
        check_decision(path, want(path, row, dict, "decision"))
    want(path, meta["machine"], dict, "machine")


def check_decision(path: Path, row: dict[str, Any]) -> None:
    for key in ("layer", "kind", "nm", "reason"):
        want(path, row.get(key), str, f"decision {key}")
    if row.get("choice") not in TACTICS:
        raise _fail(path, f"decision choice must be one of {', '.join(TACTICS)}, got {short_repr(row.get('choice'))}")
    want(path, row.get("route"), int, "decision route")
    threads = want(path, row.get("threads"), int, "decision threads")
    if threads < 1:
        raise _fail(path, f"decision threads must be at least 1, got {threads}")
    int_list(path, row.get("input_shape"), "decision input_shape", most=MAX_DECISION_DIMS)
    want(path, row.get("density"), (int, float), "decision density")
    for key in ("dense_ms", "sparse_ms"):
        if row.get(key) is not None:
            want(path, row[key], (int, float), f"decision {key}")


def csr_weight(
    path: Path, name: str, tensors: dict[str, Tensor], shape: tuple[int, ...], groups: int, n_m: tuple[int, int]
) -> CSRWeight:
    """The layer's CSR arrays from the file, every index bounded and the N:M pattern checked."""
    found = {}
    for field in CSR_FIELDS:
        key = f"{field}:{name}"
        if key not in tensors:
            raise _fail(path, f"sparse layer {name!r} has no {field!r} tensor")
        t = tensors[key]
        dtype = torch.float32 if field == "values" else torch.int32
        if t.dtype != dtype or t.dim() != 1:
            raise _fail(path, f"sparse layer {name!r}: {field} must be 1-D {dtype}, got {t.dtype} {tuple(t.shape)}")
        found[field] = t
    rowptr, cin, kpos, values = (found[f] for f in CSR_FIELDS)
    o, ig = shape[0], shape[1]
    kh, kw = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)
    nnz = values.numel()
    if groups < 1 or o % groups:
        raise _fail(path, f"sparse layer {name!r}: {o} output channels do not split into {groups} groups")
    if rowptr.numel() != o + 1 or cin.numel() != nnz or kpos.numel() != nnz:
        raise _fail(path, f"sparse layer {name!r}: CSR arrays of inconsistent lengths")
    ptr = rowptr.long()
    if int(ptr[0]) != 0 or int(ptr[-1]) != nnz or bool((ptr[1:] < ptr[:-1]).any()):
        raise _fail(path, f"sparse layer {name!r}: row pointers are not 0..nnz, non-decreasing")
    if not bool(torch.isfinite(values).all()):
        raise _fail(path, f"sparse layer {name!r} has non-finite weights")
    row = torch.repeat_interleave(torch.arange(o), ptr[1:] - ptr[:-1])
    first = (row // (o // groups)) * ig  # the row's conv group owns input channels first..first+ig-1
    local = cin.long() - first
    pos = kpos.long()
    if nnz and (bool(((local < 0) | (local >= ig)).any()) or bool(((pos < 0) | (pos >= kh * kw)).any())):
        raise _fail(path, f"sparse layer {name!r}: an input channel or kernel position is out of range")
    order = ((pos // kw) * ig + local) * kw + pos % kw  # the kernel's (kh, channel, kw) walk
    same_row = row[1:] == row[:-1]
    if bool((same_row & (order[1:] <= order[:-1])).any()):
        raise _fail(path, f"sparse layer {name!r}: entries of a row are not in strictly ascending order")
    kept = torch.zeros(o, ig, kh * kw, dtype=torch.bool)
    kept[row, local, pos] = True
    n, m = n_m
    if ig % m or _most_per_group(kept, m) > n:
        raise _fail(path, f"sparse layer {name!r} keeps more than {n} of {m} weights in a group")
    return CSRWeight(rowptr.contiguous(), cin.contiguous(), kpos.contiguous(), values.contiguous(), shape, groups)


def _most_per_group(kept: Tensor, m: int) -> int:
    """The largest number of kept entries in one group of M consecutive input channels."""
    return int(nm.to_groups(kept, m, 1).sum(-1).max()) if kept.numel() else 0


def dense_from_csr(csr: CSRWeight) -> Tensor:
    """The dense-with-zeros weight a CSR form was made from (the dense tactic runs on it)."""
    shape = csr.shape
    o, ig = shape[0], shape[1]
    kh, kw = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)
    ptr = csr.rowptr.long()
    row = torch.repeat_interleave(torch.arange(o), ptr[1:] - ptr[:-1])
    local = csr.cin.long() - (row // (o // csr.groups)) * ig
    dense = torch.zeros(o, ig, kh * kw, dtype=torch.float32)
    dense[row, local, csr.kpos.long()] = csr.values
    return dense.reshape(shape).contiguous()


def tensor_bytes(tensors: dict[str, Tensor]) -> int:
    return sum(math.prod(t.shape) * t.element_size() for t in tensors.values())
