"""Shared set-up for the sparse-engine tests: one thread, and a kernel state restored after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from nmrestore.runtime import reset_kernel


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny inputs gain nothing from threads, and OpenMP barriers stall when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Forget the loaded kernel before and after a test that changes how it is built."""
    reset_kernel()
    yield monkeypatch
    monkeypatch.undo()
    reset_kernel()
