"""Process-group exit: ranks leave together after a finished run, at once after an error."""

from __future__ import annotations

import time

import pytest
import torch

from nmrestore.engine import distributed
from nmrestore.engine.distributed import DistInfo, distributed_run


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    monkeypatch.setattr(distributed, "init_distributed", lambda _pref="auto": DistInfo(rank=1, world_size=2))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: seen.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: seen.append("destroy"))
    monkeypatch.setattr(distributed, "_store_barrier", lambda info, key: seen.append("store barrier"))
    return seen


def test_a_finished_run_waits_for_every_rank_before_tearing_down(calls: list[str]) -> None:
    with distributed_run("cpu"):
        pass
    # gloo's barrier, then one through the store, so that no rank is still inside gloo's when another
    # tears gloo down
    assert calls == ["barrier", "store barrier", "destroy"]


def test_the_store_barrier_waits_for_every_rank_and_gives_up_at_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    store = torch.distributed.HashStore()
    monkeypatch.setattr(distributed.distributed_c10d, "_get_default_store", lambda: store)
    info = DistInfo(rank=1, world_size=2)
    store.add("k", 1)  # the other rank already arrived
    distributed._store_barrier(info, "k", timeout_s=5.0)
    assert store.add("k", 0) == 2
    start = time.monotonic()
    distributed._store_barrier(info, "alone", timeout_s=0.2)  # nobody else comes: it returns at its timeout
    assert 0.2 <= time.monotonic() - start < 5.0


def test_a_failed_run_leaves_without_waiting_for_ranks_that_may_never_come(calls: list[str]) -> None:
    with pytest.raises(RuntimeError, match="boom"), distributed_run("cpu"):
        raise RuntimeError("boom")
    assert calls == ["destroy"]


def test_one_process_touches_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed.dist, "barrier", lambda: pytest.fail("barrier in one process"))
    with distributed_run("cpu") as info:
        assert not info.distributed
