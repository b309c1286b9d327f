"""Drop-in inference layers that run N:M weights on the sparse CPU kernel or dense PyTorch.

A :class:`SparseConv2d` / :class:`SparseLinear` replaces one pruned layer. It keeps the original
(possibly parametrized) layer as ``source`` so the model's routes still work: ``use_route`` and
``select_task`` set the route on the source's N:M mask, and the layer reads it at every forward
and picks that route's weights (ClassPruning: each route's N has its own compressed weight).

Per (route, input shape, threads) the layer chooses a *tactic*, sparse kernel or dense PyTorch,
like TensorRT's tactic selection: on first use it times both on the real input (interleaved,
median of a few runs) and keeps the faster. Decisions are cached in memory and, with a cache
file, on disk (see :mod:`nmrestore.runtime.engine`).

**Hand-off between sparse convs.** Every sparse conv output carries its producer; a sparse conv
that receives it (and has chosen the kernel) asks the producer for its padding, and from the next
forward on the producer writes a zero-bordered hand-off view that this consumer reads in place
(no padding pass; see :class:`~nmrestore.runtime.kernel.HandoffLayout`). So the pairs that use
the hand-off are found from the real data flow, whatever the model's ``forward`` does; every other
consumer just sees an ordinary strided tensor, and a consumer that cannot read it in place (a
different padding, a column stride, a dense tactic) pads it as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmrestore.errors import NMRestoreError
from nmrestore.runtime.packing import CSRWeight
from nmrestore.runtime.spatial import InPlaceConv, run_routed_conv
from nmrestore.runtime.timing import interleaved
from nmrestore.sparsity.parametrization import nm_mask_of

if TYPE_CHECKING:
    from nmrestore.runtime.engine import EngineState


#: Attribute of a sparse conv's output naming the layer that wrote it (for hand-off requests).
PRODUCER_ATTR = "_nmk_producer"


def _epilogue(y: Tensor, relu: bool, residual: Tensor | None, scale: float, post_relu: bool) -> Tensor:
    """``post(scale * pre(y) + residual)``: pre = ReLU when ``relu``, post = ReLU when ``post_relu``."""
    if relu:
        y = F.relu(y)
    if residual is not None:
        y = torch.add(residual, y, alpha=scale)
    return F.relu(y) if post_relu else y


@dataclass
class RouteWeights:
    """One route's weights: the dense-with-zeros tensor (dense tactic) and its CSR form (or None)."""

    dense: Tensor
    csr: CSRWeight | None
    nm: tuple[int, int] | None  # the route's N:M, None when the layer is not N:M on this route
    why_dense: str = ""  # why there is no CSR form (e.g. "N = M on this route")

    @property
    def density(self) -> float:
        return self.csr.density if self.csr is not None else float((self.dense != 0).float().mean())


@dataclass
class LayerDecision:
    """A tactic choice: one row of the per-layer table."""

    layer: str
    kind: str
    route: int
    input_shape: tuple[int, ...]
    threads: int
    nm: str
    density: float
    dense_ms: float | None
    sparse_ms: float | None
    choice: str  # "sparse" or "dense"
    reason: str  # "timed", "reused" (same structure timed before or on disk), "forced", or why not sparse

    def to_dict(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "route": self.route,
            "input_shape": list(self.input_shape),
            "threads": self.threads,
            "nm": self.nm,
            "density": self.density,
            "dense_ms": self.dense_ms,
            "sparse_ms": self.sparse_ms,
            "choice": self.choice,
            "reason": self.reason,
        }


@dataclass
class _Choices:
    by_key: dict[tuple[int, tuple[int, ...], int], str] = field(default_factory=dict)
    # spatial routing: per (route, one tile's shape, threads), whatever the number of tiles
    by_tile: dict[tuple[int, tuple[int, ...], int], str] = field(default_factory=dict)


