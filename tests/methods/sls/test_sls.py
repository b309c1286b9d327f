"""SLS: learned layer-wise N under a compute budget (Oh et al., CVPR 2022)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from nmrestore.cost import count_cost
from nmrestore.errors import BudgetError
from nmrestore.methods.sls import SLSConfig
from nmrestore.methods.sls.controller import SLSController
from nmrestore.methods.sls.mask import SLSMask, sls_masks
from nmrestore.methods.sls.report import achieved_budget, format_sls_table, plot_n_per_layer, sls_layer_table
from nmrestore.methods.srste import SRSTEConfig
from nmrestore.sparsity import check_nm, nm_layers, sparsify_
from nmrestore.sparsity.parametrization import dense_weight
from tests.nets import TinyEDSR

SIZE = (8, 8)  # LR input used for MAC counts and forwards: keeps every test fast


def make_model(seed: int = 0) -> TinyEDSR:
    torch.manual_seed(seed)
    return TinyEDSR(scale=2, channels=16, blocks=2)


def sls(model: nn.Module, **kw: object) -> SLSController:
    options: dict[str, object] = {"m": 8, "input_size": SIZE, **kw}
    controller = sparsify_(model, SLSConfig(**options)).controller
    assert isinstance(controller, SLSController)
    return controller


def lone_mask(scores: list[float], clamp: float = 1.03) -> SLSMask:
    m = len(scores) + 1
    mask = SLSMask(torch.randn(4, m, 3, 3), m, score_clamp=clamp)
    with torch.no_grad():
        mask.scores.copy_(torch.tensor(scores))
    return mask


# -- scores -> N ---------------------------------------------------------------------------------
def test_scores_map_to_n_where_the_cumulative_priority_drops_below_half() -> None:
    mask = lone_mask([1, 1, 0.4, 1, 1, 1, 1])
    assert mask.scores_n() == 3  # p = [1, 1, 0.4, ...]: ranks 1 and 2 kept, rank 0 always
    assert mask.keep().tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert lone_mask([1.0] * 7).scores_n() == 8
    assert lone_mask([0.3] + [1.0] * 6).scores_n() == 1
    # the mask is the N best ranks, whatever the weights
    weight = torch.randn(4, 8, 3, 3)
    mask.refresh(weight)
    assert torch.equal(mask.mask(), (mask.ranks < 3).float())


def test_clamp_caps_the_growth_of_the_priority() -> None:
    big = lone_mask([5.0, 5.0, 5.0, 0.4, 1, 1, 1])
    expected = [1.03, 1.03**2, 1.03**3, 1.03**3 * 0.4]
    assert torch.allclose(big.priorities()[:4], torch.tensor(expected))
    assert big.scores_n() == 4  # 1.03**3 * 0.4 = 0.437 < 0.5; unclamped (5**3 * 0.4) it would stay kept
    assert lone_mask([5.0, 5.0, 5.0, 0.4, 1, 1, 1], clamp=10.0).scores_n() == 8
    # with 10 factors of 1.03 before it, the same 0.4 keeps p at 0.538 > 0.5
    assert lone_mask([1.03] * 10 + [0.4] + [1.0] * 4).scores_n() == 16


def test_kept_ranks_are_always_a_prefix() -> None:
    # p = 0.45 * 1.03**k climbs back above 0.5 at k = 4; rank 5 must not come back without ranks 1-4
    mask = lone_mask([0.45] + [1.03] * 6)
    assert mask.priorities()[4] > 0.5
    assert mask.scores_n() == 1
    assert mask.keep().tolist() == [1, 0, 0, 0, 0, 0, 0, 0]


# -- gradients -----------------------------------------------------------------------------------
def test_task_gradient_reaches_the_scores_through_the_ste() -> None:
    model = make_model()
    controller = sls(model)
    x, y = torch.rand(2, 3, *SIZE), torch.rand(2, 3, 16, 16)
    (model(x) - y).abs().mean().backward()
    grads = torch.stack([mask.scores.grad for mask in controller.masks])
    assert torch.isfinite(grads).all()
    assert (grads != 0).any(dim=1).all()  # every layer's scores hear from the task loss


def test_cost_gradient_pushes_every_score_down() -> None:
    model = make_model()
    controller = sls(model)
    cost = controller.regularizer()["sls_cost"]
    assert cost.item() == pytest.approx(controller.config.lam)  # dense start: C / C_ref = 1
    cost.backward()
    for mask in controller.masks:
        assert (mask.scores.grad > 0).all()
    before = [mask.scores.detach().clone() for mask in controller.masks]
    torch.optim.SGD([mask.scores for mask in controller.masks], lr=0.1).step()
    assert all((mask.scores < b).all() for mask, b in zip(controller.masks, before, strict=True))


# -- the search ----------------------------------------------------------------------------------
def run_search(model: nn.Module, controller: SLSController, steps: int, start: int = 1) -> int | None:
    """Adam on L1 + the cost term; returns the step at which N froze (None if it did not)."""
    torch.manual_seed(1)
    x, y = torch.rand(4, 3, *SIZE), torch.rand(4, 3, 16, 16)
    groups = controller.param_groups(model)
    in_groups = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.parameters() if id(p) not in in_groups]
    optimizer = torch.optim.Adam([{"params": rest}, *groups], lr=1e-3)
    frozen_at = None
    for step in range(start, start + steps):
        optimizer.zero_grad()
        loss = (model(x) - y).abs().mean() + sum(controller.regularizer().values())
        loss.backward()
        optimizer.step()
        controller.step(step)
        if controller.frozen and frozen_at is None:
            frozen_at = step
    return frozen_at


def test_a_short_search_reaches_the_budget_and_freezes(caplog: pytest.LogCaptureFixture) -> None:
    model = make_model()
    controller = sls(
        model, budget=0.5, lam=1.0, score_lr=0.01, anneal_interval=5, refresh_every=10, refresh_after_freeze=False
    )
    assert [g["lr"] for g in controller.param_groups(model)] == [0.01]
    with caplog.at_level(logging.INFO, logger="nmrestore.methods.sls"):
        frozen_at = run_search(model, controller, 25)
    assert frozen_at is not None and frozen_at > 5, controller.state_dict()
    assert not controller.projected
    assert "budget met" in caplog.text
    assert controller.fraction() <= 0.5
    assert achieved_budget(model, controller.config) == pytest.approx(controller.fraction())
    assert controller.regularizer() == {}
    ns = controller.ns()
    scores = [mask.scores.detach().clone() for mask in controller.masks]
    ranks = [mask.ranks.clone() for mask in controller.masks]
    run_search(model, controller, 3, start=100)  # fine-tuning: N, masks and scores stay put
    assert controller.ns() == ns
    assert all(torch.equal(m.scores, s) for m, s in zip(controller.masks, scores, strict=True))
    assert all(torch.equal(m.ranks, r) for m, r in zip(controller.masks, ranks, strict=True))
    assert all(not m.scores.requires_grad and not m.learns_keep for m in controller.masks)
    check_nm(model)


def test_refresh_after_freeze_keeps_moving_the_masks_but_not_n() -> None:
    model = make_model()
    controller = sls(
        model,
        budget=0.5,
        lam=1.0,
        score_lr=0.01,
        anneal_interval=5,
        refresh_every=1,
        refresh_after_freeze=True,
    )
    frozen_at = run_search(model, controller, 25)
    assert frozen_at is not None, controller.state_dict()
    ns = controller.ns()
    ranks = [mask.ranks.clone() for mask in controller.masks]
    run_search(model, controller, 5, start=100)  # fine-tuning: N stays, the kept weights may change
    assert controller.ns() == ns and controller.frozen
    assert any(not torch.equal(m.ranks, r) for m, r in zip(controller.masks, ranks, strict=True))
    for module, mask in zip(controller.modules, controller.masks, strict=True):  # ranks are current
        expected = (mask.ranks < mask.n).float()
        assert torch.equal(mask.mask(), expected)
        fresh = SLSMask(module.parametrizations.weight.original.detach(), mask.m)
        assert torch.equal(fresh.ranks, mask.ranks)
    assert achieved_budget(model, controller.config) <= 0.5
    check_nm(model)


def test_refresh_after_freeze_honours_refresh_every() -> None:
    model = make_model()
    controller = sls(model, budget=0.25, search_steps=0, refresh_every=3, refresh_after_freeze=True)
    controller.finalize()
    assert controller.frozen
    calls: list[int] = []
    controller._refresh = lambda: calls.append(controller.steps)  # type: ignore[method-assign]
    for step in range(1, 8):
        controller.step(step)
    assert calls == [3, 6]


def test_frozen_srste_sls_fine_tunes_exactly_like_srste() -> None:
    """At uniform N, SLS with SR-STE gradients and refresh every step after freezing *is* SR-STE."""
    sls_model, srste_model = make_model(0), make_model(0)
    controller = sls(
        sls_model, budget=0.25, grad_mode="srste", refresh_every=1, refresh_after_freeze=True, search_steps=0
    )
    controller.finalize()  # untouched scores: projected onto uniform 2:8
    assert controller.frozen and controller.ns() == [2] * len(controller.masks)
    srste_controller = sparsify_(srste_model, SRSTEConfig(n=2, m=8, refresh_every=1)).controller
    torch.manual_seed(3)
    x, y = torch.rand(4, 3, *SIZE), torch.rand(4, 3, 16, 16)
    optimizers = [
        torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for model in (sls_model, srste_model)
    ]
    for step in range(1, 6):
        for model, ctrl, optimizer in zip(
            (sls_model, srste_model), (controller, srste_controller), optimizers, strict=True
        ):
            optimizer.zero_grad()
            (model(x) - y).abs().mean().backward()
            optimizer.step()
            ctrl.step(step)
    with torch.no_grad():
        assert torch.equal(sls_model(x), srste_model(x))
    for (_, _, a), (_, _, b) in zip(sls_masks(sls_model), nm_layers(srste_model), strict=True):
        assert torch.equal(a.ranks, b.ranks)


def test_meeting_the_budget_freezes_n_and_drops_the_cost_term() -> None:
    model = make_model()
    controller = sls(model, budget=0.5)
    assert "sls_cost" in controller.regularizer()
    for i, mask in enumerate(controller.masks):  # N = 2 or 3 of 8, by hand
        with torch.no_grad():
            mask.scores.copy_(torch.tensor([1.0, 1.0 if i % 2 else 0.4, 0.4, 1, 1, 1, 1]))
    controller.step(7)
    assert controller.frozen and controller.frozen_at == 7
    assert controller.ns() == [3 if i % 2 else 2 for i in range(len(controller.masks))]
    assert controller.regularizer() == {}
    # the frozen N lives in route_n, so the cost report sees it
    report = count_cost(model, SIZE)
    assert [layer.ns for layer in report.layers if layer.prunable] == [(n,) for n in controller.ns()]
    # moving the scores after freezing changes nothing
    with torch.no_grad():
        for mask in controller.masks:
            mask.scores.fill_(1.0)
    assert controller.ns() == [3 if i % 2 else 2 for i in range(len(controller.masks))]


def test_an_unfinished_search_is_projected_onto_the_budget(caplog: pytest.LogCaptureFixture) -> None:
    model = make_model()
    controller = sls(model, budget=0.3, search_steps=1)
    with torch.no_grad():  # give the layers different confidences
        for i, mask in enumerate(controller.masks):
            mask.scores.fill_(0.9 + 0.02 * i)
    with caplog.at_level(logging.WARNING, logger="nmrestore.methods.sls"):
        controller.step(1)
    assert controller.frozen and controller.projected
    assert "projected" in controller.message and "projected" in caplog.text
    assert controller.fraction() <= 0.3
    assert achieved_budget(model, controller.config) <= 0.3
    assert controller.regularizer() == {}
    check_nm(model)


def test_finalize_guarantees_the_budget() -> None:
    model = make_model()
    controller = sls(model, budget=0.25)
    controller.finalize()  # the scores never moved: no layer is preferred
    assert controller.projected and controller.frozen
    assert achieved_budget(model, controller.config) <= 0.25
    assert controller.ns() == [2] * len(controller.masks)  # uniform 2:8, not one layer at 1:8


def test_projection_lowers_the_least_confident_layer_first() -> None:
    model = make_model()
    controller = sls(model, budget=0.99, budget_kind="params", search_steps=0)
    with torch.no_grad():
        for mask in controller.masks:
            mask.scores.fill_(1.0)
        controller.masks[2].scores[-1] = 0.55  # this layer's last rank is the one the search doubts
    controller.step(0)
    ns = controller.ns()
    assert ns[2] == 7 and all(n == 8 for i, n in enumerate(ns) if i != 2)


def test_a_budget_below_one_of_m_everywhere_is_refused() -> None:
    with pytest.raises(BudgetError, match=r"0\.1250"):
        sls(make_model(), budget=0.1)
    model = make_model()
    report = count_cost(model, SIZE)
    prunable = sum(layer.dense_macs for layer in report.layers if layer.name not in ("head", "tail"))
    minimum = (report.dense_macs - prunable * 7 / 8) / report.dense_macs  # head and tail stay dense
    with pytest.raises(BudgetError, match="below what sls can reach"):
        sls(model, budget=minimum * 0.99, budget_kind="macs")
    assert not list(sls_masks(model))  # nothing was attached
    controller = sls(model, budget=minimum * 1.001, budget_kind="macs", search_steps=0)
    controller.step(0)
    assert controller.ns() == [1] * len(controller.masks)


def test_anneal_raises_the_coefficient_when_compression_stalls() -> None:
    model = make_model()
    controller = sls(model, budget=0.25, anneal_interval=2, anneal_threshold=0.2, alpha=1.5, refresh_every=0)
    for step in range(1, 6):  # the scores never move: the ratio stalls
        controller.step(step)
    assert controller.coef == pytest.approx(1.5**2)
    assert controller.regularizer()["sls_cost"].item() == pytest.approx(controller.config.lam * 1.5**2)


# -- checkpoints ---------------------------------------------------------------------------------
def _varied_scores(controller: SLSController) -> None:
    with torch.no_grad():
        for i, mask in enumerate(controller.masks):
            scores = torch.ones(7)
            scores[min(i, 6)] = 0.3
            mask.scores.copy_(scores)


@pytest.mark.parametrize("frozen", [True, False])
def test_per_layer_n_survive_a_state_dict_round_trip(frozen: bool) -> None:
    model = make_model(0)
    controller = sls(model, budget=0.6)
    _varied_scores(controller)
    if frozen:
        controller.step(3)
        assert controller.frozen
    model.eval()
    x = torch.rand(1, 3, *SIZE)
    with torch.no_grad():
        expected = model(x)
    state = json.loads(json.dumps(controller.state_dict()))

    fresh = make_model(1)
    fresh_controller = sls(fresh, budget=0.6)
    fresh.load_state_dict(model.state_dict())
    fresh_controller.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    assert fresh_controller.ns() == controller.ns()
    assert len(set(controller.ns())) > 1
    assert fresh_controller.frozen == frozen
    assert (fresh_controller.regularizer() == {}) == frozen
    assert fresh_controller.state_dict() == controller.state_dict()
    assert all(m.scores.requires_grad != frozen for m in fresh_controller.masks)


# -- budget kinds --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["prunable_macs", "macs", "params"])
def test_each_budget_kind_is_respected(kind: str) -> None:
    model = make_model()
    budget = 0.6 if kind == "macs" else 0.3
    controller = sls(model, budget=budget, budget_kind=kind, search_steps=1)
    controller.step(1)
    assert controller.frozen
    achieved = achieved_budget(model, controller.config)
    assert achieved <= budget
    assert achieved == pytest.approx(controller.fraction())
    report = count_cost(model, SIZE)
    if kind == "prunable_macs":
        assert achieved == pytest.approx(report.prunable_macs() / report.prunable_dense_macs)
    elif kind == "macs":
        assert achieved == pytest.approx(report.macs() / report.dense_macs)
    else:
        pruned = [layer for layer in report.layers if layer.prunable]
        kept = sum(layer.weight_params * layer.density() for layer in pruned)
        assert achieved == pytest.approx(kept / sum(layer.weight_params for layer in pruned))


def test_budget_one_needs_no_search() -> None:
    model = make_model()
    controller = sls(model, budget=1.0)
    assert controller.frozen and controller.ns() == [8] * len(controller.masks)


# -- models ----------------------------------------------------------------------------------------
def test_a_plain_sequential_is_searched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1),
        nn.ReLU(),
        nn.Conv2d(32, 3, 3, padding=1),
    )
    controller = sls(model, budget=0.4, search_steps=0)
    assert controller.layer_names() == ["2", "4"]
    controller.step(0)
    assert achieved_budget(model, controller.config) <= 0.4
    assert model(torch.rand(1, 3, *SIZE)).shape == (1, 3, *SIZE)


def test_a_zoo_model_is_searched() -> None:
    models = pytest.importorskip("nmrestore.models")
    try:
        model = models.create_model("edsr_small", scale=2)
    except Exception as exc:  # the zoo is written in parallel; TinyEDSR covers the rest
        pytest.skip(f"edsr_small unavailable: {exc}")
    controller = sparsify_(model, SLSConfig(m=8, budget=0.3, search_steps=0)).controller
    assert isinstance(controller, SLSController)
    controller.step(0)
    assert achieved_budget(model, controller.config) <= 0.3


# -- outputs -------------------------------------------------------------------------------------------
def test_layer_table_text_and_plot(tmp_path: Path) -> None:
    model = make_model()
    controller = sls(model, budget=0.5)
    _varied_scores(controller)
    controller.step(1)
    cost = count_cost(model, SIZE)
    rows = sls_layer_table(model, cost)
    assert [row["name"] for row in rows] == [layer.name for layer in cost.layers]
    pruned = [row for row in rows if row["n"] is not None]
    assert [row["n"] for row in pruned] == controller.ns()
    assert all(row["m"] == 8 and row["density"] == row["n"] / 8 for row in pruned)
    assert sum(row["share_of_macs"] for row in rows) == pytest.approx(
        sum(layer.dense_macs for layer in cost.layers) / cost.dense_macs
    )
    text = format_sls_table(rows)
    assert "body.0.body.0" in text and "dense" in text
    path = plot_n_per_layer(model, tmp_path / "plots" / "n.png", cost)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- config --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        {"budget": 0.0},
        {"budget": 1.5},
        {"alpha": 0.9},
        {"lam": 0.0},
        {"routes": (8, 16)},
        {"score_init": 1.1},
        {"m": 1},
        {"input_size": (0, 8)},
        {"budget_kind": "flops"},
        {"unknown": 1},
        {"anneal_rule": "paper"},
    ],
)
def test_config_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SLSConfig(**bad)


def test_config_defaults_follow_the_paper() -> None:
    config = SLSConfig()
    assert (config.m, config.grad_mode.value, config.alpha, config.score_init, config.score_clamp) == (
        32,
        "hard",
        1.2,
        1.0,
        1.03,
    )
    assert config.budget_kind == "prunable_macs"
    # the published code: update_pruning_units() every epoch, frozen or not; anneal on the last epoch's growth
    assert config.refresh_after_freeze is True and config.anneal_rule == "last_epoch"
    assert (config.refresh_every, config.anneal_interval, config.anneal_threshold) == (1000, 2000, 0.2)


@pytest.mark.parametrize("steps", [30, 300, 600])
def test_harness_settings_give_the_search_the_papers_annealing_budget(steps: int) -> None:
    from nmrestore.bench.sls import SLS_RATIO_GROWTH, sls_settings

    settings = sls_settings(steps, 2 / 32)
    config = SLSConfig(**{k: v for k, v in settings.items() if k != "method"})
    epochs = config.search_steps / (config.anneal_interval // 2)
    # the anneal rule asks for the published total compression-ratio growth (0.2 per epoch x 200 epochs)
    # per search, enough for the smallest budget the harness asks for (2:32: ratio 16)
    assert epochs * config.anneal_threshold == pytest.approx(SLS_RATIO_GROWTH)
    assert config.refresh_every == config.anneal_interval // 2  # masks re-selected every epoch
    assert SLS_RATIO_GROWTH >= 32 / 2 - 1
    assert config.search_steps == max(1, steps // 2) and config.grad_mode.value == "hard"


def test_masks_are_reselected_after_the_freeze_by_default_as_in_the_published_code() -> None:
    model = make_model()
    controller = sls(model, budget=0.5, lam=1.0, score_lr=0.01, anneal_interval=6, refresh_every=10)
    assert controller.config.refresh_after_freeze and controller.config.anneal_rule == "last_epoch"
    assert run_search(model, controller, 25) is not None
    ns = controller.ns()
    ranks = [mask.ranks.clone() for mask in controller.masks]
    with torch.no_grad():  # the weights move (as fine-tuning moves them): the magnitude order changes
        for module in controller.modules:
            weight = dense_weight(module)
            module.parametrizations.weight.original.copy_(torch.randn_like(weight))
    run_search(model, controller, 3, start=100)  # step 100 is an epoch end: masks re-selected
    assert controller.ns() == ns  # N stays frozen...
    assert any(not torch.equal(m.ranks, r) for m, r in zip(controller.masks, ranks, strict=True))  # ...masks move
    check_nm(model)


def published_annealing(ratios: list[float], threshold: float = 0.2, alpha: float = 1.2) -> float:
    """The specification: the published trainer's rule (JungHunOh/SLS_CVPR2022, trainer.py), transcribed.

    ``ratios[e - 1]`` is the compression ratio at the end of epoch ``e``; the trainer appends it to a
    list, and at every even epoch compares the list's last and first entries, then empties it.
    """
    coef, last2 = 1.0, []
    for epoch, ratio in enumerate(ratios, start=1):
        last2.append(ratio)
        if epoch > 1 and epoch % 2 == 0:
            if last2[-1] - last2[0] < threshold:
                coef *= alpha
            last2 = []
    return coef


def replay(rule: str, per_epoch: list[float], epoch_steps: int = 1000) -> float:
    controller = sls(make_model(), anneal_interval=2 * epoch_steps, anneal_threshold=0.2, anneal_rule=rule)
    ratio = 1.0
    for epoch, growth in enumerate(per_epoch):
        for k in range(1, epoch_steps + 1):  # the ratio rises steadily through each epoch
            controller._anneal(epoch * epoch_steps + k, ratio + growth * k / epoch_steps)
        ratio += growth
    return controller.coef


@pytest.mark.parametrize(
    "per_epoch",
    [
        [0.15] * 20,  # the case: every even epoch grew 0.15 < 0.2 -> 1.2 ** 10
        [0.05, 0.3, 0.1, 0.25, 0.3, 0.1, 0.15, 0.15] * 2 + [0.5, 0.0],  # a slower, uneven search
        [0.25] * 10,  # fast enough: never anneals
    ],
)
def test_annealing_replays_the_published_rule(per_epoch: list[float]) -> None:
    ends = list(np.cumsum([1.0, *per_epoch])[1:])
    expected = published_annealing(ends)
    assert replay("last_epoch", per_epoch) == pytest.approx(expected)
    if per_epoch == [0.15] * 20:
        assert expected == pytest.approx(1.2**10) and expected == pytest.approx(6.1917, abs=1e-4)
        # the earlier nmrestore rule (growth over the whole 2-epoch interval, 0.3 >= 0.2) never anneals
        assert replay("interval", per_epoch) == 1.0


def test_annealing_state_survives_a_checkpoint() -> None:
    first = sls(make_model(), anneal_interval=4, anneal_threshold=0.2)
    for step in range(1, 3):
        first._anneal(step, 1.0 + 0.01 * step)  # epoch 1 ends at step 2: its ratio is recorded
    second = sls(make_model(), anneal_interval=4, anneal_threshold=0.2)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for controller in (first, second):
        for step in range(3, 5):
            controller._anneal(step, 1.0 + 0.01 * step)
    assert first.coef == second.coef == pytest.approx(1.2)
