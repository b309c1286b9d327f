"""The whole-model dense fallback on OpenVINO: kept only when faster and matching, per input shape.

The engine's side runs in this process against a stand-in runtime (PyTorch's dense model); OpenVINO
itself runs in a child process (the last test). In the full suite, a ``backward()`` later in a process
that had run OpenVINO crashed with a segmentation fault, so no test here leaves OpenVINO loaded and used.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from nmrestore.errors import NMRestoreError
from nmrestore.models import create_model
from nmrestore.runtime import EngineConfig, compile_sparse, dense_runtime, engine_state, load_kernel
from nmrestore.runtime.timing import Timings
from nmrestore.sparsity import NMConfig, sparsify_, squash_

CONFIG = EngineConfig(timing_repeats=1, refine=False, dense_runtime="openvino")


def _edsr(routes: tuple[int, ...] | None = None) -> torch.nn.Module:
    if load_kernel() is None:
        pytest.skip("no C++ compiler: the sparse kernel is unavailable")
    pytest.importorskip("openvino")
    torch.manual_seed(0)
    model = create_model("edsr_small", scale=2, n_feats=16, n_blocks=2)
    sparsify_(model, NMConfig(n=2, m=4) if routes is None else NMConfig(m=4, routes=routes))
    return model.eval()


def _timed(monkeypatch: pytest.MonkeyPatch, engine_ms: float, *runtime_ms: float) -> list:  # type: ignore[type-arg]
    """Timings as given (one per compile), and PyTorch's dense reference standing in for OpenVINO
    (precision 'f32'); the runs handed to the engine, one per compile."""
    runs: list = []  # type: ignore[type-arg]

    def interleaved(contenders: dict, rounds: int, warmup: int = 1) -> Timings:  # type: ignore[type-arg]
        for run in contenders.values():
            run()
        names = [n for n in contenders if n != "engine"]
        seconds = {n: [t / 1e3] for n, t in zip(names, runtime_ms, strict=True)}
        return Timings({"engine": [engine_ms / 1e3], **seconds})

    def runners(reference: torch.nn.Module, x: torch.Tensor, threads: int, f32: bool) -> tuple:  # type: ignore[type-arg]
        new = [(lambda inp: reference(inp).detach().clone()) for _ in runtime_ms]
        runs.extend(new)
        return new, "f32"

    monkeypatch.setattr(dense_runtime, "interleaved", interleaved)
    monkeypatch.setattr(dense_runtime, "openvino_runners", runners)
    return runs


def test_a_faster_runtime_runs_that_shape_and_the_first_call_already_gives_its_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _timed(monkeypatch, 10.0, 5.0)
    model = _edsr()
    engine = compile_sparse(model, CONFIG)
    reference = squash_(copy.deepcopy(model))
    x, other = torch.rand(1, 3, 9, 13), torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        first, again = engine(x), engine(x)
        expected = reference(x)
    state = engine_state(engine)
    assert state is not None and state.dense_runtime is not None
    runner = state.dense_runtime.runner(x)
    assert runner is not None
    with torch.no_grad():
        assert torch.equal(first, again) and torch.equal(again, runner(x))  # the runtime's output
    assert torch.equal(again, expected)  # the stand-in runtime is the dense-with-zeros model
    [choice] = state.dense_runtime.choices
    assert choice.kept and choice.runtime == "openvino f32" and choice.precision == "f32"
    assert choice.speedup == 2.0 and choice.input_shape == (1, 3, 9, 13) and choice.max_abs_diff <= 1e-4
    assert "runs the whole model" in choice.line()
    with torch.no_grad():
        engine(other)  # a new shape is decided on its own
    assert [c.input_shape for c in state.dense_runtime.choices] == [(1, 3, 9, 13), (1, 3, 8, 8)]


def test_of_several_compiles_the_fastest_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _timed(monkeypatch, 10.0, 9.0, 5.0, 7.0)
    engine = compile_sparse(_edsr(), CONFIG)
    x = torch.rand(1, 3, 9, 13)
    with torch.no_grad():
        engine(x)
    state = engine_state(engine)
    assert state is not None and state.dense_runtime is not None
    assert state.dense_runtime.runner(x) is runs[1]
    [choice] = state.dense_runtime.choices
    assert choice.kept and choice.compile_ms == pytest.approx((9.0, 5.0, 7.0)) and choice.runtime_ms == 5.0
    assert choice.speedup == 2.0 and "fastest of 3 compiles: 9.00, 5.00, 7.00 ms" in choice.line()


def test_a_slower_runtime_leaves_the_engine_running_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    _timed(monkeypatch, 5.0, 10.0)
    model = _edsr()
    engine = compile_sparse(model, CONFIG)
    plain = compile_sparse(model, EngineConfig(timing_repeats=1, refine=False))
    x = torch.rand(1, 3, 9, 13)
    with torch.no_grad():
        engine(x)
        out = engine(x)
        plain(x)
        # the engine's own arithmetic (each engine times its layers' tactics itself: equal up to rounding)
        assert (out - plain(x)).abs().max() <= 1e-5
    state = engine_state(engine)
    assert state is not None and state.dense_runtime is not None and state.dense_runtime.runner(x) is None
    [choice] = state.dense_runtime.choices
    assert not choice.kept and choice.reason == "the engine was as fast or faster"


def test_a_runtime_whose_output_differs_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    _timed(monkeypatch, 10.0, 1.0)
    wrong = lambda inp: torch.zeros(1, 3, 2 * inp.shape[2], 2 * inp.shape[3])  # noqa: E731
    monkeypatch.setattr(dense_runtime, "openvino_runners", lambda *args, **kwargs: ([wrong], "f32"))
    engine = compile_sparse(_edsr(), CONFIG)
    x = torch.rand(1, 3, 9, 13)
    with torch.no_grad():
        out = engine(x)
    state = engine_state(engine)
    assert state is not None and state.dense_runtime is not None and state.dense_runtime.runner(x) is None
    [choice] = state.dense_runtime.choices
    assert not choice.kept and "outputs differ" in choice.reason and out.abs().max() > 0


def test_an_input_that_needs_gradients_runs_on_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    _timed(monkeypatch, 10.0, 5.0)
    engine = compile_sparse(_edsr(), CONFIG)
    x = torch.rand(1, 3, 9, 13)
    with torch.no_grad():
        engine(x)
    out = engine(x.clone().requires_grad_(True))
    assert out.requires_grad  # PyTorch's dense path, not OpenVINO's numpy output


def test_bad_settings_are_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="needs tactic 'auto'"):
        EngineConfig(tactic="sparse", dense_runtime="openvino")
    with pytest.raises(NMRestoreError, match="several routes"):
        compile_sparse(_edsr(routes=(1, 2, 4)), CONFIG)
    model = _edsr()
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(NMRestoreError, match=r"pip install 'nmrestore\[openvino\]'"):
        compile_sparse(model, CONFIG)


CHILD = """
import torch
from nmrestore.models import create_model
from nmrestore.runtime import EngineConfig, compile_sparse, engine_state
from nmrestore.sparsity import NMConfig, sparsify_, squash_
torch.manual_seed(0)
model = create_model("edsr_small", scale=2, n_feats=16, n_blocks=2)
sparsify_(model, NMConfig(n=2, m=4))
model.eval()
x = torch.rand(1, 3, 9, 13)
for precision, tolerance in (("f32", 1e-5), ("bf16", 3e-2)):
    engine = compile_sparse(model, EngineConfig(timing_repeats=1, precision=precision, dense_runtime="openvino"))
    with torch.no_grad():
        out = engine(x)
        diff = float((out - squash_(model)(x)).abs().max())
    [choice] = engine_state(engine).dense_runtime.choices
    assert choice.runtime == ("openvino f32" if precision == "f32" else "openvino default"), choice
    assert choice.max_abs_diff <= tolerance and diff <= tolerance, (choice, diff)
    assert len(choice.compile_ms) == 3 and choice.runtime_ms == min(choice.compile_ms), choice
    print(precision, choice.precision, choice.kept, f"{diff:.1e}")
"""


def test_openvino_runs_the_dense_model_in_a_child_process() -> None:
    _edsr()  # skips without the kernel or OpenVINO
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split("\n")
    assert lines[0].startswith("f32 f32 ") and lines[1].startswith("bf16 ")
