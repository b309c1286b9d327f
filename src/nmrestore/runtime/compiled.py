"""Compiled engine files: a :func:`~nmrestore.runtime.compile_sparse` model saved and reloaded as it is.

``save_compiled(engine, path)`` writes one safetensors file (through the project's atomic writer)
holding what the engine runs on, and ``load_compiled(path)`` returns the engine again without
re-packing a weight or timing a tactic:

* the CSR form (:class:`~nmrestore.runtime.packing.CSRWeight`) and bias of every sparse layer,
  never its dense masked weight (the dense tactic's dense-with-zeros weight is rebuilt from it);
* the weights of every other layer, keyed as the uncompiled architecture names them;
* how to rebuild that architecture (registered model name, scale, keywords): the model is built
  by its builder after the same keyword and size checks as checkpoints (``allow_large``), and the
  file's tensors must match it name for name and shape for shape;
* the engine settings and the fusions applied (ReLU, PixelShuffle, residual sums), re-applied on
  load and checked against the record; each sparse conv's hand-off padding;
* every tactic decision, per layer and (route, input shape, threads): used as they are, so an input
  of a recorded shape runs at once, and a new shape (or thread count) is timed as usual. Decisions
  are advice: on a CPU with other features (:mod:`nmrestore.runtime.cpu_features` and a digest of
  the whole flags line), another kernel ABI or without the kernel they are dropped and re-decided.

A SHA-256 over metadata and tensors (:mod:`nmrestore.integrity`, as checkpoints) is checked before
anything is built, then every CSR index is bounded (:mod:`nmrestore.runtime.compiled_format`).
Only single-route engines are saved: a model with several routes (ClassPruning's adaptive patch
pipeline, PNG's tasks, ``NMConfig(routes=...)``) is refused with the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from nmrestore.errors import CheckpointError, NMRestoreError, short_repr
from nmrestore.integrity import DIGEST_KEY, integrity_digest
from nmrestore.io_atomic import as_os_error, atomic_path
from nmrestore.models.registry import MAX_MODEL_BYTES, check_model_kwargs, check_model_size, create_model
from nmrestore.runtime.compiled_format import (
    COMPILED_FORMAT,
    CSR_FIELDS,
    check_meta,
    csr_weight,
    dense_from_csr,
)
from nmrestore.runtime.cpu_features import CPUINFO, cpu_features
from nmrestore.runtime.engine import (
    EngineConfig,
    EngineState,
    UntouchedLayer,
    _load_cache,
    engine_state,
    sparse_layers,
)
from nmrestore.runtime.fusion import FusedResidual, fuse_relus, fuse_residuals, fuse_shuffles, set_child
from nmrestore.runtime.kernel import ABI_VERSION, kernel_status, load_kernel
from nmrestore.runtime.layers import RouteWeights, SparseConv2d, SparseLayer, SparseLinear
from nmrestore.runtime.packing import csr_from_dense

__all__ = [
    "COMPILED_FORMAT",
    "CompiledFile",
    "ModelBuild",
    "is_compiled",
    "load_compiled",
    "read_compiled",
    "save_compiled",
]

log = logging.getLogger("nmrestore.runtime")

#: Decision reasons that are tactic choices (re-labelled "from file" when loaded).
_CHOSEN = ("timed", "reused")
#: Largest hand-off padding accepted from a file (a consumer's padding: half its dilated kernel).
MAX_HANDOFF_PAD = 64


@dataclass(frozen=True)
class ModelBuild:
    """How to rebuild the uncompiled architecture: ``create_model(name, scale=scale, **kwargs)``."""

    name: str
    scale: int
    kwargs: dict[str, Any]

    @classmethod
    def of(cls, model: nn.Module) -> ModelBuild:
        """What :func:`~nmrestore.models.create_model` recorded on ``model`` (or a copy of it)."""
        name, scale, kwargs = (getattr(model, a, None) for a in ("model_name", "scale", "model_kwargs"))
        if not isinstance(name, str) or not isinstance(scale, int) or not isinstance(kwargs, dict):
            raise NMRestoreError(
                "the model does not say how it was built (it did not come from create_model); "
                "pass build=ModelBuild(name, scale, kwargs)"
            )
        return cls(name, scale, dict(kwargs))

    def to_dict(self) -> dict[str, Any]:
        try:  # exactly what a reader will parse (tuples become lists)
            kwargs = json.loads(json.dumps(self.kwargs))
        except (TypeError, ValueError) as exc:
            raise NMRestoreError(f"model keywords of {self.name} are not JSON: {exc}") from None
        return {"name": self.name, "scale": self.scale, "kwargs": kwargs}


def _cpu_signature() -> dict[str, Any]:
    """What a tactic decision depends on besides the kernel: the CPU's features."""
    try:
        flags = next(
            (
                line
                for line in CPUINFO.read_text(errors="replace").splitlines()
                if line.startswith(("flags", "Features"))
            ),
            "",
        )
    except OSError:
        flags = ""
    digest = hashlib.sha256(flags.encode()).hexdigest()[:16] if flags else None
    return {"features": cpu_features(), "flags_sha256": digest}


