"""Latency of the sparse engine against dense PyTorch, measured interleaved in one process.

:func:`measure_speed` is what ``nmrestore speed`` and ``benchmarks/bench_speed.py`` run: the
dense reference is the model squashed to dense-with-zeros weights (plain ``F.conv2d``, oneDNN),
the sparse one is :func:`~nmrestore.runtime.engine.compile_sparse` of the same model. After a
warm-up (which makes the sparse layers choose their tactics), both run ``repeats`` interleaved
rounds (:mod:`nmrestore.runtime.timing`); the speed-up is the median of the per-round ratios.
Peers (:class:`Peer`: other runtimes such as ONNX Runtime or OpenVINO, built by
:mod:`nmrestore.export.peers`) join the same interleaved rounds; each gets an output check against
the dense PyTorch f32 output on the same input. :func:`profile_modules` splits one forward into
its leaf modules (the per-layer "where does the time go" table).
"""

from __future__ import annotations

import copy
import functools
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from nmrestore.runtime.cpu_features import cpu_features, describe_features
from nmrestore.runtime.dense_runtime import DenseRuntimeChoice
from nmrestore.runtime.engine import EngineConfig, compile_sparse, engine_state, format_decisions
from nmrestore.runtime.layers import LayerDecision
from nmrestore.runtime.timing import PEER_SETTLE_S, interleaved, paired_median
from nmrestore.sparsity.api import squash_
from nmrestore.sparsity.parametrization import use_route


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with ``threads`` intra-op threads (None: leave as is)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class Peer:
    """Another runtime timed next to the dense and sparse models: ``run`` maps the input to the output.

    ``name`` is the row's key (e.g. ``"openvino default"``), ``precision`` the inference precision
    the runtime reports it uses (e.g. ``f32``, ``bf16``), ``version`` the runtime's version.
    """

    name: str
    precision: str
    version: str
    run: Callable[[Tensor], Tensor]


@dataclass
class PeerRow:
    """One peer's timing and output check (against dense PyTorch f32 on the same input)."""

    name: str
    precision: str
    version: str
    ms: float
    runs_ms: list[float]
    max_abs_diff: float
    speedup: float  # median over rounds of t_dense_pytorch / t_peer
    sparse_speedup: float  # median over rounds of t_peer / t_sparse: how much faster the engine is

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "precision": self.precision,
            "version": self.version,
            "ms": self.ms,
            "runs_ms": self.runs_ms,
            "max_abs_diff": self.max_abs_diff,
            "speedup_vs_pytorch": self.speedup,
            "sparse_engine_speedup": self.sparse_speedup,
        }


@dataclass
class SpeedReport:
    """Dense vs sparse-engine latency of one model on one input, and each layer's tactic."""

    model: str
    input_shape: tuple[int, ...]
    threads: int
    repeats: int
    dense_ms: float
    sparse_ms: float
    max_abs_diff: float
    kernel: str
    decisions: list[LayerDecision] = field(default_factory=list)
    untouched: list[tuple[str, str]] = field(default_factory=list)
    dense_runs_ms: list[float] = field(default_factory=list)
    sparse_runs_ms: list[float] = field(default_factory=list)
    route: int | None = None
    peers: list[PeerRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cpu: dict[str, bool | None] = field(default_factory=cpu_features)
    dense_runtime: list[dict[str, object]] = field(default_factory=list)  # EngineConfig.dense_runtime choices

    @property
    def speedup(self) -> float:
        """Median over rounds of dense / sparse time (:mod:`nmrestore.runtime.timing`'s definition)."""
        return paired_median(self.dense_runs_ms, self.sparse_runs_ms)

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "threads": self.threads,
            "repeats": self.repeats,
            "route": self.route,
            "dense_ms": self.dense_ms,
            "sparse_ms": self.sparse_ms,
            "speedup": self.speedup,
            "max_abs_diff": self.max_abs_diff,
            "kernel": self.kernel,
            "dense_runs_ms": self.dense_runs_ms,
            "sparse_runs_ms": self.sparse_runs_ms,
            "layers": [d.to_dict() for d in self.decisions],
            "untouched": [{"layer": n, "reason": r} for n, r in self.untouched],
            "peers": [p.to_dict() for p in self.peers],
            "notes": self.notes,
            "cpu": self.cpu,
            "dense_runtime": self.dense_runtime,
        }

    def table(self) -> str:
        shape = "x".join(str(s) for s in self.input_shape)
        lines = [
            f"{self.model}: input {shape}, {self.threads} threads, median of {self.repeats} interleaved runs",
            f"  dense PyTorch   {self.dense_ms:10.2f} ms",
            f"  sparse engine   {self.sparse_ms:10.2f} ms",
            f"  speed-up        {self.speedup:10.2f} x   (median of paired ratios; max |diff| {self.max_abs_diff:.2e})",
            f"  {self.kernel}",
        ]
        if self.peers:
            lines += [
                "",
                f"  {'runtime':<22}{'precision':>10}{'ms':>11}{'vs PyTorch':>12}{'sparse vs it':>14}  max |diff|",
                f"  {'PyTorch (dense)':<22}{'f32':>10}{self.dense_ms:11.2f}{1.0:11.2f}x{self.speedup:13.2f}x  0",
            ]
            lines += [
                f"  {p.name:<22}{p.precision:>10}{p.ms:11.2f}{p.speedup:11.2f}x{p.sparse_speedup:13.2f}x  "
                f"{p.max_abs_diff:.2e}"
                for p in self.peers
            ]
            lines.append(
                "  (speed-ups: medians of per-round ratios; max |diff| against PyTorch f32 on the same input)"
            )
        if self.peers or self.notes:
            lines.append(f"  {describe_features(self.cpu)}")
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  {DenseRuntimeChoice(**c).line()}" for c in self.dense_runtime]  # type: ignore[arg-type]
        lines += ["", format_decisions(self.decisions)]
        for name, reason in self.untouched:
            lines.append(f"{name:<28} left as is: {reason}")
        return "\n".join(lines)


