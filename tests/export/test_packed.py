"""Packed checkpoints: exact round trips for every route/task, sizes, and refusal of bad files."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from nmrestore.engine.checkpoint import save_checkpoint
from nmrestore.engine.loading import is_packed
from nmrestore.engine.packed_format import bitpack, bitunpack, packed_digest
from nmrestore.engine.runner import apply_sparsity, base_model, model_from_checkpoint
from nmrestore.errors import CheckpointError
from nmrestore.export import load_any, load_packed, pack_checkpoint, read_packed, save_packed
from nmrestore.export.onnx import deployable_copy
from nmrestore.models import create_model
from nmrestore.recipes.schema import recipe_from_dict
from nmrestore.sparsity import NMConfig, nm_layers, sparsify_, use_route
from tests.conftest import tiny_recipe_dict

SMALL = {
    "edsr_small": {"n_feats": 16, "n_blocks": 1},
    "carn_small": {"n_feats": 16, "n_blocks": 1, "n_units": 1},
}


def _model(name: str, config: NMConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, scale=2, **SMALL[name])
    import nmrestore.methods  # noqa: F401 - registers every method

    sparsify_(model, config)
    return model


def _assert_same_routes(a: nn.Module, b: nn.Module, routes: int) -> None:
    """Every route's effective (dense-with-zeros) weights are equal, and so are the outputs."""
    x = torch.rand(1, 3, 9, 11, generator=torch.Generator().manual_seed(1))
    layers_b = {name: module for name, module, _ in nm_layers(b)}
    plain_a = {k: v for k, v in a.state_dict().items() if ".parametrizations." not in k}
    plain_b = {k: v for k, v in b.state_dict().items() if ".parametrizations." not in k}
    assert plain_a.keys() == plain_b.keys()
    assert all(torch.equal(plain_a[k], plain_b[k]) for k in plain_a)
    for route in range(routes):
        with use_route(a, route), use_route(b, route), torch.no_grad():
            for name, module, _ in nm_layers(a):
                assert torch.equal(module.weight, layers_b[name].weight), (route, name)
            assert torch.equal(a(x), b(x)), route


def _check_ranks(a: nn.Module, b: nn.Module) -> None:
    """Ranks agree wherever any route's mask depends on them: every route keeps the same positions.

    Not the exact ranks: the banded encoding (e.g. 15:16, where a band id per weight is cheaper than
    15 indices per group) stores only which band each weight is in, and the kept order within a band
    is rebuilt canonically; no route's mask depends on it.
    """
    masks_b = {name: mask for name, _, mask in nm_layers(b)}
    for name, _, mask in nm_layers(a):
        other = masks_b[name]
        assert torch.equal(mask.route_n, other.route_n)
        for n in sorted({int(v) for v in mask.route_n.flatten()}):
            assert torch.equal(mask.ranks < n, other.ranks < n), (name, n)


@st.composite
def nm_patterns(draw: st.DrawFn) -> NMConfig:
    m = draw(st.sampled_from([4, 8, 16]))
    ns = draw(st.lists(st.integers(1, m), min_size=1, max_size=3))
    return NMConfig(n=ns[0], m=m, routes=tuple(ns) if len(ns) > 1 else None)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=nm_patterns(), name=st.sampled_from(sorted(SMALL)), seed=st.integers(0, 3))
@example(config=NMConfig(n=15, m=16), name="carn_small", seed=0)  # banded encoding: ranks rebuilt canonically
def test_round_trip_is_exact_for_every_route(config: NMConfig, name: str, seed: int) -> None:
    original = _model(name, config, seed)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.safetensors"
        report = save_packed(original, path)
        restored = _model(name, config, seed + 100)  # other weights, other ranks: all must be overwritten
        load_packed(path, model=restored)
    _assert_same_routes(original, restored, len(config.route_ns()))
    _check_ranks(original, restored)
    # the file holds the theoretical bytes plus a small header
    assert report.tensor_bytes >= report.theory_bytes - 64
    assert 0 < report.file_bytes - report.theory_bytes < 32_000


def test_bit_streams_round_trip() -> None:
    for bits in range(1, 8):
        values = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
        assert torch.equal(bitunpack(bitpack(values, bits), values.numel(), bits), values)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (2, 32)])