class SparseLayer(nn.Module):
    """Common route/tactic logic; subclasses provide ``_dense`` and ``_sparse``."""

    kind = "layer"

    def __init__(self, source: nn.Module, name: str, routes: list[RouteWeights], state: EngineState) -> None:
        super().__init__()
        self.source = source  # kept for its N:M mask (the route) and as the reference layer
        self.layer_name = name
        self.routes = routes
        self.relu = False  # set when the following ReLU is fused
        self._state = state
        self._choices = _Choices()
        bias = getattr(source, "bias", None)
        self._bias = None if bias is None else bias.detach().float().contiguous().clone()
        # routes that hold different weights: only these run tile by tile under a route map
        self.routed = any(not torch.equal(r.dense, routes[0].dense) for r in routes[1:])

    # -- route ---------------------------------------------------------------------------------
    def active_route(self) -> int:
        mask = nm_mask_of(self.source)
        return 0 if mask is None else min(mask.route, len(self.routes) - 1)

    # -- tactics -------------------------------------------------------------------------------
    def _dense(
        self,
        x: Tensor,
        rw: RouteWeights,
        residual: Tensor | None = None,
        scale: float = 1.0,
        post_relu: bool = False,
    ) -> Tensor:
        raise NotImplementedError

    def _sparse(
        self,
        x: Tensor,
        rw: RouteWeights,
        residual: Tensor | None = None,
        scale: float = 1.0,
        post_relu: bool = False,
    ) -> Tensor:
        raise NotImplementedError

    def _shape_ok(self, x: Tensor) -> bool:
        return True

    def _why_not_sparse(self, x: Tensor, rw: RouteWeights) -> str | None:
        state = self._state
        if state.kernel is None:
            return f"kernel unavailable ({state.kernel_reason})"
        if rw.csr is None:
            return rw.why_dense or "not N:M on this route"
        if state.config.tactic == "dense":
            return "tactic forced to dense"
        if rw.nm is not None and rw.csr.density > state.config.max_density:  # dense convs: always timed
            return f"density {rw.csr.density:.2f} > max_density {state.config.max_density:g}"
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return f"input is {x.dtype} on {x.device.type} (the kernel takes float32 on CPU)"
        if not self._shape_ok(x):
            return f"input shape {tuple(x.shape)} not supported by the kernel"
        return None

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)

    def run(
        self, x: Tensor, residual: Tensor | None = None, scale: float = 1.0, post_relu: bool = False
    ) -> Tensor:
        """The layer, optionally fused with what follows: ``act(scale * layer(x) + residual)``.

        ``act`` is ReLU when ``post_relu`` (or a fused following ReLU without a residual).
        """
        route_map = self._state.spatial
        if route_map is not None and self.routed:
            return self._run_spatial(x, residual, scale, post_relu)
        route = self.active_route()
        rw = self.routes[route]
        extra = (residual, scale, post_relu)
        if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)):
            return self._dense(x, rw, *extra)  # inference engine: autograd always takes the dense path
        key = (route, tuple(x.shape), torch.get_num_threads())
        choice = self._choices.by_key.get(key)
        if choice == "sparse":
            self._ask_producer(x)
            return self._sparse(x, rw, *extra)
        if choice == "dense":
            return self._dense(x, rw, *extra)
        return self._decide(key, x, rw, extra)

    def _run_spatial(self, x: Tensor, residual: Tensor | None, scale: float, post_relu: bool) -> Tensor:
        raise NMRestoreError(
            f"{self.layer_name}: a {self.kind} layer cannot run under a route map (no tiles)"
        )

    def run_tiles(
        self,
        route: int,
        x: Tensor,
        residual: Tensor | None = None,
        scale: float = 1.0,
        post_relu: bool = False,
    ) -> Tensor:
        """A batch of tiles on ``route``. The tactic is decided once per (route, tile shape, threads),
        timed on the first batch: the number of tiles of a route changes from image to image."""
        rw = self.routes[route]
        extra = (residual, scale, post_relu)
        if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)):
            return self._dense(x, rw, *extra)
        threads = torch.get_num_threads()
        tile_key = (route, tuple(x.shape[1:]), threads)
        choice = self._choices.by_tile.get(tile_key)
        if choice == "sparse":
            return self._sparse(x, rw, *extra)
        if choice == "dense":
            return self._dense(x, rw, *extra)
        key = (route, tuple(x.shape), threads)
        out = self._decide(key, x, rw, extra)
        self._choices.by_tile[tile_key] = self._choices.by_key[key]
        return out

    def _ask_producer(self, x: Tensor) -> None:
        """Hook for the hand-off: a sparse conv asks the conv that wrote ``x`` for its padding."""

    def _record(
        self,
        key: tuple[int, tuple[int, ...], int],
        rw: RouteWeights,
        choice: str,
        reason: str,
        dense_ms: float | None = None,
        sparse_ms: float | None = None,
    ) -> None:
        route, shape, threads = key
        nm_text = f"{rw.nm[0]}:{rw.nm[1]}" if rw.nm else "-"
        self._choices.by_key[key] = choice
        self._state.record(
            LayerDecision(
                self.layer_name,
                self.kind,
                route,
                shape,
                threads,
                nm_text,
                rw.density,
                dense_ms,
                sparse_ms,
                choice,
                reason,
            )
        )

    def _decide(
        self,
        key: tuple[int, tuple[int, ...], int],
        x: Tensor,
        rw: RouteWeights,
        extra: tuple[Tensor | None, float, bool],
    ) -> Tensor:
        why = self._why_not_sparse(x, rw)
        if why is not None:
            self._record(key, rw, "dense", why)
            return self._dense(x, rw, *extra)
        state = self._state
        if state.config.tactic == "sparse":
            self._record(key, rw, "sparse", "forced")
            self._ask_producer(x)
            return self._sparse(x, rw, *extra)
        signature = self.signature(key, rw) + f"|res{int(extra[0] is not None)}"
        cached = state.cached_timing(signature)
        if cached is not None:
            dense_ms, sparse_ms = cached
            choice = "sparse" if sparse_ms < dense_ms else "dense"
            self._record(key, rw, choice, "reused", dense_ms, sparse_ms)
            if choice == "sparse":
                self._ask_producer(x)
            return self._sparse(x, rw, *extra) if choice == "sparse" else self._dense(x, rw, *extra)
        outputs, dense_ms, sparse_ms = self._time_both(x, rw, state.config.timing_repeats, extra)
        choice = "sparse" if sparse_ms < dense_ms else "dense"
        state.store_timing(signature, dense_ms, sparse_ms)
        self._record(key, rw, choice, "timed", dense_ms, sparse_ms)
        if choice == "sparse":
            self._ask_producer(x)
        return outputs[choice]  # the chosen tactic's output: later calls give exactly this

    def _time_both(
        self, x: Tensor, rw: RouteWeights, repeats: int, extra: tuple[Tensor | None, float, bool]
    ) -> tuple[dict[str, Tensor], float, float]:
        """Median ms of each tactic (with its fused epilogue), interleaved after one warm-up each."""
        outputs = {"sparse": self._sparse(x, rw, *extra), "dense": self._dense(x, rw, *extra)}
        runs = {"dense": partial(self._dense, x, rw, *extra), "sparse": partial(self._sparse, x, rw, *extra)}
        timings = interleaved(runs, repeats, warmup=0)  # the outputs above were the warm-up
        return outputs, timings.median("dense") * 1e3, timings.median("sparse") * 1e3

    def signature(self, key: tuple[int, tuple[int, ...], int], rw: RouteWeights) -> str:
        """What a timing depends on (structure, not values): the disk cache key."""
        _, shape, threads = key
        nnz = rw.csr.nnz if rw.csr is not None else -1
        return (
            f"{self.kind}|w{tuple(rw.dense.shape)}|{self._geometry()}|nnz{nnz}|relu{int(self.relu)}"
            f"|x{shape}|t{threads}"
        )

    def _geometry(self) -> str:
        return ""

    def decisions(self) -> dict[tuple[int, tuple[int, ...], int], str]:
        return dict(self._choices.by_key)

    def forget_choices(self) -> None:
        self._choices.by_key.clear()
        self._choices.by_tile.clear()


