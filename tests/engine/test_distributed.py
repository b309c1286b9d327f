"""Process-group exit: ranks leave together after a finished run, at once after an error."""

from __future__ import annotations

import pytest

from nmrestore.engine import distributed
from nmrestore.engine.distributed import DistInfo, distributed_run


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    monkeypatch.setattr(distributed, "init_distributed", lambda _pref="auto": DistInfo(rank=1, world_size=2))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: seen.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: seen.append("destroy"))
    return seen


def test_a_finished_run_waits_for_every_rank_before_tearing_down(calls: list[str]) -> None:
    with distributed_run("cpu"):
        pass
    assert calls == ["barrier", "destroy"]


def test_a_failed_run_leaves_without_waiting_for_ranks_that_may_never_come(calls: list[str]) -> None:
    with pytest.raises(RuntimeError, match="boom"), distributed_run("cpu"):
        raise RuntimeError("boom")
    assert calls == ["destroy"]


def test_one_process_touches_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed.dist, "barrier", lambda: pytest.fail("barrier in one process"))
    with distributed_run("cpu") as info:
        assert not info.distributed
