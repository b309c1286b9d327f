"""The runtimes a user would deploy a CPU model with, as peers for ``nmrestore speed --vs``.

Each peer runs the model's dense-with-zeros ONNX export (:func:`~nmrestore.export.onnx.export_onnx`,
written into a temporary folder that is removed afterwards) on the CPU with the same number of
threads as PyTorch and the sparse engine:

* ``onnxruntime``: ONNX Runtime f32, ``CPUExecutionProvider``, ``intra_op_num_threads = threads``.
* ``openvino``: two rows, OpenVINO with ``INFERENCE_PRECISION_HINT=f32`` and OpenVINO at its
  default precision (bf16 on CPUs with AVX512-BF16 or AMX); the precision each row used is read back
  from the compiled model. The model is reshaped to the timed input's static shape first, as a
  deployment at one resolution would.

A peer whose package is missing is skipped with a note when the peers were not named (``all``);
named explicitly, it is an :class:`~nmrestore.errors.NMRestoreError` (one line, exit 2).
"""

from __future__ import annotations

import contextlib
import importlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from nmrestore.errors import NMRestoreError
from nmrestore.export.onnx import INPUT_NAME, export_onnx
from nmrestore.runtime.speed import Peer, SpeedReport

#: Peer runtimes in table order, and the extra that installs each.
PEERS = ("onnxruntime", "openvino")
EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}
#: Packages every peer needs for the export, besides its own.
EXPORT_PACKAGES = ("onnx", "onnxscript")


def parse_peers(text: str | None) -> tuple[list[str], bool]:
    """``--vs`` to (peer names, named explicitly). ``all`` means every peer, missing ones skipped."""
    if text is None or not text.strip():
        return [], False
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if names == ["all"]:
        return list(PEERS), False
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise NMRestoreError(f"--vs: unknown runtime {unknown[0]!r}; choose from {', '.join(PEERS)} or all")
    return [name for name in PEERS if name in names], True


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def available_peers(names: Sequence[str], explicit: bool) -> tuple[list[str], list[str]]:
    """(peers to run, notes on the skipped ones). A missing peer named explicitly raises."""
    chosen: list[str] = []
    notes: list[str] = []
    for name in names:
        missing = [module for module in (name, *EXPORT_PACKAGES) if not _installed(module)]
        if not missing:
            chosen.append(name)
            continue
        hint = f"pip install 'nmrestore[{EXTRAS[name]}]'"
        what = f"{name} is not installed" if name in missing else f"{name} needs {', '.join(missing)}"
        if explicit:
            raise NMRestoreError(f"{what}; {hint}")
        notes.append(f"{name} skipped: {what} ({hint})")
    return chosen, notes


def _onnxruntime_peer(path: Path, threads: int) -> Peer:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])

    return Peer("onnxruntime", "f32", str(onnxruntime.__version__), run)


def _precision_name(value: object) -> str:
    """``bf16``/``f32``/... from OpenVINO's ``INFERENCE_PRECISION_HINT`` (an ``ov.Type``)."""
    name = getattr(value, "get_type_name", None)
    return str(name()) if callable(name) else str(value)


def _openvino_peers(path: Path, threads: int, shape: tuple[int, ...]) -> list[Peer]:
    import openvino

    core = openvino.Core()
    peers = []
    for label, hint in (("openvino f32", "f32"), ("openvino default", None)):
        model = core.read_model(str(path))
        model.reshape({INPUT_NAME: list(shape)})
        config: dict[str, object] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if hint is not None:
            config["INFERENCE_PRECISION_HINT"] = hint
        compiled = core.compile_model(model, "CPU", config)
        precision = _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        request = compiled.create_infer_request()

        def run(x: Tensor, _request: object = request) -> Tensor:
            _request.infer({0: np.ascontiguousarray(x.numpy())})  # type: ignore[attr-defined]
            return torch.from_numpy(_request.get_output_tensor(0).data.copy())  # type: ignore[attr-defined]

        peers.append(Peer(label, precision, str(openvino.__version__), run))
    return peers


@contextlib.contextmanager
def open_peers(
    model: nn.Module,
    names: Sequence[str],
    threads: int,
    input_shape: tuple[int, ...],
    route: int | None = None,
) -> Iterator[list[Peer]]:
    """The peers ``names`` for ``model`` (its ``route``), ready to run inputs of ``input_shape``.

    The ONNX file lives in a temporary folder for as long as the block runs and is removed after.
    """
    if not names:
        yield []
        return
    with tempfile.TemporaryDirectory(prefix="nmrestore-peers-") as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(model, path, route=route, check=False, in_channels=input_shape[1])
        peers: list[Peer] = []
        for name in names:
            try:
                if name == "onnxruntime":
                    peers.append(_onnxruntime_peer(path, threads))
                elif name == "openvino":
                    peers.extend(_openvino_peers(path, threads, input_shape))
            except Exception as exc:  # the runtimes raise their own types; one line names the peer
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise NMRestoreError(
                    f"{name} could not load the ONNX export ({type(exc).__name__}: {first})"
                ) from exc
        yield peers


def peer_rows(report: SpeedReport, model: str, nm: str) -> list[dict[str, object]]:
    """A benchmark table's rows for the peers of ``report``, with dense PyTorch first."""
    if not report.peers:
        return []
    rows: list[dict[str, object]] = [
        {
            "model": model,
            "N:M": nm,
            "runtime": "PyTorch (dense)",
            "precision": "f32",
            "ms": report.dense_ms,
            "vs PyTorch": 1.0,
            "sparse engine vs it": report.speedup,
            "max abs diff": "0",
        }
    ]
    for peer in report.peers:
        rows.append(
            {
                "model": model,
                "N:M": nm,
                "runtime": f"{peer.name} {peer.version.split('-')[0]}",
                "precision": peer.precision,
                "ms": peer.ms,
                "vs PyTorch": peer.speedup,
                "sparse engine vs it": peer.sparse_speedup,
                "max abs diff": f"{peer.max_abs_diff:.1e}",
            }
        )
    return rows
