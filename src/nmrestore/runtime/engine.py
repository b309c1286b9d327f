"""``compile_sparse``: swap every N:M layer of a model for a sparse-kernel layer (inference only).

Where the N:M weights come from, per layer:

* an :class:`~nmrestore.sparsity.parametrization.NMMask` (a model from ``sparsify_``, a training
  checkpoint or a packed checkpoint via ``load_packed``): one weight set per route. A mask that is
  a rank prefix (``rank < N``: uniform, one-shot, SR-STE, SLS, ClassPruning) is packed with
  :func:`~nmrestore.sparsity.nm.pack` and converted from kept values + in-group indices; any other
  mask (PNG's per-task sets) from its effective weight's non-zeros. A route with N = M stays dense.
* a plain layer (a squashed, dense-with-zeros model): the N:M pattern is detected from its zeros
  (:func:`~nmrestore.runtime.packing.detect_nm`); layers without one are left untouched.

Every swapped layer picks, per (route, input shape, threads), the faster of the sparse kernel and
dense PyTorch by timing both on first use (see :mod:`nmrestore.runtime.layers`). Timings are kept
in memory and, with ``EngineConfig.cache_file``, in a JSON file keyed by the layer's structure,
the input shape, the thread count and the kernel build (which encodes the CPU), so a later
process reuses them. A ReLU that directly follows a swapped layer in an ``nn.Sequential`` is fused
into it, and so is the skip sum of the zoo's residual blocks (EDSR ``ResBlock``, CARN's residual
block, MSRResNet's ``ResidualBlockNoBN``): the kernel applies them while the tile is in
registers, saving a pass over the output for each; so is a ``nn.PixelShuffle`` after a sparse conv
(the kernel writes the shuffled output). Consecutive sparse convs hand their activations over in
the kernel's padded layout (see :mod:`nmrestore.runtime.layers`).

**Precision.** ``EngineConfig(precision="bf16")`` (or ``"auto"``: bf16 where the CPU has
AVX512-BF16 or AMX) adds two tactics per conv to the timed choice: the bf16 sparse kernel (bf16
activations and weights, f32 accumulation) and PyTorch's bf16 channels-last conv (oneDNN, AMX);
convs without an N:M pattern (the first and last) are then wrapped too, to choose between dense
f32 and dense bf16. Inside a fused residual block the first conv hands its output to the second
in bf16 only; elsewhere a bf16 kernel output is f32 with a bf16 copy for a bf16 consumer.
``precision="fp16"`` adds the fp16 sparse kernel instead (AVX512-FP16: fp16 activations, weights
and sums, twice the MACs per instruction of f32 FMA) and PyTorch's bf16 conv for the dense convs
(this CPU family's matrix units take bf16, not fp16); ``"auto"`` adds every 16-bit tactic the CPU
has. The default stays ``"f32"``: bf16 rounds activations and weights (about 3 significant digits),
fp16 to about 3.3 digits and sums in fp16 (its outputs are checked finite before it is chosen).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from nmrestore.errors import NMRestoreError
from nmrestore.io_atomic import atomic_write_text
from nmrestore.runtime.cpu_features import cpu_features
from nmrestore.runtime.dense_runtime import DelegatingForward, DenseRuntimes
from nmrestore.runtime.fusion import fuse_relus, fuse_residuals, fuse_shuffles, set_child
from nmrestore.runtime.kernel import KernelLibrary, kernel_status, load_kernel
from nmrestore.runtime.layers import LayerDecision, RouteWeights, SparseConv2d, SparseLayer, SparseLinear
from nmrestore.runtime.packing import CSRWeight, csr_from_dense, csr_from_packed, detect_nm
from nmrestore.runtime.plans import close_call, refine
from nmrestore.runtime.spatial import RouteMap
from nmrestore.sparsity import nm
from nmrestore.sparsity.parametrization import NMMask, dense_weight, nm_mask_of

log = logging.getLogger("nmrestore.runtime")

Tactic = Literal["auto", "sparse", "dense"]
Precision = Literal["f32", "bf16", "fp16", "auto"]


class EngineConfig(BaseModel):
    """How :func:`compile_sparse` runs the N:M layers.

    ``tactic``: ``auto`` times sparse against dense per layer and input shape on first use and
    keeps the faster; ``sparse`` always uses the kernel where it can run; ``dense`` never does
    (a reference that goes through the same layers). ``max_density``: a route denser than this
    skips the timing and runs dense. ``timing_repeats``: timed runs of each tactic (after one
    warm-up each), the median decides. ``fuse_relu`` / ``fuse_residual``: let a sparse conv apply
    the following ReLU / the residual sum of the zoo's residual blocks (EDSR, CARN, MSRResNet) in
    its epilogue. ``fuse_shuffle``: let a sparse conv followed by ``nn.PixelShuffle`` write the
    shuffled output itself. ``handoff``: let a sparse conv write its output straight into the
    zero-padded layout the next sparse conv reads (no padding pass per layer; the pairs are found
    from the data flow on the first forward). ``cache_file``: JSON file of timings shared across runs.
    ``precision``: ``f32`` (every tactic in f32), ``bf16`` (conv layers may also run in bf16: the
    sparse kernel's bf16 form where it is built, PyTorch's bf16 conv; the timed choice decides),
    ``fp16`` (the sparse kernel's fp16 form where it is built, PyTorch's bf16 conv for dense convs) or
    ``auto`` (the bf16 tactics on a CPU with AVX512-BF16 or AMX, the fp16 kernel on one with
    AVX512-FP16, else ``f32``). ``refine`` (tactic ``auto``,
    not under a route map): after the first forward of an input shape has chosen every layer's
    tactic, time a few consistent whole-model plans end to end and keep the fastest
    (:mod:`nmrestore.runtime.plans`); the first call returns the kept plan's output, like later ones.
    An f32 engine does so only when some layer's two tactics timed within ``plans.CLOSE_CALL`` of each other.
    ``dense_convs`` (on by default): also put plain dense convolutions (no N:M pattern, e.g. the
    first and last convs the papers keep dense) on the kernel with all their weights, and time them
    against PyTorch like the others (``max_density`` does not apply to them): the direct kernel wins
    where oneDNN is weak, e.g. EDSR's last conv, 64 -> 3 channels at the output size: 16 ms against
    PyTorch's 36 ms on EDSR-baseline x2 at 320x180 (2 threads, idle), which took the whole 2:32 engine
    from 211 to 188 ms. Off: those layers stay plain PyTorch modules.
    ``dense_runtime`` (``"openvino"``; tactic ``auto``, one route): after the first forward of an input
    shape, also time the whole model dense on OpenVINO (at f32 for an f32 engine, at its default
    precision for a bf16 or fp16 one) and run that shape there when it is faster
    (:mod:`nmrestore.runtime.dense_runtime`). ``"none"`` (default): the engine runs every shape itself.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tactic: Tactic = "auto"
    timing_repeats: int = Field(3, ge=1, le=100)
    max_density: float = Field(0.75, gt=0, le=1)
    fuse_relu: bool = True
    fuse_residual: bool = True
    fuse_shuffle: bool = True
    handoff: bool = True
    cache_file: Path | None = None
    precision: Precision = "f32"
    refine: bool = True
    dense_convs: bool = True
    dense_runtime: Literal["none", "openvino"] = "none"

    @model_validator(mode="after")
    def _dense_runtime_is_timed(self) -> EngineConfig:
        if self.dense_runtime != "none" and self.tactic != "auto":
            raise ValueError(f"dense_runtime={self.dense_runtime!r} is a timed choice: it needs tactic 'auto'")
        return self


