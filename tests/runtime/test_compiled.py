"""Compiled engine files: save_compiled / load_compiled give the same engine back (outputs, fusions,
tactic decisions) without re-packing or re-timing, and refuse damaged, crafted or foreign files."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import nmrestore
from nmrestore.errors import CheckpointError, NMRestoreError
from nmrestore.integrity import integrity_digest
from nmrestore.models import create_model
from nmrestore.runtime import (
    EngineConfig,
    FusedResidual,
    SparseLayer,
    compile_sparse,
    engine_state,
    is_compiled,
    load_compiled,
    load_kernel,
    packing,
    read_compiled,
    save_compiled,
    sparse_layers,
)
from nmrestore.runtime import compiled as compiled_module
from nmrestore.sparsity import NMConfig, sparsify_, squash_

#: Small members of the three residual-block families the engine fuses (EDSR, CARN, MSRResNet).
SMALL = {
    "edsr_small": {"n_feats": 8, "n_blocks": 2},
    "carn_small": {"n_feats": 8},
    "msrresnet_small": {"n_feats": 8, "n_blocks": 2},
}


def _kernel_or_skip() -> None:
    if load_kernel() is None:  # pragma: no cover - only without a compiler
        pytest.skip("sparse kernel unavailable on this machine")


def _model(name: str = "edsr_small", routes: tuple[int, ...] | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(name, scale=2, **SMALL[name])  # type: ignore[arg-type]
    sparsify_(model, NMConfig(n=2, m=4) if routes is None else NMConfig(m=4, routes=routes))
    return model.eval()


def _engine(config: EngineConfig, shape: tuple[int, ...] = (1, 3, 12, 10), name: str = "edsr_small") -> nn.Module:
    engine = compile_sparse(_model(name), config)
    with torch.no_grad():
        x = torch.rand(*shape)
        engine(x)
        engine(x)  # hand-off pairs in place
    return engine


def _count_timings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every tactic timing (the layer's name) from now on."""
    calls: list[str] = []
    original = SparseLayer._time_all

    def counted(self: SparseLayer, *args: Any, **kwargs: Any) -> Any:
        calls.append(self.layer_name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SparseLayer, "_time_all", counted)
    return calls


def _no_packing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("loading a compiled file must not pack weights")

    for name in ("csr_from_dense", "csr_from_packed", "detect_nm"):
        monkeypatch.setattr(packing, name, refuse)
    from nmrestore.runtime import engine as engine_module

    for name in ("csr_from_dense", "csr_from_packed", "detect_nm"):
        monkeypatch.setattr(engine_module, name, refuse)


