"""Deployment: packed checkpoints, ONNX export and the 2:4 semi-structured GPU path.

* :func:`save_packed` / :func:`pack_checkpoint` / :func:`load_packed`: kept values plus
  bit-packed in-group indices, every route restorable, bytes reported against the dense model.
* :func:`export_onnx`: one route or task as a plain ONNX graph (dense-with-zeros weights, dynamic
  batch/height/width), checked in onnxruntime; TensorRT builds a sparse engine from it.
* :func:`to_semi_structured_`: 2:4 1x1 convs and linears on PyTorch's semi-structured sparse
  tensors (CUDA, fp16/bf16).
"""

from pathlib import Path

from nmrestore.engine.loading import PACKED_FORMAT, is_packed, load_any, read_packed
from nmrestore.errors import NMRestoreError
from nmrestore.export.onnx import (
    DEFAULT_OPSET,
    OnnxReport,
    check_opset,
    deployable_copy,
    export_onnx,
    verify_onnx,
)
from nmrestore.export.packed import (
    PackedLayer,
    PackedReport,
    load_packed,
    pack_checkpoint,
    save_packed,
)
from nmrestore.export.semistructured import SemiStructuredReport, to_semi_structured_

FORMATS = ("packed", "onnx")


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path | None = None,
    route: int | None = None,
    task: str | None = None,
    opset: int = DEFAULT_OPSET,
    allow_large: bool = False,
) -> PackedReport | OnnxReport:
    """What ``nmrestore export`` does: a training (or packed) checkpoint to a packed file or ONNX.

    The output goes beside the checkpoint by default (``<stem>.packed.safetensors``,
    ``<stem>.onnx``, ``<stem>.route<k>.onnx``, ``<stem>.<task>.onnx``).
    """
    from nmrestore.engine.runner import model_from_checkpoint

    kind = fmt.lower()
    if kind not in FORMATS:
        raise NMRestoreError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if kind == "packed":
        if route is not None or task is not None:
            raise NMRestoreError(
                "--route and --task apply to --format onnx; a packed file keeps every route and task"
            )
        return pack_checkpoint(checkpoint, out, allow_large=allow_large)
    check_opset(opset)  # before loading anything: a bad opset is a one-line refusal
    ckpt = load_any(checkpoint)
    model, _ = model_from_checkpoint(ckpt, allow_large=allow_large)
    if out is None:
        assert ckpt.path is not None
        stem = ckpt.path.name.removesuffix(".safetensors").removesuffix(".packed")
        suffix = f".{task}" if task is not None else f".route{route}" if route is not None else ""
        out = ckpt.path.with_name(f"{stem}{suffix}.onnx")
    return export_onnx(model, out, route=route, task=task, opset=opset)


__all__ = [
    "FORMATS",
    "PACKED_FORMAT",
    "OnnxReport",
    "PackedLayer",
    "PackedReport",
    "SemiStructuredReport",
    "deployable_copy",
    "export_checkpoint",
    "export_onnx",
    "is_packed",
    "load_any",
    "load_packed",
    "pack_checkpoint",
    "read_packed",
    "save_packed",
    "to_semi_structured_",
    "verify_onnx",
]
