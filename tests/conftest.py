"""Shared fixtures: tiny recipes that train in seconds on 2 CPU cores."""

from __future__ import annotations

from typing import Any

import pytest
import torch


def tiny_recipe_dict(**sections: Any) -> dict[str, Any]:
    """A recipe for a 2-block 8-channel EDSR on 8x8 LR patches; validation on one test photo."""
    recipe: dict[str, Any] = {
        "name": "tiny",
        "seed": 3,
        "model": {"name": "edsr_small", "scale": 2, "kwargs": {"n_feats": 8, "n_blocks": 1}},
        "data": {
            "train": {
                "source": "builtin",
                "patch_size": 8,
                "batch_size": 4,
                "samples_per_epoch": 16,
                "max_images": 2,
            },
            "val": {"source": "builtin", "split": "test", "max_images": 1, "test_data": True},
        },
        "train": {"steps": 8, "lr": 1e-3, "val_every": 4, "ckpt_every": 2, "log_every": 2, "threads": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


@pytest.fixture
def tiny_recipe() -> dict[str, Any]:
    return tiny_recipe_dict()


@pytest.fixture(autouse=True)
def _restore_threads() -> Any:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same RNG state, so a test's outcome never depends on test order."""
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Any:
    """Tiny inputs gain nothing from threads, and OpenMP barriers stall when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
