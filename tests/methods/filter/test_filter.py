"""Filter (channel) pruning to a MAC target through Torch-Pruning (the structured baseline)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from nmrestore.cost import count_cost
from nmrestore.errors import BudgetError, SparsityError
from nmrestore.methods.filter import FilterConfig
from nmrestore.methods.filter.controller import FilterController
from nmrestore.methods.filter.prune import filter_prune_, nm_budget_fraction, target_fraction_of
from nmrestore.models import create_model
from nmrestore.sparsity import NMConfig, nm_layers, sparsify_
from tests.nets import TinyEDSR

X = torch.rand(1, 3, 12, 10)


def edsr_small(scale: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("edsr_small", scale=scale)


@pytest.mark.parametrize(("scale", "target"), [(2, 0.5), (2, 0.1), (4, 0.25)])
def test_macs_land_within_two_percent_of_the_target(scale: int, target: float) -> None:
    model = edsr_small(scale)
    dense = count_cost(model).dense_macs
    report = filter_prune_(model, target)
    achieved = count_cost(model).dense_macs / dense
    assert report.within_tolerance
    assert abs(achieved - target) <= 0.02 * target
    assert report.achieved_fraction == pytest.approx(achieved)
    assert model(X).shape == (1, 3, 12 * scale, 10 * scale)


def test_residual_stream_is_pruned_as_one_group_and_output_channels_are_kept() -> None:
    model = edsr_small(2)
    report = filter_prune_(model, 0.3)
    stream = {"head.0", "body.0.body.2", "body.1.body.2", "body.2.body.2", "body.3.body.2", "body.4"}
    widths = {name: shape[0] for name, shape in report.shapes.items()}
    assert len({widths[name] for name in stream}) == 1  # coupled by the residual adds
    assert widths["head.0"] < 32
    for name in stream - {"head.0"}:
        assert report.shapes[name][1] in (widths["head.0"], widths[name.replace("body.2", "body.0")])
    # the upsampler's sub-pixel channels go in blocks of r**2 = 4; the last conv keeps 3 outputs
    sub_pixel = report.shapes["tail.1"][1]
    assert report.shapes["tail.0.0"][0] == 4 * sub_pixel < 128
    assert report.shapes["tail.1"][0] == 3
    assert report.protected == ["tail.1"]
    assert report.dense_shapes["head.0"] == (32, 3, 3, 3)


def test_shapes_depend_on_the_target_only_so_a_checkpoint_reloads_into_a_fresh_prune() -> None:
    trained, fresh = edsr_small(seed=0), edsr_small(seed=1)
    a = sparsify_(trained, FilterConfig(budget="8:32"))
    b = sparsify_(fresh, FilterConfig(budget="8:32"))
    assert isinstance(a.controller, FilterController) and isinstance(b.controller, FilterController)
    assert a.controller.report.shapes == b.controller.report.shapes
    fresh.load_state_dict(trained.state_dict())  # what model_from_checkpoint would do
    torch.testing.assert_close(fresh(X), trained(X))
    b.controller.load_state_dict(a.controller.state_dict())


def test_sparsify_prunes_channels_in_place_and_attaches_no_mask() -> None:
    model = edsr_small()
    head = model.head[0]
    target = nm_budget_fraction(model, 4, 32)
    report = sparsify_(model, FilterConfig(budget="4:32"))
    assert list(nm_layers(model)) == []
    assert model.head[0] is head and head.out_channels < 32
    controller = report.controller
    assert isinstance(controller, FilterController)
    assert controller.regularizer() == {}
    assert controller.report.target_fraction == pytest.approx(target)
    state = controller.state_dict()["filter"]
    assert state["within_tolerance"] and state["shapes"]["head.0"][0] == head.out_channels


def test_budget_target_equals_the_whole_network_fraction_of_uniform_nm() -> None:
    model = edsr_small()
    target = nm_budget_fraction(model, 2, 32)
    masked = edsr_small()
    sparsify_(masked, NMConfig(n=2, m=32))
    assert target == pytest.approx(count_cost(masked).macs_fraction(), rel=1e-12)
    assert target_fraction_of(model, FilterConfig(budget="2:32")) == pytest.approx(target)
    assert target_fraction_of(model, FilterConfig(target_macs_fraction=0.3)) == 0.3


def test_works_on_a_plain_user_network() -> None:
    torch.manual_seed(0)
    model = TinyEDSR(scale=2, channels=16, blocks=2)
    report = filter_prune_(model, 0.4, (8, 8))
    assert report.within_tolerance
    assert model(X).shape == (1, 3, 24, 20)
    assert report.protected == ["tail"]


def test_config_validation() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        FilterConfig()
    with pytest.raises(ValidationError, match="exactly one"):
        FilterConfig(budget="2:4", target_macs_fraction=0.5)
    with pytest.raises(ValidationError):
        FilterConfig(budget="2:4", n=2, m=4)  # N:M fields do not apply
    with pytest.raises(ValidationError, match="budget"):
        FilterConfig(budget="5:4")
    assert FilterConfig.changes_shapes


def test_impossible_targets_raise() -> None:
    with pytest.raises(BudgetError):
        filter_prune_(edsr_small(), 1.5)
    with pytest.raises(BudgetError, match="cannot go below"):
        filter_prune_(edsr_small(), 0.001)  # the last conv's outputs alone cost more
    masked = edsr_small()
    sparsify_(masked, NMConfig(n=2, m=4))
    with pytest.raises(SparsityError, match="dense model"):
        filter_prune_(masked, 0.5)