# -- the uncompiled architecture inside a compiled model ------------------------------------
def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path in the uncompiled model, module) over a compiled model: a fused residual block stands
    at its block's path and is walked through it, a sparse layer is a leaf, masks are skipped."""
    yield prefix, module
    if isinstance(module, SparseLayer):
        return
    inner = module.block if isinstance(module, FusedResidual) else module
    for name, child in inner._modules.items():
        if child is not None and name != "parametrizations":
            yield from _walk(child, f"{prefix}.{name}" if prefix else name)


def _plain_target(module: nn.Module) -> nn.Module:
    """The module whose parameters the uncompiled model has at this path."""
    if isinstance(module, FusedResidual):
        return module.block
    return module.source if isinstance(module, SparseLayer) else module


def _meta_model(build: ModelBuild) -> nn.Module:
    with torch.device("meta"):  # structure and shapes only: nothing allocated
        return create_model(build.name, scale=build.scale, **build.kwargs)


def _plain_state(model: nn.Module, build: ModelBuild, sparse: set[str]) -> dict[str, Tensor]:
    """Every tensor of the uncompiled model except the sparse layers' weights and biases."""
    reference = _meta_model(build)
    paths = dict(_walk(model))
    expected = {name for name, _ in reference.named_modules(remove_duplicate=False)}
    if set(paths) != expected:
        extra, missing = sorted(set(paths) - expected)[:3], sorted(expected - set(paths))[:3]
        raise NMRestoreError(
            f"the compiled model is not the architecture {build.name} builds (extra modules {extra}, "
            f"missing {missing}); a method that changes shapes or adds modules cannot be saved compiled"
        )
    state: dict[str, Tensor] = {}
    for key, ref in reference.state_dict(keep_vars=True).items():
        path, _, attr = key.rpartition(".")
        if path in sparse and attr in ("weight", "bias"):
            continue
        value = getattr(_plain_target(paths[path]), attr, None)  # a masked weight: its effective form
        if not isinstance(value, Tensor) or value.shape != ref.shape or value.dtype != ref.dtype:
            raise NMRestoreError(f"{key} of the compiled model does not match what {build.name} builds")
        state[key] = value.detach().cpu().contiguous().clone()  # clones: safetensors refuses shared memory
    return state


# -- saving -----------------------------------------------------------------------------------
def _layer_entry(layer: SparseLayer) -> tuple[dict[str, Any], dict[str, Tensor]]:
    rw = layer.routes[0]
    name = layer.layer_name
    tensors: dict[str, Tensor] = {}
    if rw.csr is not None and rw.nm is not None:
        for field in CSR_FIELDS:
            tensors[f"{field}:{name}"] = getattr(rw.csr, field).contiguous().clone()
    else:  # N = M on its one route, or a plain dense conv (dense_convs): its dense weight
        tensors[f"dense:{name}"] = rw.dense.contiguous().clone()
    bias = layer._bias
    if bias is not None:
        tensors[f"bias:{name}"] = bias.contiguous().clone()
    out_pad = getattr(layer, "out_pad", None)
    entry = {
        "kind": layer.kind,
        "shape": list(rw.dense.shape),
        "groups": int(getattr(layer, "groups", 1)),
        "nm": list(rw.nm) if rw.csr is not None and rw.nm is not None else None,
        "why_dense": rw.why_dense,
        "dense_on_kernel": rw.csr is not None and rw.nm is None,  # dense_convs: timed against PyTorch
        "relu": bool(layer.relu),
        "shuffle": int(getattr(layer, "shuffle", 1)),
        "out_pad": list(out_pad) if out_pad else None,
        "bias": bias is not None,
    }
    return entry, tensors


