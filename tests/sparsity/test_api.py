"""The mask parametrization and sparsify_/squash_/check_nm on real layers."""

from __future__ import annotations

import copy
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from pydantic import ValidationError
from torch import nn

from nmrestore.errors import SparsityError
from nmrestore.sparsity import (
    GradMode,
    NMConfig,
    NMMask,
    check_nm,
    nm_layers,
    nm_mask_of,
    nm_patterns,
    refresh_,
    set_route,
    sparsify_,
    squash_,
    use_route,
)
from nmrestore.sparsity.parametrization import dense_weight
from tests.nets import TinyEDSR


def _one_layer(grad_mode: str) -> tuple[nn.Linear, torch.Tensor]:
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -3.0, 2.0, -0.5]]))
    model = nn.Sequential(layer)
    sparsify_(model, NMConfig(n=2, m=4, grad_mode=grad_mode), filter_fn=lambda name, mod: True)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    model(x).sum().backward()
    return layer, x


def test_hard_gradient_masks_pruned_weights() -> None:
    layer, _x = _one_layer("hard")
    assert layer.parametrizations.weight.original.grad.tolist() == [[0.0, 2.0, 3.0, 0.0]]


def test_ste_gradient_is_dense() -> None:
    layer, _x = _one_layer("ste")
    assert layer.parametrizations.weight.original.grad.tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_srste_gradient_adds_decay_on_pruned_weights() -> None:
    layer, x = _one_layer("srste")
    lam = 2e-4
    w = torch.tensor([1.0, -3.0, 2.0, -0.5])
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0])
    expected = x[0] + lam * (1 - mask) * w  # g + lambda (1 - mask) w
    torch.testing.assert_close(layer.parametrizations.weight.original.grad[0], expected, rtol=0, atol=1e-7)


def test_forward_uses_masked_weight() -> None:
    layer, _ = _one_layer("hard")
    assert layer.weight.tolist() == [[0.0, -3.0, 2.0, 0.0]]


def test_report_lists_dense_layers_with_reasons() -> None:
    model = TinyEDSR(scale=2, channels=8, blocks=2)
    report = sparsify_(model, NMConfig(n=2, m=4, dense_first_last=False))
    dense = {d.name: d.reason for d in report.dense}
    assert dense == {"head": "3 input channels per group, not a multiple of M=4"}
    assert {p.name for p in report.pruned} >= {"body.0.body.0", "tail"}
    assert "3 input channels" in report.table()


def test_first_and_last_dense_by_default_and_filter_fn_overrides() -> None:
    model = TinyEDSR(scale=2, channels=8, blocks=1)
    report = sparsify_(model, NMConfig(n=2, m=4))
    assert "tail" in {d.name for d in report.dense}
    model = TinyEDSR(scale=2, channels=8, blocks=1)
    report = sparsify_(model, NMConfig(n=2, m=4), filter_fn=lambda name, mod: not name.startswith("body"))
    assert {p.name for p in report.pruned} == {"upsample.0", "tail"}


def test_depthwise_and_grouped_convs() -> None:
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 1))
    report = sparsify_(model, NMConfig(n=2, m=4), filter_fn=lambda n, m: True)
    assert [d.reason for d in report.dense] == ["depthwise convolution"]
    check_nm(model)
    assert nm_mask_of(model[1]).ranks.shape == (8, 4, 3, 3)


def test_conv_transpose_groups_on_axis_zero() -> None:
    deconv = nn.ConvTranspose2d(8, 3, 4, stride=2)
    model = nn.Sequential(deconv)
    sparsify_(model, NMConfig(n=1, m=4), filter_fn=lambda n, m: True)
    assert nm_mask_of(deconv).in_axis == 0
    w = deconv.weight.detach()
    assert bool(((w != 0).reshape(2, 4, 3, 4, 4).sum(1) <= 1).all())


def test_no_eligible_layer_is_a_clear_error() -> None:
    with pytest.raises(SparsityError, match="not a multiple of M=32"):
        sparsify_(nn.Sequential(nn.Conv2d(3, 16, 3)), NMConfig(n=2, m=32))


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"N must be in 1\.\.M=4"):
        NMConfig(n=5, m=4)
    with pytest.raises(ValidationError, match="extra"):
        NMConfig(n=2, m=4, typo=1)  # type: ignore[call-arg]


@settings(max_examples=15, deadline=None)
@given(pattern=st.sampled_from([(1, 4), (2, 4), (3, 4), (2, 8), (1, 8)]), seed=st.integers(0, 1000))
def test_squashed_output_equals_masked_output(pattern: tuple[int, int], seed: int) -> None:
    torch.manual_seed(seed)
    n, m = pattern
    model = TinyEDSR(scale=2, channels=8, blocks=2)
    sparsify_(model, NMConfig(n=n, m=m))
    x = torch.rand(1, 3, 6, 7)
    masked = model(x)
    patterns = nm_patterns(model)
    squash_(model)
    assert not list(nm_layers(model))
    torch.testing.assert_close(model(x), masked, rtol=0, atol=0)
    check_nm(model, patterns)


