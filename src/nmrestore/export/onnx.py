"""ONNX export of one route (or task) of any model, with dense-with-zeros weights.

The exported graph is the plain network: masks are baked into the weights (``squash_`` on a copy;
the caller's model is untouched), so any ONNX runtime runs it and TensorRT can find the N:M
pattern in the weights (``trtexec --sparsity=enable``; see ``export/README.md``). Batch, height
and width are dynamic axes. The exporter is PyTorch's default one in 2.x (``dynamo=True``,
``torch.export`` + onnxscript), which supports opset 18; :func:`verify_onnx` runs the file in
onnxruntime on CPU and returns the largest difference to PyTorch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from nmrestore.errors import NMRestoreError
from nmrestore.io_atomic import atomic_path
from nmrestore.methods.png.tasks import select_task
from nmrestore.onnx_quiet import quiet_exporter
from nmrestore.sparsity.api import nm_patterns, squash_
from nmrestore.sparsity.parametrization import nm_layers, set_route

DEFAULT_OPSET = 18
MIN_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"
#: Example input (height, width) for tracing: small, not square, not 0/1 (export specialises those).
TRACE_SIZE = (24, 20)
#: A different size for the check, so it exercises the dynamic axes.
CHECK_SIZE = (17, 23)


@dataclass(frozen=True)
class OnnxReport:
    """What :func:`export_onnx` wrote; ``max_abs_diff`` is None when the check did not run."""

    path: Path
    opset: int
    route: int | None
    task: int | str | None
    patterns: dict[str, tuple[int, int]]
    max_abs_diff: float | None
    file_bytes: int

    def summary(self) -> str:
        where = f"route {self.route}" if self.route is not None else "active route"
        if self.task is not None:
            where += f", task {self.task}"
        check = (
            f"max |onnxruntime - torch| = {self.max_abs_diff:.3g}"
            if self.max_abs_diff is not None
            else "not checked (onnxruntime is not installed)"
        )
        return (
            f"{self.path}: ONNX opset {self.opset}, {where}, {len(self.patterns)} N:M layer(s) as "
            f"dense-with-zeros weights, {self.file_bytes:,} bytes; {check}"
        )


def _num_routes(model: nn.Module) -> int:
    return max((mask.num_routes for _, _, mask in nm_layers(model)), default=1)


def _own_classes(model: nn.Module) -> None:
    """Give every parametrized module of a deep copy its own class.

    ``copy.deepcopy`` of a parametrized module shares the class PyTorch created for it, and
    ``remove_parametrizations`` (``squash_``) deletes the weight property from that class -- which
    would break the original model. A private class per module keeps the copy independent.
    """
    for module in model.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, body)


def deployable_copy(
    model: nn.Module, route: int | None = None, task: int | str | None = None
) -> tuple[nn.Module, dict[str, tuple[int, int]]]:
    """A squashed, eval-mode, fp32 CPU copy of ``model`` for one route/task (``model`` untouched).

    Also returns ``{layer: (N, M)}`` of that route, to check the copy's weights with ``check_nm``.
    """
    if route is not None and not 0 <= route < _num_routes(model):
        raise NMRestoreError(f"route {route} does not exist: the model has {_num_routes(model)} route(s)")
    clone = copy.deepcopy(model)
    _own_classes(clone)
    clone = clone.cpu().float().eval()
    select_task(clone, task)
    if route is not None:
        set_route(clone, route)
    patterns = nm_patterns(clone)
    squash_(clone)
    return clone, patterns


def _input_channels(model: nn.Module) -> int:
    declared = getattr(model, "in_channels", None)
    if isinstance(declared, int):
        return declared
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise NMRestoreError(f"cannot tell the input channels of {type(model).__name__}; pass in_channels=")


def _export(model: nn.Module, example: Tensor, path: Path, opset: int) -> None:
    dims = torch.export.Dim
    named = {
        0: dims("batch", min=1, max=4096),
        2: dims("height", min=1, max=16384),
        3: dims("width", min=1, max=16384),
    }
    auto = {0: dims.AUTO, 2: dims.AUTO, 3: dims.AUTO}
    errors = []
    # Named axes read best in the ONNX file; models that constrain H/W (e.g. a U-Net needing a
    # multiple of 8) are retried with axes whose constraints torch.export infers.
    for dynamic in (named, auto):
        try:
            with quiet_exporter():
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    dynamo=True,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes=(dynamic,),
                    external_data=False,
                    verbose=False,
                )
            return
        except Exception as exc:  # the exporter raises many types; report the first
            os_error = _os_error_in(exc)
            if os_error is not None:  # disk full, read-only folder...: retrying cannot help
                raise os_error from exc
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise NMRestoreError(f"ONNX export of {type(model).__name__} failed ({errors[0]})")


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind an exporter exception (it wraps them), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def supported_opsets() -> tuple[int, int]:
    """(lowest, highest) opset this installation can export: ours, up to what ``onnx`` knows."""
    try:
        import onnx
    except ImportError as exc:
        raise NMRestoreError("ONNX export needs the onnx package (pip install onnx onnxscript)") from exc
    return MIN_OPSET, int(onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> None:
    """Refuse an opset outside :func:`supported_opsets` before any work (no converter traceback)."""
    low, high = supported_opsets()
    if opset < low:
        raise NMRestoreError(f"opset {opset} is too old; use {low} to {high} (default {DEFAULT_OPSET})")
    if opset > high:
        raise NMRestoreError(
            f"opset {opset} is newer than the installed onnx supports; use {low} to {high} (default {DEFAULT_OPSET})"
        )


def _written_opset(path: Path) -> int | None:
    """The default-domain opset recorded in an ONNX file (what a runtime will see)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return int(versions[0]) if versions else None