def bf16_allowed(precision: Precision) -> bool:
    """Whether an engine of this precision may run bf16 tactics here."""
    if precision == "auto":
        features = cpu_features()
        return bool(features.get("avx512_bf16") or features.get("amx_bf16"))
    return precision == "bf16"


def f16_allowed(precision: Precision) -> bool:
    """Whether an engine of this precision may run the fp16 kernel here (where it is built)."""
    if precision == "auto":
        return bool(cpu_features().get("avx512_fp16"))
    return precision == "fp16"


@dataclass(frozen=True)
class UntouchedLayer:
    """A Conv/Linear layer left as it is, with the reason (listed in every report)."""

    layer: str
    kind: str
    reason: str


@dataclass
class EngineState:
    """Shared by the sparse layers of one compiled model: config, kernel, decisions, timing cache."""

    config: EngineConfig
    kernel: KernelLibrary | None
    kernel_reason: str
    kernel_id: str
    decisions: dict[tuple[str, int, tuple[int, ...], int], LayerDecision] = field(default_factory=dict)
    untouched: list[UntouchedLayer] = field(default_factory=list)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # signature -> {tactic: ms}
    bf16: bool = False  # the bf16 tactics may be chosen (precision bf16, or auto on such a CPU)
    f16: bool = False  # the fp16 kernel (and dense bf16) may be chosen (precision fp16, or auto)
    fresh: list[tuple[SparseLayer, tuple[int, tuple[int, ...], int]]] = field(default_factory=list)
    refining: bool = False
    plans: list[str] = field(default_factory=list)  # the whole-model plans chosen, in order
    spatial: RouteMap | None = None  # set by use_spatial_routes: routed layers run tile by tile
    dense_runtime: DenseRuntimes | None = None  # EngineConfig.dense_runtime: the whole-model fallback

    def __post_init__(self) -> None:
        self.bf16 = self.bf16 or bf16_allowed(self.config.precision)  # whoever builds the state
        self.f16 = self.f16 or f16_allowed(self.config.precision)

    @property
    def reduced(self) -> bool:
        """Whether any 16-bit tactic may be chosen."""
        return self.bf16 or self.f16

    def record(self, decision: LayerDecision) -> None:
        key = (decision.layer, decision.route, decision.input_shape, decision.threads)
        self.decisions[key] = decision

    def cached_times(self, signature: str) -> dict[str, float] | None:
        """``{tactic: ms}`` timed before for this structure (this process or the cache file)."""
        return self.timings.get(f"{self.kernel_id}|{signature}")

    def store_times(self, signature: str, times: dict[str, float]) -> None:
        self.timings[f"{self.kernel_id}|{signature}"] = dict(times)
        if self.config.cache_file is not None:
            _save_cache(self.config.cache_file, self.timings)

    def cached_timing(self, signature: str) -> tuple[float, float] | None:
        """(dense ms, sparse ms) of the f32 tactics, as before there were bf16 ones."""
        times = self.cached_times(signature)
        return (
            None
            if times is None or not {"dense", "sparse"} <= set(times)
            else (times["dense"], times["sparse"])
        )

    def store_timing(self, signature: str, dense_ms: float, sparse_ms: float) -> None:
        self.store_times(signature, {"dense": dense_ms, "sparse": sparse_ms})

    def table(self) -> list[LayerDecision]:
        return list(self.decisions.values())


