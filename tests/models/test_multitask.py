"""Multi-task models: a shared trunk, one upsampler per task, the active task chosen like a route."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from nmrestore.errors import NMRestoreError
from nmrestore.models import count_params, create_model
from nmrestore.models.multitask import MultiTaskSR, load_single_task_state, parse_tasks, use_task

#: multi-task model -> the single-task model whose trunk it shares (same size presets)
FAMILIES = {
    "edsr_small_multiscale": "edsr_small",
    "rcan_small_multiscale": "rcan_small",
    "msrresnet_small_multiscale": "msrresnet_small",
}
TINY = {"n_feats": 8, "n_blocks": 1}


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs on one thread (see ``one_thread`` in tests/conftest.py)."""


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_task_upsamples_by_its_scale_and_use_task_restores(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, scale=3, tasks=["x2", 3, 4], **TINY)
    assert isinstance(model, MultiTaskSR)
    assert model.tasks == ("x2", "x3", "x4") and model.task == "x3" and model.scale == 3
    x = torch.rand(1, 3, 6, 5)
    for task, scale in model.task_scales.items():
        with use_task(model, task):
            assert model.scale == scale and model.task_index == model.tasks.index(task)
            assert model(x).shape == (1, 3, 6 * scale, 5 * scale)
    assert model.task == "x3" and model.scale == 3


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_task_uses_the_shared_trunk_and_only_its_own_upsampler(name: str) -> None:
    """Per task, the parameters it uses are exactly those of the single-task model at its scale."""
    model = create_model(name, scale=2, **TINY)
    owned = model.task_modules()
    for task, scale in model.task_scales.items():
        model.zero_grad(set_to_none=True)
        with use_task(model, task):
            F.l1_loss(model(torch.rand(1, 3, 6, 6)), torch.rand(1, 3, 6 * scale, 6 * scale)).backward()
        used = {n for n, p in model.named_parameters() if p.grad is not None}
        for other, prefixes in owned.items():
            mine = {n for n in used if any(n.startswith(p + ".") for p in prefixes)}
            assert bool(mine) == (other == task), (task, other)
        single = create_model(FAMILIES[name], scale=scale, **TINY)
        assert sum(p.numel() for n, p in model.named_parameters() if n in used) == count_params(single)


@pytest.mark.parametrize(("name", "scale"), [("edsr_small_multiscale", 3), ("msrresnet_small_multiscale", 4)])
def test_a_single_task_checkpoint_loads_into_its_task(name: str, scale: int) -> None:
    torch.manual_seed(0)
    single = create_model(FAMILIES[name], scale=scale, **TINY).eval()
    multi = create_model(name, scale=scale, tasks=(scale, 2), **TINY).eval()
    left = load_single_task_state(multi, single.state_dict(), f"x{scale}")
    assert left and all(k.startswith("upsample.x2.") for k in left)
    x = torch.rand(1, 3, 7, 6)
    with torch.no_grad():
        assert torch.equal(multi(x), single(x))
    with pytest.raises(NMRestoreError, match="no place"):
        load_single_task_state(multi, {"nope.weight": torch.zeros(1)}, f"x{scale}")


def test_task_errors_are_one_clear_line() -> None:
    with pytest.raises(NMRestoreError, match="scale 4 is not one of the model's tasks"):
        create_model("edsr_small_multiscale", scale=4, tasks=(2, 3))
    with pytest.raises(NMRestoreError, match="repeat"):
        parse_tasks([2, "x2"], (2, 3, 4), "edsr")
    with pytest.raises(NMRestoreError, match="scale"):
        parse_tasks(["x5"], (2, 3, 4), "edsr")
    with pytest.raises(NMRestoreError, match="non-empty"):
        parse_tasks([], (2, 3, 4), "edsr")
    model = create_model("edsr_small_multiscale", **TINY)
    with pytest.raises(NMRestoreError, match="unknown task 'x8'"):
        model.set_task("x8")
    with (
        pytest.raises(NMRestoreError, match="not a multi-task model"),
        use_task(create_model("edsr_small", **TINY), "x2"),
    ):
        pass


def test_first_and_last_convs_are_shared_and_declared_dense() -> None:
    for name in FAMILIES:
        model = create_model(name, scale=2, **TINY)
        first, last = model.nm_dense_layers
        owned = [p for prefixes in model.task_modules().values() for p in prefixes]
        assert not any(first.startswith(p) or last.startswith(p) for p in owned)
        assert all(dict(model.named_modules()).get(p) is not None for p in owned)
