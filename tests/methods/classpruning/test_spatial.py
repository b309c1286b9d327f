"""Whole-image accounting and the spatial pipeline: one pass over the whole image, each tile on its route."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nmrestore.cost import count_cost
from nmrestore.engine.runner import model_from_checkpoint, train
from nmrestore.errors import SparsityError
from nmrestore.methods.classpruning import ClassPruningConfig
from nmrestore.methods.classpruning.accounting import pipeline_cost, pooled_cost
from nmrestore.methods.classpruning.classifier import (
    calibrate_shift,
    classifier_logits,
    route_classifier,
    route_costs,
)
from nmrestore.methods.classpruning.patches import extract_patches
from nmrestore.methods.classpruning.pipeline import AdaptivePipeline, oracle_routes
from nmrestore.models import create_model
from nmrestore.recipes import recipe_from_dict
from nmrestore.runtime import compile_sparse, load_kernel
from nmrestore.sparsity import sparsify_, use_route
from tests.methods.classpruning.test_program import _recipe_dict


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny inputs: one thread (see ``one_thread`` in tests/conftest.py)."""


def _model(inference: str = "spatial") -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("edsr_small", scale=2, n_feats=8, n_blocks=1, global_skip=True)
    config = ClassPruningConfig(
        m=4, routes=(1, 2, 4), classifier_channels=8, classifier_convs=1, patch_size=8, stride=8, inference=inference
    )
    sparsify_(model, config)
    with torch.no_grad():  # a classifier that uses several routes, a last conv that is not zero
        route_classifier(model).head.weight.normal_(0, 5.0)
        model.tail[1].weight.normal_(0, 0.1)
    return model.eval()


def _banded(h: int, w: int) -> torch.Tensor:
    ramp = torch.linspace(0.05, 1.0, w).view(1, 1, 1, w)
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)) * ramp


def _mixing(model: torch.nn.Module, lq: torch.Tensor) -> torch.nn.Module:
    """Store a cost shift that sends the tiles of ``lq`` to more than one route."""
    pipeline = AdaptivePipeline(model)
    size, windows = pipeline.patch_grid(*lq.shape[-2:])
    logits = classifier_logits(model, extract_patches(lq, windows, size))
    clf = route_classifier(model)
    mid = float(clf.route_cost.min() + clf.route_cost.max()) / 2
    clf.cost_shift.fill_(calibrate_shift(logits, clf.route_cost, mid)[0])
    return model


# -- accounting -------------------------------------------------------------------------------------
def test_pipeline_cost_counts_routes_by_pixel_classifier_and_blending() -> None:
    costs = route_costs(_model(), (8, 8))
    per_pixel = [m / 64 for m in costs.route_macs]
    whole = count_cost(_model(), (20, 30)).dense_macs
    cost = pipeline_cost(costs, [100, 200, 300], 12, whole, 600, stitched_values=50)
    assert cost.network_macs == pytest.approx(100 * per_pixel[0] + 200 * per_pixel[1] + 300 * per_pixel[2])
    assert cost.classifier_macs == pytest.approx(12 * costs.classifier_macs)
    assert cost.total == pytest.approx(cost.network_macs + cost.classifier_macs + 50)
    assert cost.fraction == pytest.approx(cost.total / whole)
    assert cost.overlap == pytest.approx(1.0)
    # ClassSR's figure: against the dense net on the same pixels, blending left out
    assert cost.per_patch_fraction == pytest.approx(
        (cost.network_macs + cost.classifier_macs) / (600 * costs.dense_macs / 64)
    )
    twice = pooled_cost([cost, cost])
    assert twice is not None and twice.fraction == pytest.approx(cost.fraction)
    assert twice.route_pixels == (200, 400, 600) and pooled_cost([]) is None
    assert cost.to_dict()["macs_fraction"] == cost.fraction
    with pytest.raises(ValueError, match="routes"):
        pipeline_cost(costs, [1, 2], 1, whole, 3)


