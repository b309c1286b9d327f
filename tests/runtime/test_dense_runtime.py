"""The whole-model dense fallback on OpenVINO: kept only when faster and matching, per input shape."""

from __future__ import annotations

import copy
import sys

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


def _timed(monkeypatch: pytest.MonkeyPatch, engine_ms: float, runtime_ms: float) -> None:
    def interleaved(runs: dict, rounds: int, warmup: int = 1) -> Timings:  # type: ignore[type-arg]
        for run in runs.values():
            run()
        return Timings({"engine": [engine_ms], "runtime": [runtime_ms]})

    monkeypatch.setattr(dense_runtime, "interleaved", interleaved)


def test_a_faster_runtime_runs_that_shape_and_the_first_call_already_gives_its_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _timed(monkeypatch, engine_ms=10.0, runtime_ms=5.0)
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
        assert torch.equal(first, again) and torch.equal(again, runner(x))  # OpenVINO's output
    assert (again - expected).abs().max() <= 1e-4
    [choice] = state.dense_runtime.choices
    assert choice.kept and choice.runtime == "openvino f32" and choice.precision == "f32"
    assert choice.speedup == 2.0 and choice.input_shape == (1, 3, 9, 13) and choice.max_abs_diff <= 1e-4
    assert "runs the whole model" in choice.line()
    with torch.no_grad():
        engine(other)  # a new shape is decided on its own
    assert [c.input_shape for c in state.dense_runtime.choices] == [(1, 3, 9, 13), (1, 3, 8, 8)]


def test_a_slower_runtime_leaves_the_engine_running_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    _timed(monkeypatch, engine_ms=5.0, runtime_ms=10.0)
    model = _edsr()
    engine = compile_sparse(model, CONFIG)
    plain = compile_sparse(model, EngineConfig(timing_repeats=1, refine=False))
    x = torch.rand(1, 3, 9, 13)
    with torch.no_grad():
        engine(x)
        out = engine(x)
        plain(x)
        assert torch.equal(out, plain(x))  # the engine's own arithmetic
    state = engine_state(engine)
    assert state is not None and state.dense_runtime is not None and state.dense_runtime.runner(x) is None
    [choice] = state.dense_runtime.choices
    assert not choice.kept and choice.reason == "the engine was as fast or faster"


def test_a_runtime_whose_output_differs_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    _timed(monkeypatch, engine_ms=10.0, runtime_ms=1.0)
    wrong = lambda inp: torch.zeros(1, 3, 2 * inp.shape[2], 2 * inp.shape[3])  # noqa: E731
    monkeypatch.setattr(dense_runtime, "openvino_runner", lambda *args, **kwargs: (wrong, "f32"))
    engine = compile_sparse(_edsr(), CONFIG)
    x = torch.rand(1, 3, 9, 13)
    with torch.no_grad():
        out = engine(x)
    state = engine_state(engine)
    assert state is not None and state.dense_runtime is not None and state.dense_runtime.runner(x) is None
    [choice] = state.dense_runtime.choices
    assert not choice.kept and "outputs differ" in choice.reason and out.abs().max() > 0


def test_an_input_that_needs_gradients_runs_on_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    _timed(monkeypatch, engine_ms=10.0, runtime_ms=5.0)
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
