"""MAC/param/byte accounting against the published figures (docs/ARCHITECTURE.md, section 3)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nmrestore.cost import count_cost, default_input_size
from nmrestore.sparsity import NMConfig, sparsify_
from nmrestore.sparsity.nm import packed_nbytes
from tests.nets import TinyEDSR


@pytest.mark.parametrize(
    ("scale", "gmacs_low", "gmacs_high", "params_m"),
    [(4, 114.2, 114.5, 1.52), (2, 316.3 * 0.995, 316.3 * 1.005, 1.37), (3, 160.3 * 0.995, 160.3 * 1.005, 1.55)],
)
def test_edsr_baseline_shaped_network_matches_anchors(
    scale: int, gmacs_low: float, gmacs_high: float, params_m: float
) -> None:
    report = count_cost(TinyEDSR(scale=scale))
    assert report.input_size == (720 // scale, 1280 // scale)
    assert gmacs_low <= report.dense_macs / 1e9 <= gmacs_high
    assert round(report.params / 1e6, 2) == params_m


def test_two_four_halves_prunable_macs_exactly() -> None:
    model = TinyEDSR(scale=4)
    dense = count_cost(model)
    sparsify_(model, NMConfig(n=2, m=4))
    sparse = count_cost(model)
    assert sparse.prunable_macs() * 2 == sparse.prunable_dense_macs
    assert sparse.dense_macs == dense.dense_macs
    assert sparse.macs() == dense.dense_macs - sparse.prunable_dense_macs / 2
    non_prunable = {layer.name for layer in sparse.layers if not layer.prunable}
    assert non_prunable == {"head", "tail"}


def test_per_route_costs_and_packed_bytes() -> None:
    model = TinyEDSR(scale=2, channels=16, blocks=2)
    sparsify_(model, NMConfig(m=8, routes=(2, 4, 8)))
    report = count_cost(model, input_size=(10, 12))
    assert report.num_routes == 3
    for route, n in enumerate((2, 4, 8)):
        assert report.prunable_macs(route) == report.prunable_dense_macs * n / 8
    layer = next(layer for layer in report.layers if layer.name == "body.0.body.0")
    assert layer.packed_bytes(0) == packed_nbytes(16 * 16 * 9, 2, 8) + 16 * 4
    assert layer.nonzero_params(0) == 16 * 16 * 9 // 4 + 16
    assert report.summary(2)["macs"] == report.dense_macs
    assert report.to_dict()["routes"][1]["prunable_macs"] == report.prunable_dense_macs / 2


def test_counting_never_modifies_the_model() -> None:
    model = TinyEDSR(scale=2, channels=8, blocks=1)
    sparsify_(model, NMConfig(n=2, m=4))
    model.train()
    before = copy.deepcopy(model.state_dict())
    count_cost(model)
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    x = torch.rand(1, 3, 4, 4)
    assert torch.isfinite(model(x)).all()  # mask caches still hold real tensors


def test_default_input_size_and_linear_layers() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Linear(8, 4))
    report = count_cost(model, input_size=(2, 2))
    assert [layer.dense_macs for layer in report.layers] == [96, 32]
    assert default_input_size(TinyEDSR(scale=4)) == (180, 320)
    assert "total:" in report.table()
