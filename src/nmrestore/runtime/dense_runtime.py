"""A dense fallback for the whole model that is the fastest dense runtime itself: OpenVINO.

Why: where N:M does not pay on this CPU, the engine's own dense fallback (PyTorch's convs, layer by
layer) is slower than a deployment runtime running the whole dense model. On EDSR-baseline x2 at 2:4
(320x180, 2 threads, docs/BENCHMARKS.md section `speed`) the f32 engine ran 0.75x OpenVINO f32 and
the bf16 engine 0.52x OpenVINO's default precision, which runs dense convs on AMX; no kernel that
keeps per-channel N:M masks can catch up there, since it would have to beat the vector units'
ceiling (section `speed_targets`). Per layer the runtimes lose (each call converts layouts, section
`speed_layers`), so the fallback is for the whole model or nothing.

With ``EngineConfig(dense_runtime="openvino")``, after the first forward of an input shape (and its
whole-model plans) the engine hands its dense-with-zeros reference to OpenVINO once (as a
static-shape ONNX export in a temporary file), at f32 for an f32 engine and at OpenVINO's default
precision for a 16-bit engine, compiles it ``COMPILES`` times, checks each output against its own
(``TOLERANCE``), times them and itself interleaved (:mod:`nmrestore.runtime.timing`) and, when the
fastest compile beats it, runs that shape there from then on. Every decision is kept with its timings (:class:`DenseRuntimeChoice`) and shown by
``nmrestore speed``. The choice is made per process: a compiled file records the engine's own
tactics, not OpenVINO's compiled model.

Caution, seen in the test suite and not isolated further: once OpenVINO had compiled and run a model in
the process (from a traced module or from an ONNX export alike), a later autograd ``backward()`` in the
same process crashed with a segmentation fault. Inference is what this fallback is for; the tests run
OpenVINO in a child process.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from nmrestore.errors import NMRestoreError
from nmrestore.onnx_quiet import quiet_exporter
from nmrestore.runtime.timing import interleaved
from nmrestore.sparsity.api import squash_

if TYPE_CHECKING:
    from nmrestore.runtime.engine import EngineState

log = logging.getLogger("nmrestore.runtime")

RUNTIMES = ("openvino",)
#: Largest |runtime - engine| accepted, by the engine's precision (the engine's own output is the
#: reference: an f32 engine matches PyTorch f32 to ~1e-7, OpenVINO f32 too; OpenVINO's bf16 rounds
#: activations like the bf16 engine, 4.5e-3 on EDSR-baseline x2 at 2:4 against PyTorch f32).
TOLERANCE = {"f32": 1e-3, "bf16": 2e-2}

Key = tuple[tuple[int, ...], int]


@dataclass(frozen=True)
class DenseRuntimeChoice:
    """One input shape's decision: the runtime tried, both times, the output check, kept or not and why."""

    input_shape: tuple[int, ...]
    threads: int
    runtime: str
    precision: str
    engine_ms: float
    runtime_ms: float
    speedup: float  # median over rounds of t_engine / t_runtime
    max_abs_diff: float
    kept: bool
    reason: str
    compile_ms: tuple[float, ...] = ()  # every compile's median; runtime_ms is the fastest, the one kept

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        shape = "x".join(str(s) for s in self.input_shape)
        verdict = "runs the whole model" if self.kept else "not used"
        compiles = (
            f" (fastest of {len(self.compile_ms)} compiles: {', '.join(f'{t:.2f}' for t in self.compile_ms)} ms)"
            if len(self.compile_ms) > 1
            else ""
        )
        return (
            f"dense runtime for {shape}: {self.runtime} ({self.precision}) {self.runtime_ms:.2f} ms{compiles} against "
            f"the engine's {self.engine_ms:.2f} ms ({self.speedup:.2f}x), max |diff| {self.max_abs_diff:.1e}: "
            f"{verdict} ({self.reason})"
        )


def check_available(name: str) -> None:
    """Raise a one-line error when the dense runtime ``name`` cannot be used here."""
    if name not in RUNTIMES:
        raise NMRestoreError(f"dense_runtime: unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}")
    try:
        import onnx  # noqa: F401  # the model reaches OpenVINO as an ONNX export
        import onnxscript  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as exc:
        raise NMRestoreError(
            f"dense_runtime='openvino' needs OpenVINO and the ONNX exporter ({exc.name} is missing): "
            "pip install 'nmrestore[openvino]'"
        ) from exc


#: OpenVINO compiles this many times per shape; the fastest is kept. One compile of the same model in one
#: process can run several percent slower than another for as long as it lives (EDSR-baseline x2 at 2:4,
#: six compiles timed interleaved: up to 6% apart, the order held over four phases of nine rounds; in a
#: benchmark run two compiles of the peer timed 74.4 and 67.1 ms): the engine times them instead of
#: taking the first.
COMPILES = 3