# -- disk cache -------------------------------------------------------------------------------
def _times(value: object) -> dict[str, float]:
    """One cache entry: ``{tactic: ms}`` (format 2) or ``[dense ms, sparse ms]`` (format 1)."""
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()}
    dense, sparse = value  # type: ignore[misc]
    return {"dense": float(dense), "sparse": float(sparse)}


def _load_cache(path: Path) -> dict[str, dict[str, float]]:
    try:
        raw = json.loads(path.read_text())
        return {str(k): _times(v) for k, v in raw.get("timings", {}).items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, IndexError, AttributeError) as exc:
        log.warning("ignoring unreadable tactic cache %s (%s)", path, exc)
        return {}


def _save_cache(path: Path, timings: dict[str, dict[str, float]]) -> None:
    # Merge with what another process may have written meanwhile, then replace atomically.
    merged = {**_load_cache(path), **timings}
    payload = {"format": "nmrestore-tactics-2", "timings": dict(sorted(merged.items()))}
    try:
        atomic_write_text(path, json.dumps(payload, indent=1))
    except OSError as exc:
        log.warning("could not write tactic cache %s (%s)", path, exc)


# -- building the route weights -----------------------------------------------------------------
def _is_rank_prefix(mask: NMMask, n: int) -> bool:
    """True when the mask of the active route is exactly ``rank < N`` (packable by ranks)."""
    if mask.learns_keep:
        return False
    return bool(torch.equal(mask.mask().bool(), mask.ranks < n))


def _route_weights_masked(module: nn.Module, mask: NMMask) -> list[RouteWeights]:
    routes: list[RouteWeights] = []
    previous = mask.route
    groups = getattr(module, "groups", 1)
    try:
        for route in range(mask.num_routes):
            mask.route = route
            n, m = mask.n, mask.m
            with torch.no_grad():
                effective = module.weight.detach().float().clone().contiguous()
            if n >= m:
                routes.append(RouteWeights(effective, None, None, f"N = M = {m} on this route (dense)"))
                continue
            csr: CSRWeight
            if _is_rank_prefix(mask, n):
                packed = nm.pack(dense_weight(module).detach().float(), mask.ranks, n, m)
                csr = csr_from_packed(packed, groups)
            else:
                csr = csr_from_dense(effective, groups)
            routes.append(RouteWeights(effective, csr, (n, m)))
    finally:
        mask.route = previous
    return routes