def _decisions(model: nn.Module) -> dict[tuple[Any, ...], tuple[str, float | None, float | None]]:
    state = engine_state(model)
    assert state is not None
    return {
        (d.layer, d.route, d.input_shape, d.threads): (d.choice, d.dense_ms, d.sparse_ms) for d in state.table()
    }


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("tactic", ["auto", "sparse"])
def test_round_trip_same_outputs_no_timing_no_packing(
    name: str, tactic: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _kernel_or_skip()
    config = EngineConfig(tactic=tactic, timing_repeats=1)  # type: ignore[arg-type]
    engine = _engine(config, name=name)
    x = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        expected = engine(x)
    path = save_compiled(engine, tmp_path / "m.nmc.safetensors")
    assert is_compiled(path)
    timings = _count_timings(monkeypatch)
    _no_packing(monkeypatch)
    loaded = load_compiled(path)
    with torch.no_grad():
        first, again = loaded(x), loaded(x)
    assert timings == []  # a recorded shape runs on the recorded decisions
    assert (first - expected).abs().max() <= 1e-6 and (again - expected).abs().max() <= 1e-6
    saved, restored = _decisions(engine), _decisions(loaded)
    assert saved and saved == restored
    if tactic == "auto":
        assert {d.reason for d in engine_state(loaded).table()} <= {"from file"}  # type: ignore[union-attr]
    else:
        assert any(d.choice == "sparse" for d in engine_state(loaded).table())  # type: ignore[union-attr]
    # the same fusions, and no dense masked weights in the file: sparse layers are CSR only
    assert sum(isinstance(m, FusedResidual) for m in loaded.modules()) == sum(
        isinstance(m, FusedResidual) for m in engine.modules()
    )
    assert [(s.layer_name, s.relu, getattr(s, "shuffle", 1)) for s in sparse_layers(loaded)] == [
        (s.layer_name, s.relu, getattr(s, "shuffle", 1)) for s in sparse_layers(engine)
    ]
    keys = load_file(str(path)).keys()
    assert not any("parametrizations" in k for k in keys)
    assert all(f"values:{s.layer_name}" in keys for s in sparse_layers(engine) if s.routes[0].nm)
    # dense convs on the kernel (dense_convs): their dense weight only, the CSR form rebuilt on load
    assert all(f"dense:{s.layer_name}" in keys for s in sparse_layers(engine) if not s.routes[0].nm)
    assert not any(k == f"param:{s.layer_name}.weight" for s in sparse_layers(engine) for k in keys)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_16_bit_engine_round_trips_and_is_redecided_where_the_kernel_lacks_it(
    precision: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _kernel_or_skip()
    lib = load_kernel()
    assert lib is not None
    flag = "has_bf16" if precision == "bf16" else "has_f16"
    if not getattr(lib, flag):
        pytest.skip(f"no {precision} kernels here")
    tactic = f"sparse_{precision}"
    engine = _engine(EngineConfig(tactic="sparse", precision=precision, timing_repeats=1))  # type: ignore[arg-type]
    x = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        expected = engine(x)
    assert any(d.choice == tactic for d in engine_state(engine).table())  # type: ignore[union-attr]
    path = save_compiled(engine, tmp_path / "m.nmc.safetensors")
    loaded = load_compiled(path)
    with torch.no_grad():
        loaded(x)
        again = loaded(x)  # the 16-bit hand-offs asked on the first run are in place
    assert torch.equal(again, expected) and _decisions(loaded) == _decisions(engine)
    monkeypatch.setattr(lib, flag, False)  # a build without that kernel: its decisions are not taken
    elsewhere = load_compiled(path)
    with torch.no_grad():
        out = elsewhere(x)
    table = engine_state(elsewhere).table()  # type: ignore[union-attr]
    assert table and not any(d.choice == tactic for d in table)
    assert (out - expected).abs().max() <= 3e-2


def test_a_new_shape_is_timed_as_usual_and_the_reference_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _kernel_or_skip()
    engine = _engine(EngineConfig(timing_repeats=1))
    path = save_compiled(engine, tmp_path / "m.nmc.safetensors")
    timings = _count_timings(monkeypatch)
    loaded = load_compiled(path)
    y = torch.rand(1, 3, 9, 7)
    with torch.no_grad():
        got = loaded(y)
        reference = read_compiled(path).dense_model()(y)
    assert timings  # a shape the file has no decision for
    assert (got - reference).abs().max() <= 1e-4
    model = _model()
    assert (reference - squash_(copy.deepcopy(model))(y)).abs().max() <= 1e-6  # the dense-with-zeros model


def test_decisions_are_redecided_on_a_cpu_with_other_features(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _kernel_or_skip()
    path = save_compiled(_engine(EngineConfig(timing_repeats=1)), tmp_path / "m.nmc.safetensors")
    monkeypatch.setattr(compiled_module, "_cpu_signature", lambda: {"features": {"amx_tile": True}, "flags_sha256": "x"})
    timings = _count_timings(monkeypatch)
    loaded = load_compiled(path)  # still loads: decisions are advice
    assert not engine_state(loaded).decisions  # type: ignore[union-attr]
    with torch.no_grad():
        loaded(torch.rand(1, 3, 12, 10))
    assert timings


def test_nmrestore_load_recognises_a_compiled_file(tmp_path: Path) -> None:
    _kernel_or_skip()
    engine = _engine(EngineConfig(tactic="sparse"))
    path = save_compiled(engine, tmp_path / "m.nmc.safetensors")
    loaded, recipe = nmrestore.load(path)
    assert recipe.model.name == "edsr_small" and recipe.model.scale == 2 and recipe.model.kwargs == SMALL["edsr_small"]
    assert engine_state(loaded) is not None
    from nmrestore.engine.loading import load_any

    with pytest.raises(CheckpointError, match="compiled engine file"):
        load_any(path)


def _rewrite(path: Path, change: Callable[[dict[str, Any], dict[str, torch.Tensor]], None]) -> None:
    """Edit a compiled file and re-sign it with a valid digest (a crafted file, not a damaged one)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["nmrestore"])
    tensors = load_file(str(path))
    change(meta, tensors)
    meta.pop("sha256")
    meta["sha256"] = integrity_digest(tensors, meta)
    save_file(tensors, str(path), metadata={"nmrestore": json.dumps(meta)})


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    _kernel_or_skip()
    return save_compiled(_engine(EngineConfig(tactic="sparse")), tmp_path / "m.nmc.safetensors")


def test_a_flipped_byte_is_refused_before_anything_runs(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's bytes
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_compiled(saved)


def test_a_truncated_file_is_refused(saved: Path) -> None:
    saved.write_bytes(saved.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_compiled(saved)


def test_another_format_version_is_refused_by_name(saved: Path) -> None:
    _rewrite(saved, lambda meta, tensors: meta.update(format="nmrestore-compiled/9"))
    assert is_compiled(saved)
    with pytest.raises(CheckpointError, match=r"compiled format 'nmrestore-compiled/9'.*compile the checkpoint again"):
        load_compiled(saved)


def test_a_training_checkpoint_is_not_a_compiled_file(tmp_path: Path) -> None:
    from nmrestore.engine.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / "c.safetensors", _model(), {})
    assert not is_compiled(path)
    with pytest.raises(CheckpointError, match="not a compiled engine file"):
        load_compiled(path)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m, t: t[next(k for k in t if k.startswith("cin:"))].__setitem__(0, 10**6), "out of range"),
        (lambda m, t: t[next(k for k in t if k.startswith("kpos:"))].__setitem__(0, -1), "out of range"),
        (lambda m, t: t[next(k for k in t if k.startswith("rowptr:"))].__setitem__(-1, 3), "row pointers"),
        (lambda m, t: t.pop(next(k for k in t if k.startswith("values:"))), "no 'values' tensor"),
        (lambda m, t: m["model"].update(kwargs={"n_feats": 16, "n_blocks": 2}), "the model needs|does not match the model"),
        (lambda m, t: m["model"].update(kwargs={"n_feats": 10**6}), "4096"),
        (lambda m, t: m["layers"][next(k for k, v in m["layers"].items() if v["nm"])].update(nm=[1, 4]), "keeps more than 1 of 4"),
        (lambda m, t: m["layers"][next(iter(m["layers"]))].update(relu=False), "fuses other operations"),
        (lambda m, t: m["decisions"][0].update(layer="nowhere"), "a decision names layer"),
        (lambda m, t: m["decisions"][0].update(choice="fast"), "choice must be one of dense, dense_bf16"),
        (lambda m, t: m.pop("machine"), "no 'machine' section"),
        (lambda m, t: m["engine"].update(tactic="fastest"), "bad engine settings"),
    ],
)
def test_crafted_files_with_a_valid_digest_are_refused(saved: Path, edit: Any, needle: str) -> None:
    _rewrite(saved, edit)
    with pytest.raises(CheckpointError, match=needle):
        load_compiled(saved)


def test_models_with_several_routes_or_not_compiled_are_refused(tmp_path: Path) -> None:
    routed = compile_sparse(_model(routes=(1, 2)), EngineConfig(tactic="sparse"))
    with pytest.raises(NMRestoreError, match="2 routes"):
        save_compiled(routed, tmp_path / "r.nmc.safetensors")
    with pytest.raises(NMRestoreError, match="returned by compile_sparse"):
        save_compiled(_model(), tmp_path / "p.nmc.safetensors")
    assert not (tmp_path / "r.nmc.safetensors").exists()


def test_a_squashed_model_round_trips(tmp_path: Path) -> None:
    _kernel_or_skip()
    squashed = squash_(_model())
    engine = compile_sparse(squashed, EngineConfig(tactic="sparse"))
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        expected = engine(x)
    loaded = load_compiled(save_compiled(engine, tmp_path / "s.nmc.safetensors"))
    with torch.no_grad():
        assert (loaded(x) - expected).abs().max() <= 1e-6
    # the first and last convs are dense convs on the kernel (dense_convs), nothing is left untouched
    assert [s.layer_name for s in sparse_layers(loaded) if s.routes[0].nm is None] == ["head.0", "tail.1"]
    assert not engine_state(loaded).untouched  # type: ignore[union-attr]