def test_check_nm_rejects_a_broken_pattern() -> None:
    model = TinyEDSR(scale=2, channels=8, blocks=1)
    sparsify_(model, NMConfig(n=2, m=4))
    check_nm(model)
    patterns = nm_patterns(model)
    squash_(model)
    with torch.no_grad():
        model.body[0].body[0].weight.fill_(1.0)
    with pytest.raises(SparsityError, match=r"body\.0\.body\.0 has a group with 4 > N=2"):
        check_nm(model, patterns)
    # corrupt ranks of a masked model
    model = TinyEDSR(scale=2, channels=8, blocks=1)
    sparsify_(model, NMConfig(n=2, m=4))
    nm_mask_of(model.body[0].body[0]).ranks.zero_()
    with pytest.raises(SparsityError, match="pattern broken"):
        check_nm(model)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), routes=st.sampled_from([(2,), (1, 2, 4), (4, 2)]))
def test_state_dict_round_trip_gives_identical_ranks_and_outputs(seed: int, routes: tuple[int, ...]) -> None:
    torch.manual_seed(seed)
    model = TinyEDSR(scale=2, channels=8, blocks=2)
    sparsify_(model, NMConfig(m=4, routes=routes))
    with torch.no_grad():  # train a little so ranks differ from a fresh model's
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    refresh_(model)
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(seed + 1)
    fresh = TinyEDSR(scale=2, channels=8, blocks=2)
    sparsify_(fresh, NMConfig(m=4, routes=routes))
    fresh.load_state_dict(state)
    x = torch.rand(1, 3, 5, 5)
    for route in range(len(routes)):
        with use_route(model, route), use_route(fresh, route):
            torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    for (_, _, a), (_, _, b) in zip(nm_layers(model), nm_layers(fresh), strict=True):
        assert torch.equal(a.ranks, b.ranks)
        assert torch.equal(a.route_n, b.route_n)


def test_routes_are_nested_and_switch_for_the_whole_model() -> None:
    model = TinyEDSR(scale=2, channels=8, blocks=1)
    sparsify_(model, NMConfig(m=4, routes=(1, 2, 4)))
    layer = model.body[0].body[0]
    nonzero = []
    for route in range(3):
        with use_route(model, route):
            assert all(mask.route == route for _, _, mask in nm_layers(model))
            nonzero.append(layer.weight != 0)
    assert bool((nonzero[0] <= nonzero[1]).all() and (nonzero[1] <= nonzero[2]).all())
    assert all(mask.route == 0 for _, _, mask in nm_layers(model))
    set_route(model, 2)
    assert torch.equal(layer.weight, dense_weight(layer))
    with pytest.raises(SparsityError, match="route 3 does not exist"):
        set_route(model, 3)


def test_refresh_follows_the_weights() -> None:
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():  # a fixed start, so the stale mask is known: it keeps position 0
        layer.weight.copy_(torch.tensor([[9.0, 1.0, 1.0, 1.0]]))
    model = nn.Sequential(layer)
    sparsify_(model, NMConfig(n=1, m=4), filter_fn=lambda n, m: True)
    with torch.no_grad():
        dense_weight(layer).copy_(torch.tensor([[0.0, 0.0, 0.0, 5.0]]))
    assert layer.weight.tolist() == [[0.0, 0.0, 0.0, 0.0]]  # ranks are stale until refreshed
    refresh_(model)
    assert layer.weight.tolist() == [[0.0, 0.0, 0.0, 5.0]]


def test_mask_is_a_parametrization_with_grad_mode() -> None:
    model = TinyEDSR(scale=2, channels=8, blocks=1)
    sparsify_(model, NMConfig(n=2, m=4, grad_mode=GradMode.SRSTE))
    masks = [mask for _, _, mask in nm_layers(model)]
    assert masks and all(isinstance(mask, NMMask) and mask.grad_mode is GradMode.SRSTE for mask in masks)
    assert "parametrizations.weight.0.ranks" in "".join(model.state_dict())


def test_squashing_a_deep_copy_leaves_the_original_working() -> None:
    model = TinyEDSR(scale=2, channels=8, blocks=1)
    sparsify_(model, NMConfig(n=2, m=4))
    x = torch.rand(1, 3, 5, 5)
    before = model(x)
    clone = copy.deepcopy(model)
    squash_(clone)
    torch.testing.assert_close(clone(x), before, rtol=0, atol=0)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert list(nm_layers(model))


def test_controller_hooks_default_to_nothing(tmp_path: Path) -> None:
    from nmrestore.sparsity.api import Controller

    controller = Controller()
    model = nn.Linear(4, 4)
    controller.step(1)
    controller.finalize()
    controller.load_state_dict({})
    assert controller.regularizer() == {} and controller.state_dict() == {} and controller.metrics() == {}
    assert controller.param_groups(model) == [] and controller.write_artifacts(model, tmp_path) == []
    assert controller.find_unused_parameters is False