def _route_weights_plain(
    module: nn.Module, dense_convs: bool = False
) -> tuple[list[RouteWeights] | None, str]:
    weight = module.weight.detach().float().clone().contiguous()
    found = detect_nm(weight)
    if found is None:
        if dense_convs and isinstance(module, nn.Conv2d):  # every weight kept; timing decides (nm None)
            return [RouteWeights(weight, csr_from_dense(weight, module.groups), None)], ""
        return None, "no N:M pattern in its zeros"
    return [RouteWeights(weight, csr_from_dense(weight, getattr(module, "groups", 1)), found)], ""


def _conv_unsupported(module: nn.Conv2d) -> str | None:
    if module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r} (the kernel pads with zeros)"
    if isinstance(module.padding, str):
        return f"padding {module.padding!r} given as a string"
    if module.groups > 1 and module.in_channels // module.groups == 1:
        return "depthwise convolution"
    return None


def compile_sparse(model: nn.Module, config: EngineConfig | None = None, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``inplace=True``: the model itself) whose N:M layers run on the kernel.

    The result is for inference (``eval()`` mode; run it under ``torch.no_grad()`` or
    ``torch.inference_mode()``: an input that requires grad takes the dense path). Routes and
    tasks are switched on it as on the original (``use_route``, ``select_task``). When the kernel
    cannot be built every layer runs dense and the reason is logged once and kept in
    ``engine_state(model).kernel_reason``.
    """
    config = config or EngineConfig()
    target = model if inplace else copy.deepcopy(model)
    kernel = load_kernel() if config.tactic != "dense" else None
    status = kernel_status() if config.tactic != "dense" else None
    reason = "tactic forced to dense" if status is None else status.reason
    kernel_id = status.library.name if status is not None and status.library is not None else "none"
    state = EngineState(config, kernel, reason, kernel_id)
    if config.cache_file is not None:
        state.timings.update(_load_cache(config.cache_file))
    candidates = [
        (name, module)
        for name, module in target.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear) and not isinstance(module, SparseLayer)
    ]
    for name, module in candidates:
        kind = type(module).__name__.removeprefix("Parametrized")
        if isinstance(module, nn.Conv2d):
            unsupported = _conv_unsupported(module)
            if unsupported is not None:
                state.untouched.append(UntouchedLayer(name, kind, unsupported))
                continue
        mask = nm_mask_of(module)
        if mask is not None:
            routes = _route_weights_masked(module, mask)
        else:
            found, why = _route_weights_plain(module, config.dense_convs)
            if found is None and state.reduced and isinstance(module, nn.Conv2d):
                # no N:M pattern (the first/last conv): wrapped to choose dense f32 or dense bf16
                weight = module.weight.detach().float().clone().contiguous()
                found = [RouteWeights(weight, None, None, why)]
            if found is None:
                state.untouched.append(UntouchedLayer(name, kind, why))
                continue
            routes = found
        new: SparseLayer
        if isinstance(module, nn.Conv2d):
            new = SparseConv2d(module, name, routes, state)
        else:
            new = SparseLinear(module, name, routes, state)
        set_child(target, name, new)
    if config.fuse_relu:
        fuse_relus(target)
    if config.fuse_shuffle:
        fuse_shuffles(target)
    if config.fuse_residual:
        fuse_residuals(target)
    target.eval()
    target.sparse_engine = state  # type: ignore[assignment]  # plain attribute: not a module or buffer
    if config.dense_runtime != "none":
        if any(len(layer.routes) > 1 for layer in sparse_layers(target)):
            raise NMRestoreError(
                "dense_runtime: the model has several routes or tasks, whose weights a whole-model runtime "
                "would not switch; run it without dense_runtime"
            )
        state.dense_runtime = DenseRuntimes.for_model(config.dense_runtime, model, state.reduced)
        # an instance attribute: nn.Module.__call__ finds it before the class's forward
        target.forward = DelegatingForward(target.forward, state)  # type: ignore[method-assign]
    if config.tactic == "auto" and (config.refine or config.dense_runtime != "none"):
        target.register_forward_hook(_refine_plans, with_kwargs=True)
    return target


def _refine_plans(
    module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object], output: object
) -> object:
    """After a forward that chose tactics: time the whole-model plans on the same input, keep the best.

    Returns the kept plan's output in place of the first forward's, so that every call of a shape
    gives the same output as the first."""
    state = engine_state(module)
    if state is None or state.refining:
        return None
    fresh = list(state.fresh)
    state.fresh.clear()
    if not fresh:
        return None
    # an f32 engine whose every layer chose clearly: the plans would agree with it
    plans = state.config.refine and (state.reduced or close_call(fresh, state.decisions))
    runtime = state.dense_runtime
    x = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) else None
    if not plans and (runtime is None or x is None or state.spatial is not None):
        return None
    state.refining = True
    best = None
    result = None
    try:
        with torch.no_grad():
            run = functools.partial(module, *args, **kwargs)
            if plans:
                best = refine(fresh, state.decisions, run, state.config.timing_repeats, sparse_layers(module))
                result = run() if best is not None else None
            if runtime is not None and x is not None and state.spatial is None:
                choice = runtime.consider(run, x, state.config.timing_repeats)
                if choice is not None and choice.kept:
                    result = run()  # now on the runtime: the first call returns what later ones will
    finally:
        state.refining = False
        state.fresh.clear()
    if best is not None:
        state.plans.append(best)
        log.info("whole-model plan %r kept", best)
    return result


def engine_state(model: nn.Module) -> EngineState | None:
    """The :class:`EngineState` of a model returned by :func:`compile_sparse` (None otherwise)."""
    state = getattr(model, "sparse_engine", None)
    return state if isinstance(state, EngineState) else None


@contextmanager
def use_spatial_routes(model: nn.Module, route_map: RouteMap) -> Iterator[nn.Module]:
    """Run a compiled model with every tile of ``route_map`` on its own route (:mod:`.spatial`).

    Inside the block ``model(x)`` restores one image of the route map's LR size; layers whose routes
    hold the same weights (and layers the engine left untouched) run on the whole map.
    """
    state = engine_state(model)
    if state is None:
        raise ValueError("use_spatial_routes needs a model compiled by compile_sparse")
    previous = state.spatial
    state.spatial = route_map
    try:
        yield model
    finally:
        state.spatial = previous


def routed_layers(model: nn.Module) -> list[SparseLayer]:
    """The sparse layers whose routes hold different weights (the ones a route map splits into tiles)."""
    return [m for m in sparse_layers(model) if m.routed]


def sparse_layers(model: nn.Module) -> list[SparseLayer]:
    return [m for m in model.modules() if isinstance(m, SparseLayer)]


def reset_tactics(model: nn.Module) -> None:
    """Forget every tactic decision (memory only) so the next forward times again."""
    for layer in sparse_layers(model):
        layer.forget_choices()
    state = engine_state(model)
    if state is not None:
        state.decisions.clear()
        if state.config.cache_file is None:
            state.timings.clear()


def format_decisions(decisions: list[LayerDecision]) -> str:
    """The per-layer choice table as text (with 16-bit columns when a 16-bit tactic was timed)."""
    bf16 = any(k.endswith(("bf16", "fp16")) for d in decisions for k in d.times_ms)
    f16 = any(k == "sparse_fp16" for d in decisions for k in d.times_ms)
    extra = f" {'dense16':>9} {'sparse16':>9}" if bf16 else ""
    extra += f" {'fp16 ms':>9}" if f16 else ""
    header = (
        f"{'layer':<28} {'kind':<7} {'route':>5} {'input':<18} {'N:M':>6} {'dense ms':>9} {'sparse ms':>9}"
        f"{extra}  choice"
    )
    lines = [header, "-" * len(header)]

    def ms(value: float | None) -> str:
        return f"{value:9.2f}" if value is not None else f"{'-':>9}"

    for d in decisions:
        cols = f"{ms(d.dense_ms)} {ms(d.sparse_ms)}"
        if bf16:
            cols += f" {ms(d.times_ms.get('dense_bf16'))} {ms(d.times_ms.get('sparse_bf16'))}"
        if f16:
            cols += f" {ms(d.times_ms.get('sparse_fp16'))}"
        shape = "x".join(str(s) for s in d.input_shape)
        note = "" if d.reason in ("timed",) else f" ({d.reason})"
        lines.append(f"{d.layer:<28} {d.kind:<7} {d.route:>5} {shape:<18} {d.nm:>6} {cols}  {d.choice}{note}")
    return "\n".join(lines)
