"""ClassPruning's pure parts: config, routes and masks, classifier MACs, labels, losses."""

from __future__ import annotations

import math

import pytest
import torch

from nmrestore.cost import count_cost
from nmrestore.errors import RecipeError
from nmrestore.methods.classpruning import ClassPruningConfig
from nmrestore.methods.classpruning.classifier import (
    RouteClassifier,
    classifier_macs,
    is_adaptive,
    route_classifier,
    route_costs,
)
from nmrestore.methods.classpruning.labels import budget_labels, delta_labels, quantile_labels
from nmrestore.methods.classpruning.losses import budget_loss, class_loss, equal_split_loss, expected_cost
from nmrestore.methods.classpruning.routes import layer_route_ns, nested_route_ns, set_layer_route_ns
from nmrestore.models import create_model
from nmrestore.recipes import load_recipe, recipe_from_dict
from nmrestore.sparsity import check_nm, get_route, nm_layers, sparsify_, use_route


def _tiny(**kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("edsr_small", scale=2, n_feats=8, n_blocks=2)
    config = ClassPruningConfig(
        m=4, routes=(1, 2, 4), classifier_channels=8, classifier_convs=1, patch_size=16, stride=12, **kw
    )
    sparsify_(model, config)
    return model


# -- config -------------------------------------------------------------------------------------
def test_config_defaults_and_validation() -> None:
    config = ClassPruningConfig()
    assert config.route_ns() == (8, 16, 32) and config.m == 32 and config.num_routes == 3
    assert (config.patch_size, config.stride, config.delta) == (32, 28, 0.1)
    with pytest.raises(ValueError, match="cheapest first"):
        ClassPruningConfig(routes=(16, 8, 32))
    with pytest.raises(ValueError, match="at least 2 routes"):
        ClassPruningConfig(routes=(8,))
    with pytest.raises(ValueError, match="stride"):
        ClassPruningConfig(patch_size=16, stride=20)
    with pytest.raises(ValueError, match="ascending"):
        ClassPruningConfig(route_budgets=(0.5, 0.25, 1.0))
    searched = ClassPruningConfig(route_budgets=(0.25, 1.0))
    assert searched.route_ns() == (32, 32)  # placeholders until the search
    again = ClassPruningConfig.model_validate(searched.model_dump(mode="json"))  # as a checkpoint reloads it
    assert again == searched


@pytest.mark.parametrize("name", ["demo_classpruning", "classpruning_edsr_baseline_x4_div2k"])
def test_shipped_recipes_validate(name: str) -> None:
    recipe = load_recipe(name)
    assert isinstance(recipe.sparsity, ClassPruningConfig)
    assert recipe.sparsity.method == "classpruning"


def test_recipe_rejects_unknown_classpruning_key() -> None:
    with pytest.raises(RecipeError, match=r"unknown key 'sparsity\.deltaa'"):
        recipe_from_dict({"sparsity": {"method": "classpruning", "deltaa": 0.1}})


# -- masks, routes, classifier --------------------------------------------------------------------
def test_handler_attaches_nested_routes_and_classifier() -> None:
    model = _tiny()
    assert is_adaptive(model)
    assert get_route(model) == 2  # plain forward = the full route
    layers = list(nm_layers(model))
    assert layers and all(mask.route_n.tolist() == [1, 2, 4] for _, _, mask in layers)
    check_nm(model)
    for _, _, mask in layers:  # nested: every weight kept by route k is kept by route k+1
        masks = []
        for k in range(3):
            mask.set_route(k)
            masks.append(mask.mask().bool())
        mask.set_route(2)
        assert bool((masks[0] <= masks[1]).all()) and bool((masks[1] <= masks[2]).all())
    x = torch.rand(2, 3, 16, 16)
    assert route_classifier(model)(x).shape == (2, 3)
    assert route_classifier(model).decide(x).shape == (2,)


def test_state_dict_restores_routes_classifier_and_shift() -> None:
    model = _tiny()
    clf = route_classifier(model)
    clf.cost_shift.fill_(0.7)
    set_layer_route_ns(model, {name: [1, 3, 4] for name in layer_route_ns(model)})
    fresh = _tiny()
    fresh.load_state_dict(model.state_dict())
    assert float(route_classifier(fresh).cost_shift) == pytest.approx(0.7)
    assert all(ns == [1, 3, 4] for ns in layer_route_ns(fresh).values())
    x = torch.rand(1, 3, 16, 16)
    for k in range(3):
        with use_route(model, k), use_route(fresh, k):
            assert torch.equal(model(x), fresh(x))


def test_nested_route_ns_is_a_running_max() -> None:
    assert nested_route_ns([[2, 8, 1], [4, 4, 2], [32, 32, 32]]) == [[2, 8, 1], [4, 8, 2], [32, 32, 32]]


def test_classifier_macs_match_hand_count() -> None:
    c, convs, k = 16, 2, 3
    clf = RouteClassifier(k, c, convs)
    positions = (32 // 4) ** 2
    expected = positions * (3 * 16 * c + convs * c * c + c * 32) + 32 * k
    assert classifier_macs(clf, (32, 32)) == expected


def test_route_costs_add_up_per_route() -> None:
    model = _tiny()
    costs = route_costs(model, (16, 16))
    report = count_cost(model, (16, 16))
    assert costs.num_routes == 3 and costs.dense_macs == report.dense_macs
    for k, n in enumerate((1, 2, 4)):
        by_hand = report.other_macs + sum(
            layer.dense_macs * (n / 4 if layer.prunable else 1.0) for layer in report.layers
        )
        assert costs.route_macs[k] == pytest.approx(by_hand)
        assert costs.prunable_macs[k] == pytest.approx(report.prunable_dense_macs * n / 4)
    assert costs.route_macs[2] == pytest.approx(costs.dense_macs)  # N = M is the dense network
    assert costs.classifier_macs == classifier_macs(route_classifier(model), (16, 16))
    fractions = costs.fractions()
    assert fractions[0] < fractions[1] < fractions[2]
    assert fractions[2] == pytest.approx(1 + costs.classifier_macs / costs.dense_macs)
    counts = [3, 1, 2]
    total = sum(n * m for n, m in zip(counts, costs.route_macs, strict=True)) + 6 * costs.classifier_macs
    assert costs.patches_macs(counts) == pytest.approx(total)
    # the classifier's buffer holds the same fractions
    assert route_classifier(model).route_cost.tolist() == pytest.approx(list(fractions))


# -- labels -----------------------------------------------------------------------------------------
def test_delta_labels_on_hand_made_psnrs() -> None:
    psnrs = torch.tensor(
        [
            [30.00, 30.05, 30.10],  # cheapest is exactly delta below the full route -> 0
            [29.00, 29.95, 30.00],  # only the middle one is close enough -> 1
            [29.00, 29.00, 30.00],  # nothing cheaper is close -> 2
            [31.00, 30.00, 30.00],  # a cheaper route beats the full one -> 0
            [math.inf, math.inf, math.inf],  # identical patches everywhere -> 0
            [25.00, math.inf, math.inf],  # the middle one is perfect -> 1
        ],
        dtype=torch.float64,
    )
    assert delta_labels(psnrs, 0.1).tolist() == [0, 1, 2, 0, 0, 1]
    assert delta_labels(psnrs, 0.0).tolist() == [2, 2, 2, 0, 0, 1]
    assert delta_labels(psnrs, 5.0).tolist() == [0, 0, 0, 0, 0, 1]


def test_quantile_labels_split_by_full_route_psnr() -> None:
    full = torch.tensor([30.0, 40.0, 20.0, 35.0, 25.0, 28.0])
    # highest PSNR (easiest) -> route 0: 40, 35 | 30, 28 | 25, 20
    assert quantile_labels(full, 3).tolist() == [1, 0, 2, 0, 2, 1]
    assert quantile_labels(torch.tensor([5.0, 5.0, 5.0, 5.0]), 2).tolist() == [0, 0, 1, 1]  # ties by index
    assert torch.bincount(quantile_labels(torch.rand(10), 3), minlength=3).tolist() == [4, 3, 3]


def _psnr(mse: float) -> float:
    return -10 * math.log10(mse)


def test_budget_labels_spend_the_budget_where_the_error_is() -> None:
    # Two patches, routes cost 0.25 / 0.5 / 1.0. Patch 0 is flat: the cheap route adds 1e-6 to its
    # MSE (a big dB loss: 1e-6 -> 2e-6 is -3 dB). Patch 1 is textured: the cheap route adds 1e-4
    # (0.41 dB of 1e-3 -> 1.1e-3). The middle route halves each extra error.
    costs = [0.25, 0.5, 1.0]
    mses = [[2e-6, 1.5e-6, 1e-6], [1.1e-3, 1.05e-3, 1e-3]]
    psnrs = torch.tensor([[_psnr(v) for v in row] for row in mses], dtype=torch.float64)
    # no budget pressure: the least error, cheapest on ties
    assert budget_labels(psnrs, costs, 1.0).tolist() == [2, 2]
    # average 0.625: the flat patch goes cheapest and the textured one stays on the full route,
    # the opposite of a per-patch dB threshold (delta 0.5 dB would label them [2, 0])
    assert budget_labels(psnrs, costs, 0.625).tolist() == [0, 2]
    assert delta_labels(psnrs, 0.5).tolist() == [2, 0]
    # 0.375: the textured patch drops to the middle route, never below the flat one's
    assert budget_labels(psnrs, costs, 0.375).tolist() == [0, 1]
    # below the cheapest route: the cheapest everywhere
    assert budget_labels(psnrs, costs, 0.1).tolist() == [0, 0]
    # a cheaper route as good as the full one is taken even without budget pressure
    same = torch.tensor([[30.0, 30.0, 30.0]], dtype=torch.float64)
    assert budget_labels(same, costs, 1.0).tolist() == [0]


def test_budget_labels_meet_the_target_and_beat_uniform_routing() -> None:
    gen = torch.Generator().manual_seed(0)
    full = 1e-4 * torch.rand(200, generator=gen, dtype=torch.float64) ** 2 + 1e-6
    extra = torch.stack([full * 0.8, full * 0.2, torch.zeros_like(full)], dim=1)
    mse = full[:, None] + extra * torch.rand(200, 3, generator=gen, dtype=torch.float64)
    psnrs = -10 * torch.log10(mse)
    costs = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    for target in (0.3, 0.5, 0.7):
        labels = budget_labels(psnrs, costs, target)
        assert float(costs[labels].mean()) <= target + 1e-12
        chosen = mse[torch.arange(200), labels].mean()
        # any other assignment with the same route counts costs as much and errs at least as much
        shuffled = labels[torch.randperm(200, generator=gen)]
        assert chosen <= mse[torch.arange(200), shuffled].mean()
    with pytest.raises(ValueError, match="costs"):
        budget_labels(psnrs, [0.5, 1.0], 0.5)


# -- losses on probabilities -----------------------------------------------------------------------
def _classsr_class_loss(p: torch.Tensor) -> torch.Tensor:
    """ClassSR's formula for 3 classes, written out."""
    total = 0
    for row in p:
        spread = abs(row[0] - row[1]) + abs(row[0] - row[2]) + abs(row[1] - row[2])
        total = total + (2 - spread)
    return total / len(p)


def _classsr_average_loss(p: torch.Tensor) -> torch.Tensor:
    n = len(p)
    sums = p.sum(0)
    return sum(abs(s - n / 3) for s in sums) / ((n / 3) * 4)


def test_class_loss_on_hand_made_probabilities() -> None:
    one_hot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    uniform = torch.full((4, 3), 1 / 3)
    assert float(class_loss(one_hot)) == pytest.approx(0.0)
    assert float(class_loss(uniform)) == pytest.approx(2.0)
    assert float(class_loss(torch.tensor([[0.5, 0.5]]))) == pytest.approx(1.0)  # K = 2: 1 - 0
    p = torch.softmax(torch.randn(7, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    assert float(class_loss(p)) == pytest.approx(float(_classsr_class_loss(p)), abs=1e-6)
    logits = torch.zeros(1, 3, requires_grad=True)
    class_loss(torch.softmax(logits + torch.tensor([[0.1, 0.0, 0.0]]), dim=1)).backward()
    assert logits.grad is not None and float(logits.grad[0, 0]) < 0  # pushes the leading route up


def test_equal_split_loss_on_hand_made_probabilities() -> None:
    assert float(equal_split_loss(torch.eye(3))) == pytest.approx(0.0)
    all_on_one = torch.tensor([[1.0, 0.0, 0.0]] * 6)
    assert float(equal_split_loss(all_on_one)) == pytest.approx(1.0)
    assert float(equal_split_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))) == pytest.approx(1.0)
    p = torch.softmax(torch.randn(9, 3, generator=torch.Generator().manual_seed(2)), dim=1)
    assert float(equal_split_loss(p)) == pytest.approx(float(_classsr_average_loss(p)), abs=1e-6)


def test_budget_loss_on_hand_made_probabilities() -> None:
    costs = torch.tensor([0.25, 0.5, 1.0])
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # mean p = (0.5, 0, 0.5)
    assert float(expected_cost(probs, costs)) == pytest.approx(0.625)
    assert float(budget_loss(probs, costs, 0.5)) == pytest.approx(0.125)
    assert float(budget_loss(probs, costs, 0.7)) == pytest.approx(0.075)
    logits = torch.zeros(4, 3, requires_grad=True)
    budget_loss(torch.softmax(logits, dim=1), costs, 0.3).backward()  # expected 0.583 > 0.3
    assert logits.grad is not None
    assert bool((logits.grad[:, 0] < 0).all()) and bool((logits.grad[:, 2] > 0).all())  # towards cheap