def openvino_runners(
    reference: nn.Module, x: Tensor, threads: int, f32: bool, count: int = COMPILES
) -> tuple[list[Callable[[Tensor], Tensor]], str]:
    """``reference`` exported to ONNX (a temporary file, removed after) and compiled by OpenVINO
    ``count`` times for ``x``'s shape; (one run per compile, precision they use).

    Not ``openvino.convert_model(reference)``: that traces the module in this process through
    OpenVINO's PyTorch frontend, and a later ``backward()`` in the same process then crashed (a
    segmentation fault in the test suite's autograd test)."""
    import openvino

    core = openvino.Core()
    with tempfile.TemporaryDirectory(prefix="nmrestore-dense-runtime-") as folder:
        path = Path(folder) / "model.onnx"
        with quiet_exporter(), contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(reference, (x,), str(path), dynamo=True, opset_version=18, external_data=False,
                              verbose=False)  # fmt: skip
        converted = core.read_model(str(path))
    converted.reshape({converted.inputs[0].get_any_name(): list(x.shape)})
    config: dict[str, object] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if f32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    runs, precision = [], ""
    for _ in range(count):
        compiled = core.compile_model(converted, "CPU", config)
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        name = getattr(hint, "get_type_name", None)
        precision = str(name()) if callable(name) else str(hint)
        runs.append(_run(compiled, tuple(compiled.outputs[0].get_partial_shape().to_shape())))
    return runs, precision


def _run(compiled: Any, out_shape: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
    """One infer request of ``compiled`` as a function of a tensor; OpenVINO reads the input in place and
    writes each output straight into a new tensor (no copy of its own output buffer)."""
    import openvino

    request = compiled.create_infer_request()

    def run(inp: Tensor) -> Tensor:
        out = torch.empty(out_shape)
        request.set_output_tensor(0, openvino.Tensor(out.numpy(), shared_memory=True))
        request.infer({0: np.ascontiguousarray(inp.detach().float().numpy())}, share_inputs=True)
        return out

    return run


@dataclass
class DenseRuntimes:
    """A compiled model's whole-model dense fallback: per (input shape, threads), the runner it kept."""

    name: str
    reference: nn.Module  # the dense-with-zeros model the runtime converts
    bf16: bool  # the engine may run bf16: the runtime runs at its default precision
    runners: dict[Key, Callable[[Tensor], Tensor]] = field(default_factory=dict)
    choices: list[DenseRuntimeChoice] = field(default_factory=list)
    considered: set[Key] = field(default_factory=set)

    @classmethod
    def for_model(cls, name: str, model: nn.Module, bf16: bool) -> DenseRuntimes:
        check_available(name)
        reference = squash_(copy.deepcopy(model)).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        return cls(name, reference, bf16)

    @staticmethod
    def key(x: Tensor) -> Key:
        return tuple(x.shape), torch.get_num_threads()

    def runner(self, x: Tensor) -> Callable[[Tensor], Tensor] | None:
        return self.runners.get(self.key(x))

    @torch.no_grad()
    def consider(self, engine_run: Callable[[], Tensor], x: Tensor, repeats: int) -> DenseRuntimeChoice | None:
        """Try the runtime on ``x`` against ``engine_run`` (the engine's own forward on ``x``), once per key."""
        key = self.key(x)
        if key in self.considered:
            return None
        self.considered.add(key)
        threads = key[1]
        label = f"{self.name} {'default' if self.bf16 else 'f32'}"
        try:
            runs, precision = openvino_runners(self.reference, x, threads, f32=not self.bf16)
            ours, outputs = engine_run(), [run(x) for run in runs]
        except Exception as exc:  # the runtime raises its own types; the engine keeps running itself
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("%s could not run the model (%s); the engine runs it", label, first)
            choice = DenseRuntimeChoice(tuple(x.shape), threads, label, "-", float("nan"), float("nan"),
                                        float("nan"), float("inf"), False, f"failed: {first}")  # fmt: skip
            self.choices.append(choice)
            return choice
        diff = max(_max_abs_diff(theirs, ours) for theirs in outputs)
        names = [f"runtime {i + 1}" for i in range(len(runs))]
        contenders = {"engine": engine_run, **{n: functools.partial(run, x) for n, run in zip(names, runs, strict=True)}}
        # more rounds than a layer's tactic choice: the compiles differ by a few percent
        timings = interleaved(contenders, max(repeats, 5), warmup=1)
        fastest = min(range(len(runs)), key=lambda i: timings.median(names[i]))
        run, speedup = runs[fastest], timings.speedup(names[fastest], "engine")
        tolerance = TOLERANCE["bf16" if self.bf16 else "f32"]
        if diff > tolerance:
            kept, reason = False, f"outputs differ by more than {tolerance:g}"
        elif not speedup > 1.0:
            kept, reason = False, "the engine was as fast or faster"
        else:
            kept, reason = True, "faster"
        if kept:
            self.runners[key] = run
        choice = DenseRuntimeChoice(
            tuple(x.shape), threads, label, precision, 1e3 * timings.median("engine"),
            1e3 * timings.median(names[fastest]), speedup, diff, kept, reason,
            tuple(1e3 * timings.median(n) for n in names),
        )  # fmt: skip
        self.choices.append(choice)
        log.info("%s", choice.line())
        return choice


def _max_abs_diff(theirs: Tensor, ours: Tensor) -> float:
    """Largest |theirs - ours|; infinite for another shape or a NaN."""
    diff = float((theirs - ours).abs().max()) if theirs.shape == ours.shape else float("inf")
    return float("inf") if diff != diff else diff


class DelegatingForward:
    """A compiled model's ``forward``: its own, or the dense runtime kept for this input's shape.

    Only a single plain tensor input is handed over, outside a route map and without autograd. Holds
    the engine's state rather than a closure, so a deep copy of the model keeps its own."""

    def __init__(self, own: Callable[..., Any], state: EngineState) -> None:
        self.own = own
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        runtimes = self.state.dense_runtime
        if runtimes is not None and len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
            x = args[0]
            run = runtimes.runner(x) if self.state.spatial is None else None
            if run is not None and not (torch.is_grad_enabled() and x.requires_grad):
                return run(x)
        return self.own(*args, **kwargs)
