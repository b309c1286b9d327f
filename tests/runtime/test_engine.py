"""compile_sparse: same outputs as the dense-with-zeros model on every registered model, routes,
squashed and packed models, tactic choice and its cache, the dense fallback, ClassPruning patches."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from nmrestore.errors import SparsityError
from nmrestore.models import create_model, list_models
from nmrestore.runtime import (
    EngineConfig,
    FusedResidual,
    SparseConv2d,
    SparseLinear,
    compile_sparse,
    engine_state,
    format_decisions,
    load_kernel,
    reset_tactics,
    sparse_layers,
)
from nmrestore.sparsity import NMConfig, sparsify_, squash_, use_route

TOL = 1e-4
SPARSE = EngineConfig(tactic="sparse")


def _kernel_or_skip() -> None:
    if load_kernel() is None:  # pragma: no cover - only without a compiler
        pytest.skip("sparse kernel unavailable on this machine")


#: Published models too large for a unit test at full size: same architecture, fewer/narrower blocks.
SHRINK: dict[str, dict[str, object]] = {
    "edsr": {"n_feats": 64, "n_blocks": 2},
    "rcan": {"n_groups": 2, "n_blocks": 2},
    "unet": {"widths": (32, 64, 128, 256, 512)},
}


def _build(name: str) -> nn.Module:
    model = None
    for scale in (2, 1):
        try:
            model = create_model(name, scale=scale, **SHRINK.get(name, {}))
            break
        except Exception:
            continue
    assert model is not None, name
    return model.eval()


def _sparsify(model: nn.Module, n: int = 2, m: int = 4) -> nn.Module:
    try:
        sparsify_(model, NMConfig(n=n, m=m))
    except SparsityError:
        sparsify_(model, NMConfig(n=1, m=2))  # channel counts that 4 does not divide
    return model


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_matches_its_dense_with_zeros_form(name: str) -> None:
    _kernel_or_skip()
    torch.manual_seed(0)
    model = _sparsify(_build(name))
    reference = squash_(copy.deepcopy(model))
    engine = compile_sparse(model, SPARSE)
    x = torch.rand(1, int(getattr(model, "n_colors", 3) or 3), 12, 10)
    with torch.no_grad():
        expected, got, again = reference(x), engine(x), engine(x)  # again: with the hand-off pairs
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= TOL
    assert (again - expected).abs().max() <= TOL
    state = engine_state(engine)
    assert state is not None and state.kernel is not None
    used = [d for d in state.table() if d.choice == "sparse"]
    assert used, format_decisions(state.table())  # the kernel really ran


def _routed(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("edsr_small", scale=2, n_feats=8, n_blocks=2)
    sparsify_(model, NMConfig(m=4, routes=(1, 2, 4)))
    return model.eval()


def test_each_route_runs_its_own_sparse_weights() -> None:
    _kernel_or_skip()
    model = _routed()
    engine = compile_sparse(model, SPARSE)
    x = torch.rand(2, 3, 9, 11)
    with torch.no_grad():
        outputs = []
        for route in (0, 1, 2, 0):
            with use_route(model, route), use_route(engine, route):
                expected = squash_(copy.deepcopy(model))(x)
                got = engine(x)
            assert (got - expected).abs().max() <= TOL
            outputs.append(got)
    assert not torch.allclose(outputs[0], outputs[1])  # routes really differ
    assert torch.equal(outputs[0], outputs[3])  # and switching back is exact
    decisions = engine_state(engine).table()  # type: ignore[union-attr]
    by_route = {d.route: d for d in decisions if d.layer == "body.0.body.0"}
    assert by_route[0].nm == "1:4" and by_route[1].nm == "2:4" and by_route[0].choice == "sparse"
    assert by_route[2].choice == "dense" and "N = M" in by_route[2].reason  # 4:4 is a dense route


def test_squashed_models_are_detected_from_their_zeros() -> None:
    _kernel_or_skip()
    model = _routed()
    with use_route(model, 1):
        squashed = squash_(copy.deepcopy(model))
    # dense_convs off: the first and last convs stay plain modules, with the reason they are untouched
    engine = compile_sparse(squashed, EngineConfig(tactic="sparse", dense_convs=False))
    layers = sparse_layers(engine)
    assert layers and all(layer.routes[0].nm == (2, 4) for layer in layers)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert (engine(x) - squashed(x)).abs().max() <= TOL
    untouched = {u.layer: u.reason for u in engine_state(engine).untouched}  # type: ignore[union-attr]
    assert untouched == {"head.0": "no N:M pattern in its zeros", "tail.1": "no N:M pattern in its zeros"}


def test_packed_checkpoints_compile_to_the_same_outputs(tmp_path: Path) -> None:
    _kernel_or_skip()
    from nmrestore.export.packed import load_packed, save_packed

    model = _routed()
    save_packed(model, tmp_path / "m.packed.safetensors")
    restored = load_packed(tmp_path / "m.packed.safetensors", model=_routed(seed=1))
    engine = compile_sparse(restored, SPARSE)
    x = torch.rand(1, 3, 7, 9)
    with torch.no_grad():
        for route in range(3):
            with use_route(model, route), use_route(engine, route):
                assert (engine(x) - squash_(copy.deepcopy(model))(x)).abs().max() <= TOL


def test_linear_layers_and_fused_relu() -> None:
    _kernel_or_skip()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    sparsify_(model, NMConfig(n=2, m=8), filter_fn=lambda name, module: True)
    reference = squash_(copy.deepcopy(model))
    engine = compile_sparse(model, SPARSE)
    assert isinstance(engine[0], SparseLinear) and engine[0].relu and isinstance(engine[1], nn.Identity)
    assert not engine[4].relu
    x = torch.randn(3, 5, 16)  # leading dims are flattened and restored
    with torch.no_grad():
        assert (engine(x) - reference(x)).abs().max() <= TOL


def test_relu_fusion_in_sequential_conv_blocks() -> None:
    _kernel_or_skip()
    model = _routed()
    engine = compile_sparse(model, SPARSE)
    fused = engine.body[0]
    assert isinstance(fused, FusedResidual) and isinstance(fused.last, SparseConv2d)
    block = fused.block.body
    assert isinstance(block[0], SparseConv2d) and block[0].relu and isinstance(block[1], nn.Identity)
    unfused = compile_sparse(model, EngineConfig(tactic="sparse", fuse_relu=False, fuse_residual=False))
    assert not unfused.body[0].body[0].relu and isinstance(unfused.body[0].body[1], nn.ReLU)
    x = torch.rand(1, 3, 9, 13)
    with torch.no_grad(), use_route(engine, 1), use_route(unfused, 1):
        assert (engine(x) - unfused(x)).abs().max() <= TOL


@pytest.mark.parametrize("tactic", ["sparse", "dense"])
def test_fused_residual_blocks_match_on_both_tactics(tactic: str) -> None:
    _kernel_or_skip()
    for name in ("edsr_small", "carn_small", "msrresnet_small"):
        torch.manual_seed(0)
        model = _sparsify(create_model(name, scale=2))
        engine = compile_sparse(model, EngineConfig(tactic=tactic))  # type: ignore[arg-type]
        assert any(isinstance(m, FusedResidual) for m in engine.modules()), name
        x = torch.rand(1, 3, 11, 9)
        with torch.no_grad():
            assert (engine(x) - squash_(copy.deepcopy(model))(x)).abs().max() <= TOL, name


@pytest.mark.parametrize("scale", [2, 3])
def test_block_shared_masks_run_in_blocks_and_match_the_masked_model(scale: int) -> None:
    # out_block=16 masks: every body conv (and the x2 upsampler) runs the kernel's 4-channel blocks;
    # the outputs equal the dense-with-zeros model's
    lib = load_kernel()
    if lib is None:  # pragma: no cover - only without a compiler
        pytest.skip("sparse kernel unavailable on this machine")
    torch.manual_seed(0)
    model = create_model("edsr", scale=scale, n_feats=64, n_blocks=2).eval()
    sparsify_(model, NMConfig(n=4, m=32, out_block=16))
    engine = compile_sparse(model, SPARSE)
    convs = [m for m in engine.modules() if isinstance(m, SparseConv2d) and m.out_channels % 16 == 0]
    assert convs and all(lib.channel_block(c.routes[0].csr) == 4 for c in convs if c.routes[0].nm)
    x = torch.rand(1, 3, 12, 70)
    with torch.no_grad():
        assert (engine(x) - squash_(copy.deepcopy(model))(x)).abs().max() <= TOL


def test_auto_tactic_times_once_per_shape_and_reuses_the_disk_cache(tmp_path: Path) -> None:
    _kernel_or_skip()
    model = _routed()
    cache = tmp_path / "tactics.json"
    # per-layer choices and their cache; a whole-model plan could relabel them (tests/runtime/test_plans.py)
    config = EngineConfig(tactic="auto", timing_repeats=1, cache_file=cache, refine=False)
    engine = compile_sparse(model, config)
    x = torch.rand(1, 3, 10, 12)
    with torch.no_grad():
        first = engine(x)
        again = engine(x)
    assert torch.equal(first, again)
    decisions = engine_state(engine).table()  # type: ignore[union-attr]
    timed = [d for d in decisions if d.reason == "timed"]
    assert timed and all(d.dense_ms is not None and d.sparse_ms is not None for d in timed)
    assert all(d.choice == ("sparse" if d.sparse_ms < d.dense_ms else "dense") for d in timed)  # type: ignore[operator]
    assert json.loads(cache.read_text())["timings"]
    # a new process (a new compile) reads the timings instead of timing again
    second = compile_sparse(model, config)
    with torch.no_grad():
        second(x)
    reasons = {
        d.reason for d in engine_state(second).table() if d.choice in ("sparse", "dense") and d.nm != "4:4"
    }  # type: ignore[union-attr]
    assert reasons == {"reused"}
    reset_tactics(second)
    assert not engine_state(second).decisions  # type: ignore[union-attr]


def test_fallback_to_dense_when_the_kernel_is_unavailable(
    fresh_kernel: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fresh_kernel.setenv("NMRESTORE_DISABLE_KERNEL", "1")
    model = _routed()
    with caplog.at_level(logging.WARNING, logger="nmrestore.runtime"):
        engine = compile_sparse(model)
    assert "sparse kernel unavailable" in caplog.text
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert (engine(x) - squash_(copy.deepcopy(model))(x)).abs().max() <= TOL
    state = engine_state(engine)
    assert state is not None and state.kernel is None
    assert {d.choice for d in state.table()} == {"dense"}
    assert all("kernel unavailable" in d.reason or "N = M" in d.reason for d in state.table())


def test_autograd_inputs_take_the_dense_path() -> None:
    model = _routed()
    engine = compile_sparse(model, SPARSE)
    x = torch.rand(1, 3, 6, 6, requires_grad=True)
    engine(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_classpruning_patch_pipeline_runs_each_route_on_its_sparse_layers() -> None:
    _kernel_or_skip()
    from nmrestore.methods.classpruning import ClassPruningConfig
    from nmrestore.methods.classpruning.classifier import calibrate_shift, classifier_logits, route_classifier
    from nmrestore.methods.classpruning.patches import extract_patches
    from nmrestore.methods.classpruning.patches import grid_positions as grid
    from nmrestore.methods.classpruning.pipeline import AdaptivePipeline

    torch.manual_seed(0)
    model = create_model("edsr_small", scale=2, n_feats=8, n_blocks=1)
    sparsify_(
        model,
        ClassPruningConfig(
            m=4, routes=(1, 2, 4), classifier_channels=8, classifier_convs=1, patch_size=16, stride=12
        ),
    )
    clf = route_classifier(model)
    with torch.no_grad():
        clf.head.weight.normal_(0, 5.0)
    model.eval()
    lq = torch.rand(1, 3, 37, 42) * torch.linspace(0.05, 1.0, 42).view(1, 1, 1, 42)
    logits = classifier_logits(model, extract_patches(lq, grid(37, 42, 16, 12), (16, 16)))
    clf.cost_shift.fill_(
        calibrate_shift(logits, clf.route_cost, float(clf.route_cost.min() + clf.route_cost.max()) / 2)[0]
    )
    engine = compile_sparse(model, SPARSE)
    plain = AdaptivePipeline(model, 16, 12, batch_size=7)(lq)
    fast = AdaptivePipeline(model, 16, 12, batch_size=7, engine=engine)(lq)
    assert len(set(plain.routes.tolist())) >= 2
    assert torch.equal(plain.routes, fast.routes)
    assert (plain.output - fast.output).abs().max() <= TOL
    used = {(d.route, d.choice) for d in engine_state(engine).table()}  # type: ignore[union-attr]
    assert any(choice == "sparse" for _, choice in used)
