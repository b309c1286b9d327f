"""ONNX export: onnxruntime matches PyTorch on three architectures, a route and a task.

Each export takes a few seconds (the exporter rebuilds its operator registry every call), so
the cases are few and small: CARN, RCAN, a ClassPruning route and a PNG task (both on EDSR), and
the CLI's export of one route of a multi-route EDSR.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from nmrestore.errors import NMRestoreError
from nmrestore.export import export_onnx
from nmrestore.models import create_model
from nmrestore.sparsity import NMConfig, get_route, nm, nm_layers, sparsify_

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
numpy_helper = onnx.numpy_helper


def _sparse(name: str, config: NMConfig, **kwargs: object) -> nn.Module:
    import nmrestore.methods  # noqa: F401 - registers every method

    torch.manual_seed(0)
    model = create_model(name, scale=2, **kwargs)
    sparsify_(model, config)
    return model


def _classpruning() -> nn.Module:
    from nmrestore.methods.classpruning import ClassPruningConfig

    config = ClassPruningConfig(m=8, routes=(2, 4, 8), classifier_channels=8, classifier_convs=1)
    return _sparse("edsr_small", config, n_feats=16, n_blocks=1)


def _png() -> nn.Module:
    from nmrestore.methods.png import PNGConfig
    from nmrestore.methods.png.mask import prune_choice
    from nmrestore.methods.png.tasks import png_masks
    from nmrestore.sparsity import dense_weight

    config = PNGConfig(m=8, ns=(2, 3, 4), max_grow=None)
    model = _sparse("edsr_small_multiscale", config, n_feats=16, n_blocks=1)
    for task, n in enumerate(config.ns):
        for _, module, mask in png_masks(model):
            mask.set_task_mask(task, prune_choice(mask, dense_weight(module), task, n, None), n)
    return model


CASES: dict[str, tuple[Callable[[], nn.Module], int | None, str | None]] = {
    "carn_small 2:4": (lambda: _sparse("carn_small", NMConfig(n=2, m=4), n_feats=16), None, None),
    "rcan_small 4:8": (
        lambda: _sparse("rcan_small", NMConfig(n=4, m=8), n_feats=16, n_groups=1, n_blocks=2),
        None,
        None,
    ),
    "classpruning route 0": (_classpruning, 0, None),
    "png task x3": (_png, None, "x3"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_onnxruntime_matches_pytorch(case: str, tmp_path: Path) -> None:
    build, route, task = CASES[case]
    model = build()
    route_before = get_route(model)
    report = export_onnx(model, tmp_path / "m.onnx", route=route, task=task)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4, report.summary()
    # the caller's model is untouched: still masked, same route, and it still runs (squashing a deep
    # copy of a parametrized model must not delete the weight property shared with the original)
    assert list(nm_layers(model)) and get_route(model) == route_before
    with torch.no_grad():
        model(torch.rand(1, 3, 8, 8))
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))
    # the N:M pattern is in the weights, along input channels (what TensorRT looks for)
    weights = {
        init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in proto.graph.initializer
    }
    # (a task's graph holds the shared layers and its own, not the other tasks' upsamplers)
    pruned = {
        name: nm for name, nm in report.patterns.items() if nm[0] < nm[1] and f"{name}.weight" in weights
    }
    assert len(pruned) >= 2
    for name, (n, m) in pruned.items():
        weight = weights[f"{name}.weight"]
        assert nm.is_nm(weight, n, m, in_axis=1) and not nm.is_nm(weight, n - 1, m, in_axis=1), name


def test_bad_requests_fail_clearly(tmp_path: Path) -> None:
    model = _sparse("edsr_small", NMConfig(n=2, m=4), n_feats=8, n_blocks=1)
    with pytest.raises(NMRestoreError, match="route 3 does not exist"):
        export_onnx(model, tmp_path / "m.onnx", route=3)
    with pytest.raises(NMRestoreError, match="has no tasks"):
        export_onnx(model, tmp_path / "m.onnx", task="x3")
    with pytest.raises(NMRestoreError, match="opset 16 is too old"):
        export_onnx(model, tmp_path / "m.onnx", opset=16)


@pytest.mark.slow
def test_cli_exports_a_route_to_onnx(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from nmrestore.cli.main import app
    from nmrestore.engine.checkpoint import save_checkpoint
    from nmrestore.engine.runner import apply_sparsity, base_model
    from nmrestore.recipes.schema import recipe_from_dict
    from tests.conftest import tiny_recipe_dict

    recipe = recipe_from_dict(tiny_recipe_dict(sparsity={"method": "nm", "n": 2, "m": 4, "routes": [1, 2]}))
    model = base_model(recipe)
    apply_sparsity(model, recipe)
    meta = {"recipe": recipe.model_dump(mode="json"), "model": {"name": "edsr_small", "scale": 2}}
    path = save_checkpoint(tmp_path / "best.safetensors", model, meta, with_rng=False)
    result = CliRunner().invoke(app, ["export", str(path), "--format", "onnx", "--route", "0"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "best.route0.onnx").is_file(), result.output
    diff = float(result.output.split("max |onnxruntime - torch| = ")[1].split()[0])
    assert diff <= 1e-4
