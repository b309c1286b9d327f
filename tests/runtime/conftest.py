"""Shared set-up for the sparse-engine tests: one thread, and a kernel state restored after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nmrestore.runtime import reset_kernel


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs on one thread (see ``one_thread`` in tests/conftest.py)."""


@pytest.fixture
def fresh_kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Forget the loaded kernel before and after a test that changes how it is built."""
    reset_kernel()
    yield monkeypatch
    monkeypatch.undo()
    reset_kernel()
