"""ClassPruning's engine: patch grid and stitching, the pipeline, MAC accounting, stages, resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nmrestore.cost import count_cost
from nmrestore.data.datasets import split_holdout
from nmrestore.engine.checkpoint import load_checkpoint, save_checkpoint
from nmrestore.engine.runner import model_from_checkpoint, train
from nmrestore.errors import RecipeError, SparsityError
from nmrestore.methods.classpruning import ClassPruningConfig
from nmrestore.methods.classpruning.classifier import calibrate_shift, is_adaptive, route_classifier
from nmrestore.methods.classpruning.classmap import class_map, save_class_map
from nmrestore.methods.classpruning.patches import grid_positions, patch_starts
from nmrestore.methods.classpruning.pipeline import AdaptivePipeline, oracle_routes, patchwise_restore
from nmrestore.methods.classpruning.program.stages import train_adaptive
from nmrestore.methods.classpruning.program.tasks import JointTask, SandwichTask
from nmrestore.models import create_model
from nmrestore.recipes import recipe_from_dict
from nmrestore.sparsity import sparsify_, use_route
from tests.conftest import tiny_recipe_dict


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("edsr_small", scale=2, n_feats=8, n_blocks=1)
    config = ClassPruningConfig(
        m=4, routes=(1, 2, 4), classifier_channels=8, classifier_convs=1, patch_size=16, stride=12
    )
    sparsify_(model, config)
    with torch.no_grad():  # a classifier that actually uses several routes
        route_classifier(model).head.weight.normal_(0, 5.0)
    return model.eval()


# -- grid and stitching -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "patch", "stride"), [(40, 16, 12), (16, 16, 12), (10, 16, 12), (57, 32, 28), (64, 32, 32)]
)
def test_patch_starts_cover_every_pixel_inside_the_image(size: int, patch: int, stride: int) -> None:
    starts = patch_starts(size, patch, stride)
    p = min(patch, size)
    covered = np.zeros(size, dtype=bool)
    for s in starts:
        assert s >= 0 and s + p <= size
        covered[s : s + p] = True
    assert covered.all() and starts == sorted(set(starts))
    assert len(grid_positions(size, size, patch, stride)) == len(starts) ** 2


def _banded(h: int, w: int) -> torch.Tensor:
    """Noise whose brightness and contrast change across the image, so patches differ."""
    ramp = torch.linspace(0.05, 1.0, w).view(1, 1, 1, w)
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)) * ramp


def _mixing_shift(model: torch.nn.Module, lq: torch.Tensor) -> float:
    """A cost shift that sends these patches to more than one route."""
    from nmrestore.methods.classpruning.classifier import classifier_logits
    from nmrestore.methods.classpruning.patches import extract_patches

    clf = route_classifier(model)
    patches = extract_patches(lq, grid_positions(lq.shape[2], lq.shape[3], 16, 12), (16, 16))
    logits = classifier_logits(model, patches)
    mid = float(clf.route_cost.min() + clf.route_cost.max()) / 2
    return calibrate_shift(logits, clf.route_cost, mid)[0]


@pytest.mark.parametrize("blend", ["ramp", "mean"])
def test_stitched_patch_inference_equals_each_patch_run_alone(blend: str) -> None:
    model = _model()
    lq = _banded(37, 42)
    shift = _mixing_shift(model, lq)
    route_classifier(model).cost_shift.fill_(shift)
    result = AdaptivePipeline(model, 16, 12, batch_size=5, blend=blend)(lq)
    assert len(set(result.routes.tolist())) >= 2  # the check covers several routes
    # independent reference: every patch alone (batch of one), its own route, numpy accumulation
    clf = route_classifier(model)
    edge = np.minimum(np.arange(32), np.arange(32)[::-1]) + 0.5  # distance to the patch border
    weight = np.minimum(edge[:, None], edge[None, :]) if blend == "ramp" else np.ones((32, 32))
    total = np.zeros((3, 74, 84))
    count = np.zeros((1, 74, 84))
    with torch.no_grad():
        for t, s in grid_positions(37, 42, 16, 12):
            patch = lq[:, :, t : t + 16, s : s + 16]
            route = int(clf.decide(patch)[0])
            with use_route(model, route):
                out = model(patch)[0].double().numpy()
            total[:, 2 * t : 2 * t + 32, 2 * s : 2 * s + 32] += out * weight
            count[:, 2 * t : 2 * t + 32, 2 * s : 2 * s + 32] += weight
    reference = torch.from_numpy(total / count)[None]
    assert result.output.shape == (1, 3, 74, 84)
    assert torch.allclose(result.output.double(), reference, atol=1e-5)
    # batch size does not change the result beyond float rounding
    one_by_one = AdaptivePipeline(model, 16, 12, batch_size=1, blend=blend)(lq)
    assert torch.equal(one_by_one.routes, result.routes)
    assert torch.allclose(one_by_one.output, result.output, atol=1e-5)


def test_given_routes_replace_the_classifier_and_the_oracle_meets_its_budget() -> None:
    model = _model()
    lq = _banded(37, 42)
    pipeline = AdaptivePipeline(model, 16, 12, batch_size=5)
    decided = pipeline(lq)
    again = pipeline(lq, routes=decided.routes)
    assert torch.equal(again.output, decided.output) and torch.equal(again.routes, decided.routes)
    with pytest.raises(SparsityError, match="routes given"):
        pipeline(lq, routes=decided.routes[:-1])
    # the oracle on two images with ground truth (a 2x upscale of the input stands in for it)
    samples = [
        {"lq": lq[0], "gt": torch.nn.functional.interpolate(lq, scale_factor=2)[0]},
        {"lq": lq[0, :, :30, :30], "gt": torch.nn.functional.interpolate(lq[..., :30, :30], scale_factor=2)[0]},
    ]
    fractions = torch.tensor(pipeline.costs((16, 16)).fractions())
    for target in (0.0, float(fractions[1]), 1.5):
        routes = oracle_routes(pipeline, samples, crop_border=2, test_y_channel=True, target=target)
        assert [len(r) for r in routes] == [len(decided.routes), len(pipeline.patch_grid(30, 30)[1])]
        average = float(fractions[torch.cat(routes)].mean())
        assert average <= max(target, float(fractions[0])) + 1e-9
        if target == 0.0:
            assert all(int(r.max()) == 0 for r in routes)  # nothing is cheaper than the cheapest route
        result = pipeline(samples[0]["lq"], routes=routes[0])
        assert result.histogram == torch.bincount(routes[0], minlength=3).tolist()


def test_forced_full_route_equals_patchwise_full_network() -> None:
    model = _model()
    lq = torch.rand(1, 3, 30, 30)
    forced = AdaptivePipeline(model, 16, 12, force_route=2)(lq)
    assert forced.histogram == [0, 0, forced.num_patches]
    with torch.no_grad():
        reference = patchwise_restore(model, lq, 16, 12)
    assert torch.allclose(forced.output, reference, atol=1e-5)


def test_mac_accounting_adds_up_per_image() -> None:
    model = _model()
    lq = _banded(37, 42)
    result = AdaptivePipeline(model, 16, 12, shift=_mixing_shift(model, lq))(lq)
    costs = result.costs
    assert len([n for n in result.histogram if n]) >= 2
    hist = result.histogram
    assert sum(hist) == result.num_patches == len(grid_positions(37, 42, 16, 12))
    by_hand = (
        sum(n * m for n, m in zip(hist, costs.route_macs, strict=True)) + sum(hist) * costs.classifier_macs
    )
    # blending: one multiply-add per accumulated output value, one division per output value
    stitched = (result.num_patches * 16 * 16 + 37 * 42) * 4 * 3
    assert result.macs == pytest.approx(by_hand + stitched)
    assert result.dense_patch_macs == pytest.approx(
        result.num_patches * count_cost(model, (16, 16)).dense_macs
    )
    assert result.macs_fraction_per_patch == pytest.approx(by_hand / result.dense_patch_macs)
    whole = count_cost(model, (37, 42)).dense_macs
    assert result.whole_image_dense_macs == whole
    assert result.macs_fraction == pytest.approx((by_hand + stitched) / whole)  # whole image: the lead figure
    # convolutions cost the same per pixel: the patches' dense MACs are the whole image's times the overlap
    overlap = result.num_patches * 16 * 16 / (37 * 42)
    assert result.cost.overlap == pytest.approx(overlap)
    assert result.dense_patch_macs == pytest.approx(whole * overlap, rel=1e-9)
    assert result.summary()["route_histogram"] == hist


def test_class_map_paints_each_patch_and_saves(tmp_path: Path) -> None:
    model = _model()
    result = AdaptivePipeline(model, 16, 12)(torch.rand(1, 3, 30, 34))
    grid = class_map(result)
    assert grid.shape == (30, 34) and set(np.unique(grid)) <= set(result.routes.tolist())
    t, s = result.positions[-1]
    assert (grid[t:, s:] == int(result.routes[-1])).all()  # the last patch is painted last
    path = save_class_map(result, tmp_path / "map.png")
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] >= 68 and im.size[1] > 60


# -- calibration ------------------------------------------------------------------------------------
def test_calibrate_shift_finds_the_smallest_shift_meeting_the_target() -> None:
    costs = torch.tensor([0.25, 0.5, 1.0])
    logits = torch.randn(200, 3, generator=torch.Generator().manual_seed(3))
    logits[:, 2] += 2.0  # the classifier prefers the full route

    def average(tau: float) -> float:
        return float(costs[(logits - tau * costs).argmax(1)].mean())

    tau, reached = calibrate_shift(logits, costs, 0.5)
    assert reached == pytest.approx(average(tau)) and reached <= 0.5
    assert average(tau - 1e-3) > 0.5  # any smaller shift misses the target
    low, reached_low = calibrate_shift(logits, costs, 0.99)
    assert low < tau and reached_low <= 0.99
    _, reached_cheap = calibrate_shift(logits, costs, 0.1)  # below what routing can reach
    assert reached_cheap == pytest.approx(0.25)


# -- tasks ----------------------------------------------------------------------------------------
def test_sandwich_task_runs_full_smallest_and_a_middle_route() -> None:
    model = _model().train()
    task = SandwichTask(3)
    torch.manual_seed(0)
    assert task.routes_for_step() == [2, 0, 1]
    batch = {"lq": torch.rand(2, 3, 8, 8), "gt": torch.rand(2, 3, 16, 16)}
    losses = task.losses(model, batch)
    assert set(losses) == {"l1_full", "l1_smallest", "distill_smallest", "l1_random", "distill_random"}
    sum(losses.values()).backward()
    assert model.body[0].body[0].parametrizations.weight.original.grad is not None
    assert SandwichTask(2).routes_for_step() == [1, 0]


def test_joint_task_gradient_reaches_classifier_and_weights() -> None:
    model = _model().train()
    config = ClassPruningConfig(m=4, routes=(1, 2, 4), patch_size=16, stride=12, target_macs_fraction=0.5)
    task = JointTask(config, route_classifier(model).route_cost.tolist())
    losses = task.losses(model, {"lq": torch.rand(3, 3, 16, 16), "gt": torch.rand(3, 3, 32, 32)})
    assert set(losses) == {"l1", "class", "budget"}
    sum(losses.values()).backward()
    assert route_classifier(model).head.weight.grad is not None
    assert model.body[0].body[0].parametrizations.weight.original.grad is not None


def test_split_holdout_cuts_aligned_strips() -> None:
    hr = np.zeros((100, 60, 3), dtype=np.uint8)
    lr = np.zeros((50, 30, 3), dtype=np.uint8)
    small = np.zeros((20, 60, 3), dtype=np.uint8)
    (tg, tl), (hg, hl) = split_holdout(
        [("a", hr), ("b", small)], [("a", lr), ("b", small[:10, :30])], 2, 0.2, 8
    )
    assert [g.shape[0] for _, g in tg] == [80, 20] and [g.shape[0] for _, g in hg] == [20]
    assert tl is not None and hl is not None
    assert [x.shape[0] for _, x in tl] == [40, 10] and [x.shape[0] for _, x in hl] == [10]
    (tg0, _), (hg0, _) = split_holdout([("a", hr)], None, 2, 0.0, 8)
    assert hg0 == [] and tg0[0][1].shape == hr.shape


# -- the stages, resume, reload, CLI ----------------------------------------------------------------
def _recipe_dict(**sparsity: Any) -> dict[str, Any]:
    cfg = {
        "method": "classpruning",
        "m": 4,
        "routes": [1, 2, 4],
        "classifier_channels": 8,
        "classifier_convs": 1,
        "patch_size": 16,
        "stride": 12,
        "label_stride": 16,
        "classifier_steps": 4,
        "classifier_batch": 8,
        "joint_steps": 4,
        "holdout_fraction": 0.2,
        "target_macs_fraction": 0.6,
    }
    cfg.update(sparsity)
    data = tiny_recipe_dict(sparsity=cfg, train={"steps": 4, "val_every": 100, "ckpt_every": 2})
    data["data"]["train"]["patch_size"] = 16
    return data


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cp") / "run"
    train(recipe_from_dict(_recipe_dict()), run, show_progress=False)
    return run


def test_training_runs_every_stage_and_reloads(trained: Path) -> None:
    for stage in ("a", "b", "c"):
        assert (trained / f"stage_{stage}" / "checkpoints" / "last.safetensors").exists()
    final = load_checkpoint(trained / "checkpoints" / "best.safetensors")
    summary = final.meta["adaptive"]
    assert sum(summary["labels"]["histogram"]) == summary["labels"]["patches"] > 0
    assert summary["calibration"]["macs_fraction"] <= 0.6
    model, _ = model_from_checkpoint(final)
    assert is_adaptive(model)
    assert float(route_classifier(model).cost_shift) == pytest.approx(summary["calibration"]["shift"])
    assert sum(final.meta["metrics"]["val_route_histogram"]) > 0


def test_a_killed_stage_resumes_to_the_same_weights(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nmrestore.methods.classpruning.program import tasks as adaptive

    recipe = recipe_from_dict(_recipe_dict())
    calls = {"n": 0}
    real = adaptive.JointTask.losses

    def interrupted(self: Any, model: Any, batch: Any) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        if calls["n"] == 4:  # stage C's 4th step; its last checkpoint is step 2
            raise KeyboardInterrupt
        return real(self, model, batch)

    monkeypatch.setattr(adaptive.JointTask, "losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_adaptive(recipe, tmp_path / "cut", show_progress=False)
    monkeypatch.setattr(adaptive.JointTask, "losses", real)
    assert load_checkpoint(tmp_path / "cut" / "stage_c" / "checkpoints" / "last.safetensors").step == 2
    assert not (tmp_path / "cut" / "checkpoints" / "last.safetensors").exists()
    with pytest.raises(RecipeError, match="--resume"):
        train_adaptive(recipe, tmp_path / "cut", show_progress=False)
    train_adaptive(recipe, tmp_path / "cut", resume=True, show_progress=False)
    a = load_checkpoint(trained / "checkpoints" / "last.safetensors").model_state
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.safetensors").model_state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_eval_and_infer_adaptive(trained: Path, tmp_path: Path) -> None:
    from nmrestore.cli.main import app
    from nmrestore.data.builtin import load_builtin
    from nmrestore.data.io import write_image

    runner = CliRunner()
    photo = load_builtin("test")[0][1]
    write_image(tmp_path / "hr" / "crop.png", photo[:64, :80])
    maps = tmp_path / "maps"
    result = runner.invoke(
        app, ["eval", str(trained), "--hr-dir", str(tmp_path / "hr"), "--class-maps", str(maps)]
    )
    assert result.exit_code == 0, result.output
    assert "route histogram" in result.output and "whole-image MACs" in result.output
    assert [p.name for p in maps.glob("*.png")] == ["crop_classmap.png"]
    image = write_image(tmp_path / "lr.png", photo[:40, :50])
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(trained), str(image), "--out", str(out), "--adaptive"])
    assert result.exit_code == 0, result.output
    assert (out / "lr.png").exists() and (out / "lr_classmap.png").exists()
    # infer detects ClassPruning from the checkpoint, as eval does; --no-adaptive runs one route plainly
    auto, plain = tmp_path / "auto", tmp_path / "plain"
    assert runner.invoke(app, ["infer", str(trained), str(image), "--out", str(auto)]).exit_code == 0
    assert sorted(p.name for p in auto.iterdir()) == ["lr.png", "lr_classmap.png"]
    assert runner.invoke(app, ["infer", str(trained), str(image), "--out", str(plain), "--no-adaptive"]).exit_code == 0
    assert sorted(p.name for p in plain.iterdir()) == ["lr.png"]
    # a checkpoint of another method is refused with one line
    recipe = recipe_from_dict(tiny_recipe_dict())
    dense = create_model("edsr_small", scale=2, n_feats=8, n_blocks=1)
    meta = {"recipe": recipe.model_dump(mode="json"), "model": {"name": "edsr_small", "scale": 2}}
    save_checkpoint(tmp_path / "dense.safetensors", dense, meta)
    result = runner.invoke(
        app, ["infer", str(tmp_path / "dense.safetensors"), str(image), "--out", str(out), "--adaptive"]
    )
    assert result.exit_code == 2 and "ClassPruning" in result.output


def test_sls_searched_routes_quantile_labels_and_equal_split(tmp_path: Path) -> None:
    data = _recipe_dict(
        routes=None,
        route_budgets=[0.5, 1.0],
        route_search_steps=3,
        labels="quantile",
        budget_loss="equal_split",
        calibrate=False,
        classifier_steps=2,
        joint_steps=2,
    )
    data["train"]["steps"] = 2
    run = tmp_path / "run"
    train_adaptive(recipe_from_dict(data), run, show_progress=False)
    routes = json.loads((run / "stage_routes" / "routes.json").read_text())
    ns = list(routes["layers"].values())
    assert all(len(n) == 2 and n[0] <= n[1] == 4 for n in ns)  # nested, the full route dense
    model, _ = model_from_checkpoint(run / "checkpoints" / "best.safetensors")
    from nmrestore.methods.classpruning.routes import layer_route_ns

    assert list(layer_route_ns(model).values()) == ns  # the searched N travel in the checkpoint
    final = load_checkpoint(run / "checkpoints" / "best.safetensors").meta["adaptive"]
    assert final["labels"]["histogram"][0] in (
        final["labels"]["patches"] // 2,
        (final["labels"]["patches"] + 1) // 2,
    )
    assert "calibration" not in final and float(route_classifier(model).cost_shift) == 0.0
    # the search met its budget on the prunable MACs
    costs = final["route_costs"]
    assert costs["prunable_macs"][0] <= 0.5 * costs["prunable_dense_macs"] * (1 + 1e-9)


def test_budget_labels_through_training_meet_the_target(tmp_path: Path) -> None:
    data = _recipe_dict(labels="budget", target_macs_fraction=0.6, calibrate=False, joint_steps=0)
    data["train"]["steps"] = 2
    run = tmp_path / "run"
    train_adaptive(recipe_from_dict(data), run, show_progress=False)
    final = load_checkpoint(run / "checkpoints" / "best.safetensors").meta["adaptive"]
    counts = final["labels"]["histogram"]
    fractions = final["route_costs"]["route_fractions"]
    average = sum(c * f for c, f in zip(counts, fractions, strict=True)) / sum(counts)
    assert final["labels"]["rule"] == "budget"
    assert average <= 0.6 + 1e-9 and sum(counts) == final["labels"]["patches"]


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_grid_patch_sources_name_the_image_of_every_patch(scale: int) -> None:
    from nmrestore.methods.classpruning.patches import grid_patch_pairs, grid_patch_sources

    rng = np.random.default_rng(0)
    images = [
        ("a", rng.integers(0, 256, (40 * scale, 52 * scale, 3), dtype=np.uint8)),
        ("small", rng.integers(0, 256, (10 * scale, 60 * scale, 3), dtype=np.uint8)),  # too small: no patch
        ("b", rng.integers(0, 256, (33 * scale + 1, 33 * scale, 3), dtype=np.uint8)),
    ]
    lq, _ = grid_patch_pairs(images, None, scale, 16, 12)
    sources = grid_patch_sources(images, scale, 16, 12)
    assert len(sources) == len(lq)
    assert sources.tolist() == [0] * len(grid_positions(40, 52, 16, 12)) + [2] * len(grid_positions(33, 33, 16, 12))


def test_per_image_weights_and_budget_labels_follow_the_mean_per_image_psnr() -> None:
    from nmrestore.methods.classpruning.labels import make_labels, per_image_weights

    def db(mse: float) -> float:
        return -10 * float(np.log10(mse))

    # image 0 is easy (full-route MSE 1e-5), image 1 hard (1e-3); the cheap route adds 2e-6 to a
    # patch of either. Pooled, both errors are equal; per image, image 0 loses far more dB.
    psnrs = torch.tensor(
        [[db(1.2e-5), db(1e-5)], [db(1.2e-5), db(1e-5)], [db(1.002e-3), db(1e-3)], [db(1.002e-3), db(1e-3)]],
        dtype=torch.float64,
    )
    sources = torch.tensor([0, 0, 1, 1])
    assert per_image_weights(psnrs, sources).tolist() == pytest.approx([1e5, 1e5, 1e3, 1e3])
    config = ClassPruningConfig(m=4, routes=(2, 4), labels="budget", target_macs_fraction=0.75)
    # half the patches may take the cheap route: the hard image's, whose PSNR barely moves
    assert make_labels(psnrs, config, [0.5, 1.0], sources).tolist() == [1, 1, 0, 0]
    with pytest.raises(SparsityError, match="image index"):
        make_labels(psnrs, config, [0.5, 1.0])