def save_compiled(
    model: nn.Module, path: str | Path, build: ModelBuild | None = None, recipe: dict[str, Any] | None = None
) -> Path:
    """Write the compiled ``model`` (from :func:`~nmrestore.runtime.compile_sparse`) to ``path``.

    ``build``: how to rebuild its architecture (default: what ``create_model`` recorded on it).
    ``recipe``: the training recipe as a JSON object, kept for loaders that return one
    (``nmrestore.load``). Run the engine on the input shapes it will see first: their tactic
    decisions are saved with it. Returns the path.
    """
    state = engine_state(model)
    if state is None:
        raise NMRestoreError("save_compiled takes a model returned by compile_sparse")
    build = build or ModelBuild.of(model)
    layers = {layer.layer_name: layer for layer in sparse_layers(model)}
    for name, layer in layers.items():
        if len(layer.routes) != 1:
            raise NMRestoreError(
                f"layer {name} has {len(layer.routes)} routes: compiled files hold one route "
                "(ClassPruning's adaptive pipeline and PNG's tasks are not compiled; use --sparse-engine)"
            )
    tensors = {f"param:{k}": v for k, v in _plain_state(model, build, set(layers)).items()}
    entries: dict[str, Any] = {}
    for name, layer in layers.items():
        entries[name], own = _layer_entry(layer)
        tensors.update(own)
    meta: dict[str, Any] = {
        "format": COMPILED_FORMAT,
        "model": build.to_dict(),
        "recipe": recipe,
        "engine": state.config.model_dump(mode="json", exclude={"cache_file"}),
        "layers": entries,
        "fused_residuals": sorted(p for p, m in _walk(model) if isinstance(m, FusedResidual)),
        "untouched": [{"layer": u.layer, "kind": u.kind, "reason": u.reason} for u in state.untouched],
        "decisions": [d.to_dict() for d in state.table()],
        "machine": {
            "cpu": _cpu_signature(),
            "kernel": state.kernel_id,
            "abi": ABI_VERSION if state.kernel is not None else None,
        },
    }
    meta = json.loads(json.dumps(meta))  # exactly what a reader will parse and hash
    meta[DIGEST_KEY] = integrity_digest(tensors, meta)
    path = Path(path)
    with atomic_path(path) as tmp:  # the project's one atomic writer
        try:
            save_file(tensors, str(tmp), metadata={"nmrestore": json.dumps(meta, sort_keys=True)})
        except SafetensorError as exc:  # a full disk arrives wrapped: an OSError again
            raise as_os_error(exc, path) from exc
    return path


