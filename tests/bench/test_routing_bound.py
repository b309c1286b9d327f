"""The routing bound on hand-made images whose best routing is known."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from nmrestore.bench.routing_bound import routing_bound, tile_routing_bound
from nmrestore.errors import SparsityError
from nmrestore.metrics import psnr


class Constant(nn.Module):
    """A 'cheap route' that paints every pixel grey: exact on flat grey patches, wrong elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.full_like(x, 0.5)


class Offset(nn.Module):
    """A 'full route' that is close everywhere: the input plus a small offset."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.tensor(offset))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.offset


def half_flat_sample() -> dict[str, object]:
    """64x64, left half flat grey, right half texture; lq = gt (a scale-1 task)."""
    torch.manual_seed(0)
    gt = torch.full((3, 64, 64), 0.5)
    gt[:, :, 32:] = torch.rand(3, 64, 32) * 0.8 + 0.1
    return {"lq": gt.clone(), "gt": gt, "name": "half"}


def score(image: Tensor, gt: Tensor) -> float:
    return psnr(image.clamp(0, 1), gt, crop_border=0, test_y_channel=False)


def test_both_routings_send_flat_patches_to_the_cheap_route() -> None:
    sample = half_flat_sample()
    gt = sample["gt"]
    assert isinstance(gt, Tensor)
    bound = routing_bound(
        [Constant(), Offset(0.02)], [0.3, 1.0], 0.65, [sample], 1, 0, False, patch=32, stride=32
    )
    # 4 patches, 2 of them flat: the budget allows exactly 2 on the cheap route
    for routed in (bound.expected, bound.oracle):
        assert routed.histogram == [2, 2]
        assert routed.macs_fraction == pytest.approx(0.65)
        best = gt.clone()
        best[:, :, 32:] += 0.02
        assert routed.psnr == pytest.approx(score(best, gt))
    assert bound.single_route[1].psnr == pytest.approx(score(gt + 0.02, gt))
    assert bound.single_route[0].histogram == [4, 0]
    assert bound.single_route[1].macs_fraction == pytest.approx(1.0)
    assert bound.expected.psnr > bound.single_route[1].psnr  # routing beats the full route here


def test_budgets_at_the_ends_give_one_route() -> None:
    sample = half_flat_sample()
    models = [Constant(), Offset(0.02)]
    low = routing_bound(models, [0.3, 1.0], 0.1, [sample], 1, 0, False, patch=32, stride=32)
    assert low.expected.histogram == [4, 0] and low.oracle.histogram == [4, 0]
    assert low.expected.psnr == pytest.approx(low.single_route[0].psnr)
    high = routing_bound(models, [0.3, 1.0], 1.0, [sample], 1, 0, False, patch=32, stride=32)
    # with MACs to spare, the expected error (against the full route) keeps everything on the full
    # route; the ground truth knows the cheap route is exact on flat patches
    assert high.expected.histogram == [0, 4]
    assert high.oracle.histogram == [2, 2]


def test_identical_routes_cost_nothing_to_route() -> None:
    sample = half_flat_sample()
    bound = routing_bound(
        [Offset(0.01), Offset(0.01)], [0.5, 1.0], 0.75, [sample], 1, 0, False, patch=32, stride=24
    )
    assert bound.expected.histogram == [9, 0]  # no disagreement anywhere: all cheap
    assert bound.expected.psnr == pytest.approx(bound.single_route[1].psnr)


def test_bad_input_is_refused() -> None:
    sample = half_flat_sample()
    with pytest.raises(SparsityError, match="route models"):
        routing_bound([Constant()], [0.3, 1.0], 0.5, [sample], 1, 0, False)
    with pytest.raises(SparsityError, match="smaller than"):
        routing_bound([Constant(), Offset(0.0)], [0.3, 1.0], 0.5, [sample], 1, 0, False, patch=80)


def _as_restorer(model: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda x: model(x)


def test_tile_bound_takes_each_tile_from_its_route_and_weighs_cut_tiles_by_pixels() -> None:
    sample = half_flat_sample()
    gt = sample["gt"]
    assert isinstance(gt, Tensor)
    restorers = [_as_restorer(Constant()), _as_restorer(Offset(0.02))]
    bound = tile_routing_bound(restorers, [0.3, 1.0], 0.65, [sample], 1, 0, False, tile=32, score_tile=16)
    for routed in (bound.expected, bound.oracle):
        assert routed.histogram == [2, 2] and routed.macs_fraction == pytest.approx(0.65)
        best = gt.clone()
        best[:, :, 32:] += 0.02
        assert routed.psnr == pytest.approx(score(best, gt))
        assert routed.tiles is not None and len(routed.tiles) == 16  # 4x4 scoring tiles of 16 px
    # 48 rows in 32-pixel tiles: the bottom tiles hold half the pixels and half the MACs
    cut = {"lq": sample["lq"][:, :48], "gt": gt[:, :48], "name": "cut"}  # type: ignore[index]
    bound = tile_routing_bound(restorers, [0.3, 1.0], 1.0, [cut], 1, 0, False, tile=32)
    assert bound.single_route[0].macs_fraction == pytest.approx(0.3)
    assert bound.oracle.histogram == [2, 2]  # flat tiles (top and bottom) on the cheap route
    pixels = torch.tensor([32 * 32, 32 * 32, 16 * 32, 16 * 32], dtype=torch.float64)
    cost = torch.tensor([0.3, 1.0, 0.3, 1.0], dtype=torch.float64)
    assert bound.oracle.macs_fraction == pytest.approx(float((pixels * cost).sum() / pixels.sum()))
    with pytest.raises(SparsityError, match="restorers"):
        tile_routing_bound(restorers, [1.0], 0.5, [sample], 1, 0, False, tile=32)