def export_onnx(
    model: nn.Module,
    path: str | Path,
    route: int | None = None,
    task: int | str | None = None,
    opset: int = DEFAULT_OPSET,
    in_channels: int | None = None,
    check: bool = True,
) -> OnnxReport:
    """Export one route/task of ``model`` to ONNX with dense-with-zeros weights.

    Dynamic batch/height/width axes; input ``input`` (N, C, H, W) in [0, 1], output ``output``.
    With ``check`` (and onnxruntime installed) the file is run on CPU at another input size and
    the largest absolute difference to PyTorch is reported.
    """
    check_opset(opset)
    path = Path(path)
    if path.is_dir():
        raise NMRestoreError(f"{path} is a folder; give the ONNX file name (e.g. {path / 'model.onnx'})")
    deployable, patterns = deployable_copy(model, route, task)
    channels = in_channels or _input_channels(deployable)
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, channels, *TRACE_SIZE, generator=generator)
    diff = None
    try:
        # Export and check the temp file; only a complete, checked model replaces ``path``, so a
        # kill or a full disk leaves the previous file as it was (and no 0-byte model.onnx).
        with atomic_path(path) as tmp:
            _export(deployable, example, tmp, opset)
            written = _written_opset(tmp)
            if written != opset:
                raise NMRestoreError(f"the exporter wrote opset {written}, not the requested {opset}")
            if check:
                try:
                    probe = torch.rand(1, channels, *CHECK_SIZE, generator=generator)
                    diff = verify_onnx(tmp, deployable, probe)
                except ModuleNotFoundError:
                    diff = None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise NMRestoreError(f"{path}: cannot write the ONNX file ({reason}); nothing was written") from exc
    return OnnxReport(path, opset, route, task, patterns, diff, path.stat().st_size)


@torch.no_grad()
def verify_onnx(path: str | Path, model: nn.Module, inputs: Tensor) -> float:
    """Largest |onnxruntime(inputs) - model(inputs)| on CPU (``model`` as exported: squashed, eval).

    Raises ``ModuleNotFoundError`` when onnxruntime is not installed.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = torch.from_numpy(session.run(None, {name: inputs.numpy()})[0])
    expected = model.eval()(inputs)
    if got.shape != expected.shape:
        raise NMRestoreError(
            f"ONNX output shape {tuple(got.shape)} differs from PyTorch's {tuple(expected.shape)}"
        )
    return float((got - expected).abs().max())