@torch.no_grad()
def measure_speed(
    model: nn.Module,
    input_shape: tuple[int, ...],
    threads: int | None = None,
    repeats: int = 5,
    config: EngineConfig | None = None,
    name: str = "model",
    route: int | None = None,
    seed: int = 0,
    warmup: int = 1,
    peers: Sequence[Peer] = (),
    engine: nn.Module | None = None,
    shuffle_seed: int | None = None,
) -> SpeedReport:
    """Dense (squashed) vs :func:`compile_sparse` latency on a random input of ``input_shape``.

    ``engine``: an already compiled model to time instead (a loaded compiled file; ``model`` is then
    its dense-with-zeros reference and ``config`` is not used). ``shuffle_seed``: each round runs the
    contenders in a random order (:func:`~nmrestore.runtime.timing.interleaved`).

    The first sparse forward chooses the tactics (and finds the hand-off pairs), ``warmup`` more
    forwards of each model run untimed; ``max_abs_diff`` covers the first and the last of them (the
    hand-off layout is in use from the second forward on). Each of ``peers`` runs in the same
    rounds; its ``max_abs_diff`` is against the dense output, on the first and the last warm-up run."""
    names = [peer.name for peer in peers]
    if len(set(names)) != len(names) or {"dense", "sparse"} & set(names):
        raise ValueError(f"peer names must be unique and not 'dense' or 'sparse', got {names}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(*input_shape, generator=generator)
    model = model.eval()
    with torch_threads(threads):
        dense = squash_(copy.deepcopy(model)).eval()
        sparse = compile_sparse(model, config) if engine is None else engine
        with _maybe_route(model, route), _maybe_route(sparse, route):
            if route is not None:
                dense = squash_(copy.deepcopy(model)).eval()  # the route's own weights
            reference = dense(x)
            output = sparse(x)  # first call: every sparse layer chooses its tactic here
            diff = float((reference - output).abs().max())
            for _ in range(warmup):
                dense(x)
                output = sparse(x)
            diff = max(diff, float((reference - output).abs().max()))
            peer_diffs = {peer.name: _diff(reference, peer.run(x)) for peer in peers}  # first run
            for peer in peers:
                last = None
                for _ in range(warmup):
                    last = peer.run(x)
                if last is not None:
                    peer_diffs[peer.name] = max(peer_diffs[peer.name], _diff(reference, last))
            # warmed up above (the first sparse forward also checks the output)
            runs: dict[str, Callable[[], object]] = {"dense": lambda: dense(x), "sparse": lambda: sparse(x)}
            for peer in peers:
                runs[peer.name] = functools.partial(peer.run, x)
            settle = PEER_SETTLE_S if peers else 0.0
            timings = interleaved(runs, repeats, warmup=0, settle_s=settle, shuffle_seed=shuffle_seed)
        used = torch.get_num_threads()
    state = engine_state(sparse)
    assert state is not None
    kernel = (
        "sparse kernel unavailable: " + state.kernel_reason
        if state.kernel is None
        else f"kernel {state.kernel_id}"
    )
    return SpeedReport(
        model=name,
        input_shape=tuple(input_shape),
        threads=used,
        repeats=repeats,
        dense_ms=timings.median("dense") * 1e3,
        sparse_ms=timings.median("sparse") * 1e3,
        max_abs_diff=diff,
        kernel=kernel,
        decisions=state.table(),
        untouched=[(u.layer, u.reason) for u in state.untouched],
        dense_runs_ms=[t * 1e3 for t in timings.samples["dense"]],
        sparse_runs_ms=[t * 1e3 for t in timings.samples["sparse"]],
        route=route,
        dense_runtime=[c.to_dict() for c in state.dense_runtime.choices] if state.dense_runtime else [],
        peers=[
            PeerRow(
                name=peer.name,
                precision=peer.precision,
                version=peer.version,
                ms=timings.median(peer.name) * 1e3,
                runs_ms=[t * 1e3 for t in timings.samples[peer.name]],
                max_abs_diff=peer_diffs[peer.name],
                speedup=timings.speedup(peer.name, "dense"),
                sparse_speedup=timings.speedup("sparse", peer.name),
            )
            for peer in peers
        ],
    )


def _diff(reference: Tensor, output: Tensor) -> float:
    """Largest |output - reference| (inf when the shapes differ, NaN-safe: a NaN counts as inf)."""
    if tuple(output.shape) != tuple(reference.shape):
        return float("inf")
    diff = float((output.float() - reference).abs().max())
    return float("inf") if diff != diff else diff


@contextmanager
def _maybe_route(model: nn.Module, route: int | None) -> Iterator[None]:
    if route is None:
        yield
    else:
        with use_route(model, route):
            yield


@dataclass(frozen=True)
class ModuleTime:
    """Median time of one leaf module (or the rest: adds, concatenations, Python) in a forward."""

    name: str
    kind: str
    ms: float


@torch.no_grad()
def profile_modules(model: nn.Module, x: Tensor, repeats: int = 3) -> tuple[list[ModuleTime], float]:
    """Median ms per leaf module over ``repeats`` forwards, plus the median total.

    Residual blocks of the zoo (EDSR, CARN, MSRResNet) are timed whole, fused or not, so a dense
    and a compiled model split the same way. The total minus the leaves is reported as
    ``(other)``: element-wise ops in ``forward`` code (the long skip unless the engine fused it,
    mean shifts, concatenations) and Python overhead.
    """
    atomic = [m for m in model.modules() if _is_atomic(m)]
    inside = {id(sub) for m in atomic for sub in m.modules() if sub is not m}
    leaves = [
        (n, m)
        for n, m in model.named_modules()
        if n
        and id(m) not in inside
        and (_is_atomic(m) or next(m.children(), None) is None)
        and not isinstance(m, nn.Identity)
        and not _passes_through(m)
    ]
    starts: dict[int, float] = {}
    samples: dict[str, list[float]] = {n: [] for n, _ in leaves}
    current: dict[str, float] = {}
    handles = []
    for name, module in leaves:

        def pre(mod: nn.Module, args: object) -> None:
            starts[id(mod)] = time.perf_counter()

        def post(mod: nn.Module, args: object, out: object, _name: str = name) -> None:
            current[_name] = current.get(_name, 0.0) + time.perf_counter() - starts.pop(id(mod))

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    totals: list[float] = []
    try:
        model(x)  # warm-up (and tactic choice for a compiled model)
        for _ in range(repeats):
            current.clear()
            start = time.perf_counter()
            model(x)
            totals.append(time.perf_counter() - start)
            for name in samples:
                if name in current:
                    samples[name].append(current[name])
    finally:
        for h in handles:
            h.remove()
    kinds = {n: type(m).__name__ for n, m in leaves}
    rows = [ModuleTime(n, kinds[n], statistics.median(v) * 1e3) for n, v in samples.items() if v]
    total = statistics.median(totals) * 1e3
    rows.append(ModuleTime("(other)", "-", max(0.0, total - sum(r.ms for r in rows))))
    return rows, total


def _passes_through(module: nn.Module) -> bool:
    """A long skip (fused or not): it runs a module passed to it, whose leaves are timed themselves."""
    from nmrestore.models.common import LongSkip
    from nmrestore.runtime.fusion import FusedLongSkip

    return isinstance(module, LongSkip | FusedLongSkip)


def _is_atomic(module: nn.Module) -> bool:
    """Timed as one piece (its submodules are not leaves): a sparse or parametrized layer, and a
    residual block, fused by the engine or not (a fused block calls its last conv directly, so
    only the block's own hooks see all of its time), and a fused tail (its convs may be one call)."""
    from torch.nn.utils import parametrize

    from nmrestore.runtime.fusion import FusedResidual, FusedTail, residual_pattern
    from nmrestore.runtime.layers import SparseLayer

    return (
        isinstance(module, SparseLayer | FusedResidual | FusedTail)
        or parametrize.is_parametrized(module)
        or residual_pattern(module) is not None
    )
