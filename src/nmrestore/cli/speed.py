"""``nmrestore speed``: dense PyTorch against the sparse engine on one model and input size, and with
``--vs`` against the runtimes a user would deploy with (ONNX Runtime, OpenVINO: ``export/peers.py``)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from nmrestore.errors import NMRestoreError
from nmrestore.limits import check_speed_size, check_threads
from nmrestore.runtime import EngineConfig, is_compiled, read_compiled
from nmrestore.runtime.speed import SpeedReport, measure_speed


def speed_model(
    name: str | None, scale: int, sparsity: str | None, checkpoint: Path | None, allow_large: bool = False
) -> tuple[nn.Module, str]:
    """The model to time: a checkpoint's (any method, packed or not; ``name`` optional, checked if
    given), or ``name`` with uniform magnitude N:M masks on its initial weights (speed does not depend
    on training)."""
    if checkpoint is not None:
        from nmrestore.engine.loading import load

        model, recipe = load(checkpoint, allow_large=allow_large)
        if name is not None and recipe.model.name != name:
            raise NMRestoreError(f"{checkpoint} holds a {recipe.model.name} model, not {name}")
        method = recipe.sparsity.method if recipe.sparsity is not None else "dense"
        return model, f"{recipe.model.name} x{recipe.model.scale} ({method}, {checkpoint.name})"
    if name is None:
        raise NMRestoreError("give a model name (see `nmrestore models`) or a --checkpoint")
    if sparsity is None:
        raise NMRestoreError("give --sparsity N:M (e.g. 4:32) or a --checkpoint")
    from nmrestore.models import create_model
    from nmrestore.sparsity import NMConfig, parse_nm, sparsify_

    n, m = parse_nm(sparsity)
    model = create_model(name, scale=scale)
    sparsify_(model, NMConfig(n=n, m=m))
    return model, f"{name} x{scale} {n}:{m}"


def _compiled_models(
    path: Path, name: str | None, route: int | None, config: EngineConfig, allow_large: bool
) -> tuple[nn.Module, nn.Module, str]:
    """A compiled file: its dense-with-zeros reference, its engine as saved, and a label."""
    if route is not None:
        raise NMRestoreError(f"{path} is a compiled file of one route; --route needs the checkpoint")
    if config.tactic != "auto":
        raise NMRestoreError(f"{path} is a compiled file: it runs the tactics it was compiled with, not --tactic")
    if config.dense_runtime != "none":
        raise NMRestoreError(f"{path} is a compiled file: it runs its own tactics; --dense-runtime needs the checkpoint")
    file = read_compiled(path)
    build = file.build_spec
    if name is not None and build.name != name:
        raise NMRestoreError(f"{path} holds a {build.name} model, not {name}")
    engine = file.build(allow_large=allow_large, cache_file=config.cache_file)
    return file.dense_model(allow_large), engine, f"{build.name} x{build.scale} (compiled, {path.name})"


def run_speed(
    name: str | None,
    scale: int,
    sparsity: str | None,
    checkpoint: Path | None,
    size: tuple[int, int],
    threads: int | None,
    repeats: int,
    route: int | None,
    config: EngineConfig,
    warmup: int = 1,
    allow_large: bool = False,
    vs: str | None = None,
) -> SpeedReport:
    """Time the model; ``vs`` (``onnxruntime,openvino`` or ``all``) adds the peer runtimes to the
    same interleaved rounds. Peers named explicitly must be installed; with ``all`` a missing one is
    skipped with a note in the report."""
    if repeats < 1:
        raise NMRestoreError(f"--repeats must be at least 1, got {repeats}")
    check_threads(threads)
    peer_names: list[str] = []
    notes: list[str] = []
    if vs is not None:
        from nmrestore.export.peers import available_peers, parse_peers

        peer_names, notes = available_peers(*parse_peers(vs))  # before any work: exit 2 at once
    engine = None
    if checkpoint is not None and checkpoint.is_file() and is_compiled(checkpoint):
        model, engine, label = _compiled_models(checkpoint, name, route, config, allow_large)
    else:
        model, label = speed_model(name, scale, sparsity, checkpoint, allow_large)
    check_speed_size(size, int(getattr(model, "scale", scale) or 1))  # before any allocation
    if route is not None:
        from nmrestore.sparsity.parametrization import nm_layers

        routes = max((mask.num_routes for _, _, mask in nm_layers(model)), default=1)
        if not 0 <= route < routes:
            raise NMRestoreError(f"--route {route} does not exist (the model has {routes} route(s))")
    channels = int(getattr(model, "n_colors", 3) or 3)
    shape = (1, channels, *size)
    with contextlib.ExitStack() as stack:
        peers = []
        if peer_names:
            from nmrestore.export.peers import open_peers

            used = threads if threads is not None else torch.get_num_threads()
            peers = stack.enter_context(open_peers(model, peer_names, used, shape, route))
        report = measure_speed(
            model,
            shape,
            threads=threads,
            repeats=repeats,
            config=config,
            name=label,
            route=route,
            warmup=warmup,
            peers=peers,
            engine=engine,
        )
    report.notes.extend(notes)
    return report