class SparseConv2d(SparseLayer):
    """An ``nn.Conv2d`` (zero padding, any kernel/stride/dilation/groups) on the N:M kernel."""

    kind = "Conv2d"

    def __init__(self, source: nn.Conv2d, name: str, routes: list[RouteWeights], state: EngineState) -> None:
        super().__init__(source, name, routes, state)
        self.stride = tuple(source.stride)
        self.padding = tuple(source.padding)  # type: ignore[arg-type]
        self.dilation = tuple(source.dilation)
        self.groups = source.groups
        self.out_channels = source.out_channels
        self.kernel_size = tuple(source.kernel_size)
        self.shuffle = 1  # > 1: a following PixelShuffle fused into the epilogue
        self.out_pad: tuple[int, int] | None = None  # hand-off padding asked for by consumers

    def _geometry(self) -> str:
        geometry = f"k{self.kernel_size}s{self.stride}p{self.padding}d{self.dilation}g{self.groups}"
        return geometry + (f"|shuffle{self.shuffle}" if self.shuffle > 1 else "")

    def _ask_producer(self, x: Tensor) -> None:
        producer = getattr(x, PRODUCER_ATTR, None)
        if not isinstance(producer, SparseConv2d) or not self._state.config.handoff or self.stride[1] != 1:
            return
        ph, pw = self.padding  # type: ignore[misc]
        if ph == 0 and pw == 0:
            return  # nothing to pad: a plain tensor is read without a copy anyway
        kernel = self._state.kernel
        if kernel is not None and kernel.accepts_handoff(
            x,
            self.kernel_size,  # type: ignore[arg-type]
            self.stride,  # type: ignore[arg-type]
            self.padding,  # type: ignore[arg-type]
            self.dilation,  # type: ignore[arg-type]
        ):
            return
        old = producer.out_pad or (0, 0)
        producer.out_pad = (max(old[0], ph), max(old[1], pw))

    def _run_spatial(self, x: Tensor, residual: Tensor | None, scale: float, post_relu: bool) -> Tensor:
        route_map = self._state.spatial
        assert route_map is not None
        kh, kw = self.kernel_size
        (ph, pw), (dh, dw) = self.padding, self.dilation
        if self.stride != (1, 1) or (dh, dw) != (1, 1) or 2 * ph != kh - 1 or 2 * pw != kw - 1:
            raise NMRestoreError(
                f"{self.layer_name}: only stride-1 'same' convolutions run under a route map "
                f"(stride {self.stride}, padding {self.padding}, dilation {self.dilation}, kernel {self.kernel_size})"
            )
        grad = torch.is_grad_enabled() and (
            x.requires_grad or (residual is not None and residual.requires_grad)
        )
        # relu(conv) + residual is not the kernel epilogue's order (as in _sparse): such calls are gathered
        in_place = None if grad or (residual is not None and self.relu) else self._in_place(x)
        saved = self.padding, self.out_pad
        # gathered tiles carry their halo: they run with padding 0, into plain (not hand-off) outputs
        self.padding, self.out_pad = (0, 0), None
        try:
            return run_routed_conv(
                route_map,
                x,
                (ph, pw),
                self.shuffle,
                self.run_tiles,
                residual,
                scale,
                post_relu,
                self._state.kernel if in_place is not None else None,
                in_place,
            )
        finally:
            self.padding, self.out_pad = saved

    def _in_place(self, x: Tensor) -> InPlaceConv | None:
        """The routes that run on the kernel in place under a route map: every route the kernel can
        run (N:M, density <= max_density, float32 on the CPU, kernel built, tactic not dense). No
        timing: a timed choice per tile shape would cost more than it saves, and at these densities
        the kernel wins (docs/BENCHMARKS.md, speed)."""
        kernel = self._state.kernel
        if kernel is None:
            return None
        padding: tuple[int, int] = tuple(self.padding)  # type: ignore[assignment]
        routes = []
        threads = torch.get_num_threads()
        for k, rw in enumerate(self.routes):
            why = self._why_not_sparse(x, rw)
            key = (k, tuple(x.shape), threads)
            if (
                key not in self._choices.by_tile
            ):  # recorded once per map shape (not kept for whole-image calls)
                self._choices.by_tile[key] = "dense" if why else "sparse"
                nm_text = f"{rw.nm[0]}:{rw.nm[1]}" if rw.nm else "-"
                self._state.record(
                    LayerDecision(
                        self.layer_name, self.kind, k, tuple(x.shape), threads, nm_text, rw.density, None, None,
                        "dense" if why else "sparse", f"route map: {why}" if why else "route map: tiles in place",
                    )
                )  # fmt: skip
            if why is None:
                routes.append(k)
        if not routes:
            return None

        def conv(
            source: Tensor,
            tiles: list[tuple[int, int, int, int, int]],
            out: Tensor,
            residual: Tensor | None,
            scale: float,
            post_relu: bool,
        ) -> None:
            assert kernel is not None
            kernel.conv2d_tiles(
                source,
                tiles,
                [rw.csr if k in routes else None for k, rw in enumerate(self.routes)],
                self._bias,
                out,
                self.kernel_size,  # type: ignore[arg-type]
                padding,
                relu=self.relu or post_relu,
                residual=residual,
                res_scale=scale,
                shuffle=self.shuffle,
            )

        def reads(y: Tensor) -> bool:
            return kernel.accepts_handoff(y, self.kernel_size, (1, 1), padding, (1, 1))  # type: ignore[arg-type]

        return InPlaceConv(frozenset(routes), self.out_channels, reads, conv)

    def _shape_ok(self, x: Tensor) -> bool:
        if x.dim() != 4 or x.shape[1] != self.routes[0].dense.shape[1] * self.groups:
            return False
        # the kernel addresses one image's padded workspace with 32-bit offsets
        (ph, pw), (sh, sw) = self.padding, self.stride
        per_image = x.shape[1] * (x.shape[2] + 2 * ph + 8 * sh + 8) * (x.shape[3] + 2 * pw + 128) * sw
        return per_image < 2**31 - 2**20

    def _dense(
        self,
        x: Tensor,
        rw: RouteWeights,
        residual: Tensor | None = None,
        scale: float = 1.0,
        post_relu: bool = False,
    ) -> Tensor:
        out = F.conv2d(x, rw.dense, self._bias, self.stride, self.padding, self.dilation, self.groups)
        if self.shuffle > 1:  # ReLU and shuffle commute: the epilogue's ReLU may come after
            out = F.pixel_shuffle(out, self.shuffle)
        return _epilogue(out, self.relu, residual, scale, post_relu)

    def _sparse(
        self,
        x: Tensor,
        rw: RouteWeights,
        residual: Tensor | None = None,
        scale: float = 1.0,
        post_relu: bool = False,
    ) -> Tensor:
        kernel = self._state.kernel
        csr = rw.csr
        assert kernel is not None and csr is not None
        if residual is not None and (self.relu or self.shuffle > 1):
            # relu(conv) + residual is not the kernel epilogue's order; a shuffled output has none
            return _epilogue(self._sparse(x, rw), False, residual, scale, post_relu)
        out = kernel.conv2d(
            x,
            csr.rowptr,
            csr.cin,
            csr.kpos,
            csr.values,
            self._bias,
            self.out_channels,
            self.kernel_size,  # type: ignore[arg-type]
            self.stride,  # type: ignore[arg-type]
            self.padding,  # type: ignore[arg-type]
            self.dilation,  # type: ignore[arg-type]
            relu=self.relu or post_relu,
            residual=residual,
            res_scale=scale,
            shuffle=self.shuffle,
            out_pad=self.out_pad if self._state.config.handoff else None,
        )
        setattr(out, PRODUCER_ATTR, self)
        return out

    def extra_repr(self) -> str:
        nms = ",".join(f"{r.nm[0]}:{r.nm[1]}" if r.nm else "dense" for r in self.routes)
        return (
            f"{self.layer_name}: {tuple(self.routes[0].dense.shape)}, stride={self.stride}, "
            f"padding={self.padding}, routes=[{nms}], relu={self.relu}"
            + (f", shuffle={self.shuffle}" if self.shuffle > 1 else "")
            + (f", hand-off pad={self.out_pad}" if self.out_pad else "")
        )