# -- reading ----------------------------------------------------------------------------------
def _header(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"compiled file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("nmrestore")
        meta = json.loads(raw) if raw is not None else None
    except (SafetensorError, OSError, ValueError, RuntimeError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not an nmrestore file (no 'nmrestore' metadata object)")
    return meta


def is_compiled(path: str | Path) -> bool:
    """True when ``path`` is a compiled engine file of any version (by its header; not verified)."""
    try:
        fmt = _header(Path(path)).get("format")
    except CheckpointError:
        return False
    return isinstance(fmt, str) and fmt.startswith("nmrestore-compiled/")


@dataclass
class CompiledFile:
    """A verified compiled file: metadata and tensors, nothing built yet."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, Tensor]

    @property
    def build_spec(self) -> ModelBuild:
        model = self.meta["model"]
        return ModelBuild(model["name"], model["scale"], dict(model["kwargs"]))

    def build(self, allow_large: bool = False, cache_file: Path | None = None) -> nn.Module:
        """The engine, as saved (see :func:`load_compiled`)."""
        return _build(self, allow_large, cache_file)

    def dense_model(self, allow_large: bool = False) -> nn.Module:
        """The uncompiled architecture with the dense-with-zeros weights (a reference to compare with)."""
        model, _ = _plain_model(self, allow_large)
        return model


def read_compiled(path: str | Path) -> CompiledFile:
    """Read and verify a compiled file (format, digest over metadata and tensors, metadata shape)."""
    path = Path(path)
    meta = _header(path)
    fmt = meta.get("format")
    if not isinstance(fmt, str) or not fmt.startswith("nmrestore-compiled/"):
        raise CheckpointError(
            f"{path} is not a compiled engine file (format {short_repr(fmt)}); make one with `nmrestore compile`"
        )
    if fmt != COMPILED_FORMAT:
        raise CheckpointError(
            f"{path}: compiled format {short_repr(fmt)} is not the one this nmrestore reads ({COMPILED_FORMAT}); "
            "compile the checkpoint again"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    expected = meta.get(DIGEST_KEY)
    if not isinstance(expected, str) or expected != integrity_digest(tensors, meta):
        raise CheckpointError(f"{path}: checksum mismatch, the compiled file was modified or is damaged")
    del meta[DIGEST_KEY]
    check_meta(path, meta)
    return CompiledFile(path, meta, tensors)


def load_compiled(path: str | Path, allow_large: bool = False, cache_file: Path | None = None) -> nn.Module:
    """The engine a compiled file holds, ready to run: no weight re-packed, no recorded tactic re-timed.

    :class:`~nmrestore.errors.CheckpointError` for a missing, foreign, other-version, tampered or
    damaged file, before anything is built. ``allow_large`` lifts the size limit for files;
    ``cache_file``: a tactic timing cache for shapes the file has no decision for.
    """
    return read_compiled(path).build(allow_large, cache_file)


# -- building ---------------------------------------------------------------------------------
def _plain_model(file: CompiledFile, allow_large: bool) -> tuple[nn.Module, dict[str, RouteWeights]]:
    """The uncompiled architecture with the file's weights, and each sparse layer's route weights."""
    path, build = file.path, file.build_spec
    try:
        if allow_large:
            check_model_kwargs(build.name, build.kwargs)
        else:
            check_model_size(build.name, build.scale, build.kwargs, MAX_MODEL_BYTES)
        model = create_model(build.name, scale=build.scale, **build.kwargs)
    except NMRestoreError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    layers: dict[str, Any] = file.meta["layers"]
    state = {k[len("param:") :]: v for k, v in file.tensors.items() if k.startswith("param:")}
    reference = model.state_dict()
    owned = {f"{name}.{attr}" for name in layers for attr in ("weight", "bias")}  # stored in CSR form
    expected = set(reference) - owned
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)[:3]
        raise CheckpointError(f"{path}: its tensors do not match the {build.name} architecture (e.g. {odd})")
    for key, value in state.items():
        if value.shape != reference[key].shape or value.dtype != reference[key].dtype:
            need = f"{reference[key].dtype} {tuple(reference[key].shape)}"
            raise CheckpointError(
                f"{path}: {key} has {value.dtype} {tuple(value.shape)}, the model needs {need}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: {key} has non-finite values")
    model.load_state_dict(state, strict=False)
    routes: dict[str, RouteWeights] = {}
    for name, entry in layers.items():
        routes[name] = _route_weights(file, model, name, entry)
    return model.eval(), routes


def _route_weights(file: CompiledFile, model: nn.Module, name: str, entry: dict[str, Any]) -> RouteWeights:
    """Put a sparse layer's weights on the rebuilt module; its CSR form is taken as stored."""
    path = file.path
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(
            f"{path}: sparse layer {name!r} is not in the {file.build_spec.name} model"
        ) from None
    shape = tuple(entry["shape"])
    kind = nn.Conv2d if entry["kind"] == "Conv2d" else nn.Linear
    same = type(module) is kind and tuple(module.weight.shape) == shape
    if not same or getattr(module, "groups", 1) != entry["groups"]:
        raise CheckpointError(
            f"{path}: sparse layer {name!r} does not match the model's {type(module).__name__}"
        )
    if entry["bias"] != (module.bias is not None):
        raise CheckpointError(f"{path}: sparse layer {name!r} bias does not match the model's")
    if entry["bias"]:
        bias = file.tensors.get(f"bias:{name}")
        ok = bias is not None and bias.shape == module.bias.shape and bias.dtype == torch.float32
        if not ok or not bool(torch.isfinite(bias).all()):
            raise CheckpointError(f"{path}: sparse layer {name!r} has a missing or bad bias")
        module.bias = nn.Parameter(bias)
    if entry["nm"] is None:
        dense = file.tensors.get(f"dense:{name}")
        if dense is None or tuple(dense.shape) != shape or dense.dtype != torch.float32:
            raise CheckpointError(f"{path}: layer {name!r} has a missing or bad dense weight")
        module.weight = nn.Parameter(dense)
        if entry.get("dense_on_kernel") is True:  # its CSR form is rebuilt here, never read from the file
            return RouteWeights(module.weight.detach(), csr_from_dense(dense, int(entry["groups"])), None)
        return RouteWeights(module.weight.detach(), None, None, entry["why_dense"])
    n_m = (int(entry["nm"][0]), int(entry["nm"][1]))
    csr = csr_weight(path, name, file.tensors, shape, int(entry["groups"]), n_m)
    module.weight = nn.Parameter(dense_from_csr(csr))  # the source layer and the dense tactic share it
    return RouteWeights(module.weight.detach(), csr, n_m)


def _build(file: CompiledFile, allow_large: bool, cache_file: Path | None) -> nn.Module:
    path, meta = file.path, file.meta
    try:
        config = EngineConfig.model_validate({**meta["engine"], "cache_file": cache_file})
    except ValidationError as exc:
        raise CheckpointError(f"{path}: bad engine settings ({exc.error_count()} error(s))") from None
    model, routes = _plain_model(file, allow_large)
    kernel = load_kernel() if config.tactic != "dense" else None
    status = kernel_status() if config.tactic != "dense" else None
    reason = "tactic forced to dense" if status is None else status.reason
    kernel_id = status.library.name if status is not None and status.library is not None else "none"
    state = EngineState(config, kernel, reason, kernel_id)
    if cache_file is not None:
        state.timings.update(_load_cache(cache_file))
    for name, rw in routes.items():
        module = model.get_submodule(name)
        new: SparseLayer
        if isinstance(module, nn.Conv2d):
            new = SparseConv2d(module, name, [rw], state)
        else:
            new = SparseLinear(module, name, [rw], state)  # type: ignore[arg-type]
        set_child(model, name, new)
    _fuse(file, model, config)
    state.untouched = [UntouchedLayer(u["layer"], u["kind"], u["reason"]) for u in meta["untouched"]]
    why = _restore_decisions(file, model, state)
    if why is not None:
        log.info("%s: tactic decisions not reused (%s); each layer decides again on first use", path, why)
    model.eval()
    model.sparse_engine = state  # type: ignore[assignment]  # plain attribute, as compile_sparse sets it
    return model


def _fuse(file: CompiledFile, model: nn.Module, config: EngineConfig) -> None:
    """Apply the fusions as compile_sparse does, then check they are the ones recorded."""
    if config.fuse_relu:
        fuse_relus(model)
    if config.fuse_shuffle:
        fuse_shuffles(model)
    if config.fuse_residual:
        fuse_residuals(model)
    residuals = sorted(p for p, m in _walk(model) if isinstance(m, FusedResidual))
    if residuals != sorted(file.meta["fused_residuals"]):
        raise CheckpointError(f"{file.path}: the fused residual blocks differ from the ones recorded")
    for layer in sparse_layers(model):
        entry = file.meta["layers"][layer.layer_name]
        if layer.relu != entry["relu"] or int(getattr(layer, "shuffle", 1)) != entry["shuffle"]:
            raise CheckpointError(
                f"{file.path}: layer {layer.layer_name!r} fuses other operations than recorded"
            )


def _restore_decisions(file: CompiledFile, model: nn.Module, state: EngineState) -> str | None:
    """Reuse the recorded decisions (and hand-off paddings); the reason when they are not reused."""
    machine = file.meta["machine"]
    if state.kernel is None:
        return f"the sparse kernel is not available here: {state.kernel_reason}"
    if machine.get("abi") != ABI_VERSION:
        return f"recorded with kernel ABI {short_repr(machine.get('abi'))}, this one is {ABI_VERSION}"
    if machine.get("cpu") != _cpu_signature():
        return "recorded on a CPU with other features"
    layers = {layer.layer_name: layer for layer in sparse_layers(model)}
    for row in file.meta["decisions"]:
        layer = layers.get(row["layer"])
        if layer is None or row["route"] != 0:
            raise CheckpointError(
                f"{file.path}: a decision names layer {short_repr(row['layer'])} route {row['route']}"
            )
        rw = layer.routes[0]
        shape = tuple(row["input_shape"])
        if row["reason"].startswith("kernel unavailable"):
            continue  # said of the machine it was compiled on, not of this one
        probe = torch.empty(()).expand(shape)
        if row["choice"].startswith("sparse") and layer._why_not_sparse(probe, rw) is not None:
            continue  # the kernel cannot take it here: decided again on first use
        if row["choice"] not in layer._candidates(probe, rw)[0]:
            continue  # a 16-bit tactic this kernel build or this engine's precision lacks: decided again
        chosen = row["reason"].split(";", 1)[0] in _CHOSEN  # "timed; whole-model plan 'f32'" too
        reason = "from file" if chosen else row["reason"]
        timings = (row.get("dense_ms"), row.get("sparse_ms"))
        layer._record((0, shape, row["threads"]), rw, row["choice"], reason, *timings)
    state.fresh.clear()  # recorded choices are final: no whole-model plans are timed again for them
    for layer in layers.values():
        pad = file.meta["layers"][layer.layer_name]["out_pad"]
        if pad is not None and isinstance(layer, SparseConv2d) and state.config.handoff:
            if max(pad) > MAX_HANDOFF_PAD:  # only memory is at stake, but a crafted file gets no more
                raise CheckpointError(
                    f"{file.path}: layer {layer.layer_name!r} has a hand-off padding of {pad}"
                )
            layer.out_pad = (pad[0], pad[1])
    return None