def test_size_is_values_plus_index_bits(tmp_path: Path, n: int, m: int) -> None:
    torch.manual_seed(0)
    model = create_model("edsr_small", scale=2, n_feats=32, n_blocks=2)
    sparsify_(model, NMConfig(n=n, m=m))
    report = save_packed(model, tmp_path / "p.safetensors")
    dense_fp32 = sum(t.numel() * 4 for t in deployable_copy(model)[0].state_dict().values())
    assert report.dense_bytes == dense_fp32
    bits = {4: 2, 32: 5}[m]
    expected = dense_fp32
    for layer in report.layers:
        numel = torch.Size(layer.shape).numel()
        kept = numel // m * n
        expected += kept * 4 + -(-kept * bits // 8) - numel * 4
        assert layer.encoding == "ranked"
    assert report.theory_bytes == expected
    assert report.theory_ratio < (0.6 if m == 4 else 0.25)
    assert report.theory_ratio < report.ratio < report.theory_ratio + 0.05  # + the JSON header


class _Scale(nn.Module):
    """A second parametrization on a masked weight: the layer is then stored dense."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * 0.5


def test_full_and_dense_layers_round_trip(tmp_path: Path) -> None:
    from torch.nn.utils import parametrize

    config = NMConfig(n=4, m=4)  # every route keeps everything: "full"
    model = _model("edsr_small", config)
    layers = list(nm_layers(model))
    parametrize.register_parametrization(layers[0][1], "weight", _Scale())
    report = save_packed(model, tmp_path / "p.safetensors")
    assert [layer.encoding for layer in report.layers][:2] == ["dense", "full"]
    restored = _model("edsr_small", config, seed=9)
    parametrize.register_parametrization(next(iter(nm_layers(restored)))[1], "weight", _Scale())
    load_packed(tmp_path / "p.safetensors", model=restored)
    _assert_same_routes(model, restored, 1)


def _checkpoint(tmp_path: Path, sparsity: dict[str, object] | None) -> tuple[Path, nn.Module]:
    recipe = recipe_from_dict(tiny_recipe_dict(**({"sparsity": sparsity} if sparsity else {})))
    torch.manual_seed(0)
    model = base_model(recipe)
    apply_sparsity(model, recipe)
    meta = {
        "recipe": recipe.model_dump(mode="json"),
        "model": {"name": recipe.model.name, "scale": recipe.model.scale},
        "step": 7,
    }
    return save_checkpoint(tmp_path / "best.safetensors", model, meta, with_rng=False), model


def test_load_packed_rebuilds_from_the_embedded_recipe(tmp_path: Path) -> None:
    path, model = _checkpoint(tmp_path, {"method": "oneshot", "n": 2, "m": 4})
    report = pack_checkpoint(path)
    assert report.path == tmp_path / "best.packed.safetensors" and is_packed(report.path)
    restored = load_packed(report.path)
    _assert_same_routes(model, restored, 1)
    header = read_packed(report.path).meta
    assert header["model"] == {"name": "edsr_small", "scale": 2} and header["step"] == 7
    assert header["packed"]["layers"]["body.0.body.0"]["route_n"] == [2]
    # load_any dispatches on the header: both kinds rebuild the same model
    same, recipe = model_from_checkpoint(load_any(report.path))
    assert recipe.sparsity is not None and recipe.sparsity.method == "oneshot"
    _assert_same_routes(model, same, 1)
    # the squashed form of a route is the deployable hand-off
    squashed = load_packed(report.path, route=0, squash=True)
    assert not list(nm_layers(squashed))


def test_sls_state_round_trips(tmp_path: Path) -> None:
    from nmrestore.methods.sls import SLSConfig
    from nmrestore.methods.sls.mask import sls_masks

    torch.manual_seed(0)
    model = create_model("edsr_small", scale=2, **SMALL["edsr_small"])
    config = SLSConfig(m=8, input_size=(8, 8))
    sparsify_(model, config)
    masks = list(sls_masks(model))
    masks[0][2].freeze(3)  # one frozen layer, the others still searching at their scores' N
    with torch.no_grad():
        masks[1][2].scores[2:] = 0.1  # N = 3 from the scores
    save_packed(model, tmp_path / "p.safetensors")
    torch.manual_seed(1)
    restored = create_model("edsr_small", scale=2, **SMALL["edsr_small"])
    sparsify_(restored, config)
    load_packed(tmp_path / "p.safetensors", model=restored)
    _assert_same_routes(model, restored, 1)
    got = list(sls_masks(restored))
    assert got[0][2].is_frozen and got[0][2].n == 3 and got[1][2].scores_n() == 3


def test_classpruning_routes_round_trip(tmp_path: Path) -> None:
    from nmrestore.methods.classpruning import ClassPruningConfig

    config = ClassPruningConfig(m=8, routes=(2, 4, 8), classifier_channels=8, classifier_convs=1)
    model = _model("edsr_small", config)
    report = save_packed(model, tmp_path / "p.safetensors")
    assert {layer.encoding for layer in report.layers} == {"banded"}  # the full route keeps all 8
    restored = _model("edsr_small", config, seed=5)
    load_packed(tmp_path / "p.safetensors", model=restored)
    _assert_same_routes(model, restored, 3)
    for (key, a), b in zip(model.state_dict().items(), restored.state_dict().values(), strict=True):
        if "nm_route_classifier" in key:
            assert torch.equal(a, b), key


def test_png_tasks_round_trip(tmp_path: Path) -> None:
    from nmrestore.methods.png import PNGConfig
    from nmrestore.methods.png.mask import prune_choice
    from nmrestore.methods.png.tasks import png_masks, select_task
    from nmrestore.sparsity import dense_weight

    config = PNGConfig(m=8, ns=(2, 3, 4), max_grow=None)

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = create_model("edsr_small_multiscale", scale=2, n_feats=16, n_blocks=1)
        sparsify_(model, config)
        return model

    model = build(0)
    for task, n in enumerate(config.ns):
        for _, module, mask in png_masks(model):
            mask.set_task_mask(task, prune_choice(mask, dense_weight(module), task, n, None), n)
    report = save_packed(model, tmp_path / "p.safetensors")
    assert "union" in {layer.encoding for layer in report.layers}
    assert read_packed(tmp_path / "p.safetensors").meta["packed"]["tasks"] == ["x2", "x3", "x4"]
    restored = build(3)
    load_packed(tmp_path / "p.safetensors", model=restored)
    x = torch.rand(1, 3, 8, 10)
    for task in ("x2", "x3", "x4"):
        select_task(model, task)
        select_task(restored, task)
        with torch.no_grad():
            assert torch.equal(model(x), restored(x)), task
    for (key, a), b in zip(model.state_dict().items(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b) or ".original" in key, key  # mask state exact; weights equal where kept
    squashed = load_packed(tmp_path / "p.safetensors", model=build(4), task="x3", squash=True)
    assert not list(nm_layers(squashed))
    select_task(model, "x3")
    with torch.no_grad():
        assert torch.equal(squashed(x), model(x))


def _packed_file(tmp_path: Path) -> Path:
    path = tmp_path / "p.safetensors"
    save_packed(_model("edsr_small", NMConfig(n=2, m=4)), path)
    return path


def test_tampered_tensor_bytes_are_rejected(tmp_path: Path) -> None:
    path = _packed_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_packed(path, model=_model("edsr_small", NMConfig(n=2, m=4)))


def test_tampered_header_is_rejected(tmp_path: Path) -> None:
    path = _packed_file(tmp_path)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["nmrestore"])
    header["packed"]["layers"]["body.0.body.0"]["route_n"] = [4]
    save_file(tensors, str(path), metadata={"nmrestore": json.dumps(header)})
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read_packed(path)


def test_crafted_indices_with_a_valid_digest_are_rejected(tmp_path: Path) -> None:
    path = _packed_file(tmp_path)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["nmrestore"])
    tensors["indices:body.0.body.0"] = torch.zeros_like(tensors["indices:body.0.body.0"])  # index 0 twice
    header["sha256"] = packed_digest(tensors, header)
    save_file(tensors, str(path), metadata={"nmrestore": json.dumps(header)})
    with pytest.raises(CheckpointError, match="repeats inside a group"):
        read_packed(path)


def test_foreign_files_are_rejected_clearly(tmp_path: Path) -> None:
    training, _ = _checkpoint(tmp_path, {"method": "oneshot", "n": 2, "m": 4})
    with pytest.raises(CheckpointError, match="is a training checkpoint, not a packed one"):
        read_packed(training)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(CheckpointError, match="not an nmrestore checkpoint"):
        read_packed(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_packed(garbage)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_packed(tmp_path / "missing.safetensors")
    assert not is_packed(training) and not is_packed(garbage)
    # a packed file without a recipe needs the model
    with pytest.raises(CheckpointError, match="no embedded recipe"):
        load_packed(_packed_file(tmp_path))
    # a packed file of another architecture does not fit
    with pytest.raises(CheckpointError, match="does not fit"):
        load_packed(_packed_file(tmp_path), model=_model("carn_small", NMConfig(n=2, m=4)))


def test_cli_export_then_eval_and_infer_on_the_packed_file(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from nmrestore.cli.main import app

    runner = CliRunner()
    path, _ = _checkpoint(tmp_path, {"method": "oneshot", "n": 2, "m": 4})
    result = runner.invoke(
        app, ["export", str(path), "--format", "packed", "--out", str(tmp_path / "small.safetensors")]
    )
    assert result.exit_code == 0, result.output
    assert "of the dense fp32 tensors" in result.output
    packed = tmp_path / "small.safetensors"
    hr = tmp_path / "hr"
    hr.mkdir()
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 255, (24, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(hr / f"{i}.png")
    scores = []
    for source in (path, packed):
        result = runner.invoke(app, ["eval", str(source), "--json", "--hr-dir", str(hr)])
        assert result.exit_code == 0, result.output
        scores.append(json.loads(result.output))
    assert scores[0]["psnr"] == scores[1]["psnr"] and scores[0]["layers"] == scores[1]["layers"]
    image = tmp_path / "lr.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(image)
    outputs = []
    for source, folder in ((path, "a"), (packed, "b")):
        result = runner.invoke(app, ["infer", str(source), str(image), "--out", str(tmp_path / folder)])
        assert result.exit_code == 0, result.output
        outputs.append(np.asarray(Image.open(tmp_path / folder / "lr.png")))
    assert np.array_equal(outputs[0], outputs[1])
    for args, needle in (
        (["--format", "packed", "--route", "1"], "--route and --task apply to --format onnx"),
        (["--format", "tar"], "'tar' is not one of"),
    ):
        result = runner.invoke(app, ["export", str(path), *args])
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output
    tampered = bytearray(packed.read_bytes())
    tampered[-3] ^= 0x01
    packed.write_bytes(bytes(tampered))
    result = runner.invoke(app, ["eval", str(packed), "--hr-dir", str(hr)])
    assert result.exit_code == 2 and "checksum mismatch" in result.output