class SparseLinear(SparseLayer):
    """An ``nn.Linear`` on the N:M kernel (a gather-dot per output feature)."""

    kind = "Linear"

    def __init__(self, source: nn.Linear, name: str, routes: list[RouteWeights], state: EngineState) -> None:
        super().__init__(source, name, routes, state)
        self.out_features = source.out_features
        self.in_features = source.in_features

    def _shape_ok(self, x: Tensor) -> bool:
        return x.dim() >= 1 and x.shape[-1] == self.in_features

    def _dense(
        self,
        x: Tensor,
        rw: RouteWeights,
        residual: Tensor | None = None,
        scale: float = 1.0,
        post_relu: bool = False,
    ) -> Tensor:
        return _epilogue(F.linear(x, rw.dense, self._bias), self.relu, residual, scale, post_relu)

    def _sparse(
        self,
        x: Tensor,
        rw: RouteWeights,
        residual: Tensor | None = None,
        scale: float = 1.0,
        post_relu: bool = False,
    ) -> Tensor:
        kernel = self._state.kernel
        csr = rw.csr
        assert kernel is not None and csr is not None
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).contiguous()
        out = kernel.linear(
            flat, csr.rowptr, csr.cin, csr.values, self._bias, self.out_features, relu=self.relu
        )
        return _epilogue(out.reshape(*lead, self.out_features), False, residual, scale, post_relu)

    def extra_repr(self) -> str:
        nms = ",".join(f"{r.nm[0]}:{r.nm[1]}" if r.nm else "dense" for r in self.routes)
        return f"{self.layer_name}: {self.in_features}->{self.out_features}, routes=[{nms}], relu={self.relu}"
