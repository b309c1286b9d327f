"""Spatial routing on the engine: every tile of the image on its own route, in one whole-image pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nmrestore.errors import NMRestoreError
from nmrestore.models import create_model
from nmrestore.runtime import (
    EngineConfig,
    RouteMap,
    compile_sparse,
    engine_state,
    load_kernel,
    routed_layers,
    save_compiled,
    sparse_layers,
    use_spatial_routes,
)
from nmrestore.runtime.spatial import grid_shape, merge_runs
from nmrestore.sparsity import NMConfig, sparsify_, use_route
from nmrestore.sparsity.parametrization import nm_mask_of

TOL = 1e-4


def _routed(scale: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("edsr_small", scale=scale, n_feats=8, n_blocks=2, global_skip=True)
    sparsify_(model, NMConfig(m=4, routes=(1, 2, 4)))
    with torch.no_grad():  # global_skip starts the last conv at zero: make the network's part visible
        model.tail[1].weight.normal_(0, 0.1)
    return model.eval()


def _route_map(h: int, w: int, tile: int, seed: int = 1) -> RouteMap:
    rows, cols = grid_shape((h, w), tile)
    routes = torch.randint(0, 3, (rows, cols), generator=torch.Generator().manual_seed(seed))
    return RouteMap(routes, tile, (h, w))


def _per_pixel(route_map: RouteMap, factor: int) -> torch.Tensor:
    """Route of every pixel at ``factor`` x the LR size (the reference's view of the map)."""
    h, w = route_map.lr_size
    t = route_map.tile * factor
    grid = route_map.routes.repeat_interleave(t, 0).repeat_interleave(t, 1)
    return grid[: h * factor, : w * factor]


@torch.no_grad()
def _reference(model: nn.Module, x: torch.Tensor, route_map: RouteMap) -> torch.Tensor:
    """Every routed conv computed on the whole map on every route, each pixel kept from its own route."""
    hooks = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        mask = nm_mask_of(module)
        assert mask is not None
        pixels = _per_pixel(route_map, output.shape[-2] // route_map.lr_size[0])
        mixed = torch.zeros_like(output)
        previous = mask.route
        for k in range(mask.num_routes):
            mask.route = k
            y = F.conv2d(inputs[0], module.weight, module.bias, module.stride, module.padding)
            mixed += y * (pixels == k).to(y)
        mask.route = previous
        return mixed

    for module in model.modules():
        if nm_mask_of(module) is not None and isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(hook))
    try:
        return model(x)
    finally:
        for h in hooks:
            h.remove()


def test_route_map_groups_cover_every_pixel_once() -> None:
    route_map = _route_map(13, 22, 5)
    assert route_map.routes.shape == (3, 5)
    assert sum(route_map.pixels_per_route(3)) == 13 * 22
    for factor in (1, 2):
        covered = torch.zeros(13 * factor, 22 * factor, dtype=torch.int64)
        for group in route_map.groups(factor):
            th, tw = group.shape
            for t, s in group.positions:
                covered[t : t + th, s : s + tw] += 1
        assert bool((covered == 1).all())
    with pytest.raises(NMRestoreError, match="needs 3x5"):
        RouteMap(torch.zeros(2, 5, dtype=torch.int64), 5, (13, 22))


@pytest.mark.parametrize("tactic", ["dense", "sparse"])
@pytest.mark.parametrize("scale", [2, 4])
def test_spatial_routing_equals_per_pixel_route_mixing(tactic: str, scale: int) -> None:
    if tactic == "sparse" and load_kernel() is None:  # pragma: no cover - only without a compiler
        pytest.skip("sparse kernel unavailable on this machine")
    model = _routed(scale)
    engine = compile_sparse(model, EngineConfig(tactic=tactic))  # type: ignore[arg-type]
    x = torch.rand(1, 3, 13, 22)
    route_map = _route_map(13, 22, 5)
    assert len(set(route_map.routes.flatten().tolist())) == 3
    with torch.no_grad(), use_spatial_routes(engine, route_map):
        out = engine(x)
    assert engine_state(engine).spatial is None  # type: ignore[union-attr]  # restored on exit
    assert out.shape == (1, 3, 13 * scale, 22 * scale)
    assert (out - _reference(model, x, route_map)).abs().max() <= TOL
    state = engine_state(engine)
    assert state is not None
    chosen = {(d.route, d.choice, d.reason) for d in state.table()}
    if tactic == "sparse":  # the cheap routes in place on the kernel, the dense full route gathered
        assert (0, "sparse", "route map: tiles in place") in chosen
        assert any(route == 2 and choice == "dense" for route, choice, _ in chosen)
    else:
        assert all(choice == "dense" for _, choice, _ in chosen)


def test_one_route_everywhere_is_that_route_on_the_whole_image() -> None:
    model = _routed()
    engine = compile_sparse(model, EngineConfig(tactic="dense"))
    x = torch.rand(1, 3, 12, 16)
    for k in range(3):
        route_map = RouteMap(torch.full((3, 4), k), 4, (12, 16))
        with torch.no_grad(), use_spatial_routes(engine, route_map):
            out = engine(x)
        with torch.no_grad(), use_route(model, k):
            whole = model(x)
        assert (out - whole).abs().max() <= 1e-5


def test_only_layers_with_different_route_weights_are_split() -> None:
    engine = compile_sparse(_routed(), EngineConfig(tactic="dense"))
    names = {layer.layer_name for layer in routed_layers(engine)}
    assert names and "head.0" not in names and "tail.1" not in names  # dense first and last convs


def test_a_map_of_another_size_is_refused() -> None:
    engine = compile_sparse(_routed(), EngineConfig(tactic="dense"))
    with (
        torch.no_grad(),
        use_spatial_routes(engine, _route_map(10, 10, 5)),
        pytest.raises(NMRestoreError, match="integer multiple"),
    ):
        engine(torch.rand(1, 3, 12, 12))
    with (
        pytest.raises(ValueError, match="compile_sparse"),
        use_spatial_routes(_routed(), _route_map(10, 10, 5)),
    ):
        pass


def test_dense_convs_put_the_dense_first_and_last_convs_on_the_kernel_where_timed_faster(tmp_path: Path) -> None:
    if load_kernel() is None:  # pragma: no cover - only without a compiler
        pytest.skip("sparse kernel unavailable on this machine")
    model = _routed(4)
    engine = compile_sparse(model, EngineConfig(dense_convs=True))
    wrapped = {layer.layer_name: layer for layer in sparse_layers(engine)}
    assert {"head.0", "tail.1"} <= set(wrapped) and not wrapped["tail.1"].routed
    assert all(u.layer not in ("head.0", "tail.1") for u in engine_state(engine).untouched)  # type: ignore[union-attr]
    x = torch.rand(1, 3, 13, 22)
    route_map = _route_map(13, 22, 5)
    with torch.no_grad(), use_spatial_routes(engine, route_map):
        out = engine(x)
    assert (out - _reference(model, x, route_map)).abs().max() <= TOL
    timed = [d for d in engine_state(engine).table() if d.layer == "tail.1"]  # type: ignore[union-attr]
    assert timed and timed[0].nm == "-" and timed[0].reason == "timed"  # max_density does not skip it
    with pytest.raises(NMRestoreError, match="routes"):  # dense convs are saved; several routes are not
        save_compiled(engine, tmp_path / "x.nmc")


def test_side_by_side_tiles_of_a_route_merge_into_whole_blocks_and_a_rest() -> None:
    tiles = [
        (0, 0, 32, 32, 1), (0, 32, 32, 32, 1), (0, 64, 32, 32, 1),  # a run of 96 columns
        (0, 96, 32, 32, 0),  # another route breaks the run
        (0, 128, 32, 16, 1),  # route 1 again, not touching the run
        (32, 0, 32, 32, 1), (32, 32, 16, 32, 1),  # another row; another height
        (64, 0, 8, 32, 2), (64, 32, 8, 32, 2),  # 64 columns: one whole block
    ]  # fmt: skip
    assert sorted(merge_runs(tiles, 64)) == sorted([
        (0, 0, 32, 64, 1), (0, 64, 32, 32, 1),
        (0, 96, 32, 32, 0),
        (0, 128, 32, 16, 1),
        (32, 0, 32, 32, 1), (32, 32, 16, 32, 1),
        (64, 0, 8, 64, 2),
    ])  # fmt: skip
    assert merge_runs([], 64) == []


def test_long_runs_of_one_route_on_the_kernel_equal_per_pixel_mixing() -> None:
    # rows of 30 tiles of 5 pixels, mostly one route: runs of up to 150 columns, merged and cut
    # into whole kernel blocks and a rest (merge_runs), at LR and at 2x after the upsampler
    if load_kernel() is None:  # pragma: no cover - only without a compiler
        pytest.skip("sparse kernel unavailable on this machine")
    model = _routed(2)
    engine = compile_sparse(model, EngineConfig(tactic="sparse"))
    x = torch.rand(1, 3, 10, 150)
    routes = torch.full((2, 30), 1, dtype=torch.int64)  # 2:4, which runs on the kernel
    routes[0, 7], routes[1, 20:23] = 0, 2
    route_map = RouteMap(routes, 5, (10, 150))
    with torch.no_grad(), use_spatial_routes(engine, route_map):
        out = engine(x)
    assert (out - _reference(model, x, route_map)).abs().max() <= TOL
