"""Whole-model plans on f32 engines: timed only on a close call, and the first call gives the kept plan."""

from __future__ import annotations

import copy

import pytest
import torch

from nmrestore.models import create_model
from nmrestore.runtime import EngineConfig, compile_sparse, engine_state, load_kernel, plans
from nmrestore.runtime.layers import Extra, RouteWeights, SparseLayer
from nmrestore.runtime.timing import Timings
from nmrestore.sparsity import NMConfig, sparsify_, squash_


def _edsr() -> torch.nn.Module:
    if load_kernel() is None:
        pytest.skip("no C++ compiler: the sparse kernel is unavailable")
    torch.manual_seed(0)
    model = create_model("edsr_small", scale=2, n_feats=32, n_blocks=2)
    sparsify_(model, NMConfig(n=2, m=4))
    return model.eval()


def _fake(monkeypatch: pytest.MonkeyPatch, layer_ms: dict[str, float], plan_ms: dict[str, float]) -> list[str]:
    """Layer tactics timed as ``layer_ms`` say; whole-model plans as ``plan_ms``; the plans timed, returned."""

    def layer_times(
        self: SparseLayer, x: torch.Tensor, rw: RouteWeights, cands: list[str], repeats: int, extra: Extra
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return {c: self._run_tactic_plain(c, x, rw, extra) for c in cands}, {c: layer_ms[c] for c in cands}

    seen: list[str] = []

    def interleaved(runs: dict, rounds: int, warmup: int = 1) -> Timings:  # type: ignore[type-arg]
        seen.extend(runs)
        for run in runs.values():
            run()
        return Timings({k: [plan_ms.get(k, 5.0)] for k in runs})

    monkeypatch.setattr(SparseLayer, "_time_all", layer_times)
    monkeypatch.setattr(plans, "interleaved", interleaved)
    return seen


def test_a_close_call_times_the_plans_and_the_first_output_is_the_kept_plans(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = _fake(monkeypatch, {"dense": 1.1, "sparse": 1.0}, {"f32 dense": 1.0})  # greedy: the kernel
    model = _edsr()
    engine = compile_sparse(model, EngineConfig(timing_repeats=1))
    x = torch.rand(1, 3, 9, 11)
    with torch.no_grad():
        first, again = engine(x), engine(x)
    state = engine_state(engine)
    assert state is not None and state.plans == ["f32 dense"]
    assert set(seen) == {"per-layer", "f32 dense"}  # "f32" and "f32 kernel" are the greedy plan
    pruned = [d for d in state.table() if d.nm == "2:4"]
    assert pruned and all(d.choice == "dense" and "whole-model plan 'f32 dense'" in d.reason for d in pruned)
    assert torch.equal(first, again)  # the first call already ran the kept plan
    assert (first - squash_(copy.deepcopy(model))(x)).abs().max() <= 1e-4


def test_clear_choices_time_no_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fake(monkeypatch, {"dense": 3.0, "sparse": 1.0}, {})
    engine = compile_sparse(_edsr(), EngineConfig(timing_repeats=1))
    with torch.no_grad():
        engine(torch.rand(1, 3, 9, 11))
    state = engine_state(engine)
    assert seen == [] and state is not None and state.plans == []