# -- the spatial pipeline ---------------------------------------------------------------------------
def test_spatial_pipeline_computes_every_pixel_once_and_counts_it_so() -> None:
    lq = _banded(20, 30)  # 3 x 4 tiles of 8, the last row and column cut at the border
    model = _mixing(_model(), lq)
    result = AdaptivePipeline(model)(lq)
    assert result.mode == "spatial" and result.num_patches == 12 and len(set(result.routes.tolist())) >= 2
    assert result.output.shape == (1, 3, 40, 60)
    costs = route_costs(model, (8, 8))
    boxes = [(min(8, 20 - 8 * i), min(8, 30 - 8 * j)) for i in range(3) for j in range(4)]
    pixels = [0, 0, 0]
    for route, (bh, bw) in zip(result.routes.tolist(), boxes, strict=True):
        pixels[route] += bh * bw
    assert list(result.cost.route_pixels) == pixels and sum(pixels) == 600
    by_hand = sum(p * m / 64 for p, m in zip(pixels, costs.route_macs, strict=True)) + 12 * costs.classifier_macs
    assert result.macs == pytest.approx(by_hand)
    assert result.cost.overlap == pytest.approx(1.0) and result.cost.stitch_macs == 0
    whole = count_cost(model, (20, 30)).dense_macs
    assert result.macs_fraction == pytest.approx(by_hand / whole)
    # nothing overlaps: the per-patch figure is the whole-image one
    assert result.macs_fraction_per_patch == pytest.approx(result.macs_fraction, rel=1e-6)


def test_one_route_everywhere_is_the_whole_image_forward_of_that_route() -> None:
    model = _model()
    lq = _banded(20, 30)
    for k in range(3):
        result = AdaptivePipeline(model, force_route=k)(lq)
        with torch.no_grad(), use_route(model, k):
            whole = model(lq)
        assert (result.output - whole).abs().max() <= 1e-5  # no seams, no zero padding inside the image


def test_given_routes_and_the_sparse_engine_give_the_pytorch_result() -> None:
    lq = _banded(20, 30)
    model = _mixing(_model(), lq)
    plain = AdaptivePipeline(model)(lq)
    assert len(set(plain.routes.tolist())) >= 2
    again = AdaptivePipeline(model)(lq, routes=plain.routes)
    assert torch.equal(again.output, plain.output)
    if load_kernel() is None:  # pragma: no cover - only without a compiler
        pytest.skip("sparse kernel unavailable on this machine")
    engine = compile_sparse(model)
    fast = AdaptivePipeline(model, engine=engine)
    assert (fast(lq).output - plain.output).abs().max() <= 1e-4
    assert torch.equal(fast(lq).routes, plain.routes)
    with pytest.raises(SparsityError, match="mode 'patches'"):
        oracle_routes(fast, [{"lq": lq, "gt": lq}], 0, False, 0.5)


def test_patches_mode_is_kept_and_unknown_modes_are_refused() -> None:
    model = _model()
    lq = _banded(20, 30)
    patches = AdaptivePipeline(model, stride=6, mode="patches")(lq)
    assert patches.mode == "patches" and patches.cost.overlap > 1
    assert patches.macs_fraction > patches.macs_fraction_per_patch  # the overlap is paid for
    with pytest.raises(SparsityError, match="mode"):
        AdaptivePipeline(model, mode="tiles")


def test_infer_sparse_engine_runs_a_spatial_checkpoint_and_eval_leads_with_whole_image_macs(tmp_path: Path) -> None:
    from nmrestore.cli.main import app
    from nmrestore.data.builtin import load_builtin
    from nmrestore.data.io import read_image, write_image

    data = _recipe_dict(inference="spatial", stride=16, classifier_steps=2, joint_steps=2)
    data["train"]["steps"] = 2
    run = tmp_path / "run"
    train(recipe_from_dict(data), run, show_progress=False)
    model, _ = model_from_checkpoint(run / "checkpoints" / "last.safetensors")
    assert AdaptivePipeline(model).mode == "spatial"  # the checkpoint's own pipeline
    runner = CliRunner()
    photo = load_builtin("test")[0][1]
    image = write_image(tmp_path / "lr.png", photo[:40, :50])
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(run), str(image), "--out", str(out), "--sparse-engine"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["lr.png", "lr_classmap.png"]
    assert read_image(out / "lr.png").shape == (80, 100, 3)
    write_image(tmp_path / "hr" / "crop.png", photo[:64, :80])
    result = runner.invoke(app, ["eval", str(run), "--hr-dir", str(tmp_path / "hr"), "--sparse-engine"])
    assert result.exit_code == 0, result.output
    extra = result.output.split("MACs (1280x720 output)")[1].splitlines()
    assert extra[1].startswith("whole-image MACs:") and "spatial pipeline" in extra[1]
    assert "per patch (ClassSR's convention" in result.output
