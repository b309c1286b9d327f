"""Drop-in inference layers that run N:M weights on the sparse CPU kernel or dense PyTorch.

A :class:`SparseConv2d` / :class:`SparseLinear` replaces one pruned layer. It keeps the original
(possibly parametrized) layer as ``source`` so the model's routes still work: ``use_route`` and
``select_task`` set the route on the source's N:M mask, and the layer reads it at every forward
and picks that route's weights (ClassPruning: each route's N has its own compressed weight).

Per (route, input shape, threads) the layer chooses a *tactic*, sparse kernel or dense PyTorch,
like TensorRT's tactic selection: on first use it times both on the real input (interleaved,
median of a few runs) and keeps the faster. An engine allowed bf16 (``EngineConfig.precision``)
times a conv's bf16 forms too: ``sparse_bf16`` (the bf16 kernel) and ``dense_bf16`` (PyTorch's bf16
channels-last conv, oneDNN/AMX); one allowed fp16 times ``sparse_fp16`` (the fp16 kernel) and
``dense_bf16``; five tactics in all (:data:`TACTICS`). Decisions are cached in memory and, with a
cache file, on disk (see :mod:`nmrestore.runtime.engine`).

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
from nmrestore.runtime.kernel_lib import HALF_DTYPES, half_shadow
from nmrestore.runtime.layer_types import HALF_OF, WANTS, Extra, LayerDecision, RouteWeights
from nmrestore.runtime.spatial_conv import run_conv_spatial
from nmrestore.runtime.timing import interleaved
from nmrestore.sparsity.parametrization import nm_mask_of

if TYPE_CHECKING:
    from nmrestore.runtime.engine import EngineState
    from nmrestore.runtime.kernel_lib import KernelLibrary
    from nmrestore.runtime.packing import CSRWeight


#: Attribute of a sparse conv's output naming the layer that wrote it (for hand-off requests).
PRODUCER_ATTR = "_nmk_producer"


def _epilogue(y: Tensor, relu: bool, residual: Tensor | None, scale: float, post_relu: bool) -> Tensor:
    """``post(scale * pre(y) + residual)``: pre = ReLU when ``relu``, post = ReLU when ``post_relu``.

    ``y`` is the layer's own fresh output, so this works in place on it (each new activation
    tensor is tens of MB of fresh pages), except where autograd records the ops."""
    y = y.float() if y.dtype in HALF_DTYPES else y
    inplace = not (torch.is_grad_enabled() and y.requires_grad)
    if relu:
        y = F.relu(y, inplace=inplace)
    if residual is not None:
        if inplace and residual.dtype == y.dtype and residual.shape == y.shape:
            y = (y.mul_(scale) if scale != 1.0 else y).add_(residual)
        else:
            y = torch.add(residual, y, alpha=scale)
    return F.relu(y, inplace=inplace) if post_relu else y


def _fits(choice: str, out: Tensor) -> bool:
    """Whether a tactic's output on the deciding input is usable: an fp16 one overflows (past 65504)
    into inf or NaN; the other tactics' outputs are taken as they are."""
    return choice != "sparse_fp16" or bool(torch.isfinite(out).all())


@dataclass
class _Choices:
    by_key: dict[tuple[int, tuple[int, ...], int], str] = field(default_factory=dict)
    # spatial routing: per (route, one tile's shape, threads), whatever the number of tiles
    by_tile: dict[tuple[int, tuple[int, ...], int], str] = field(default_factory=dict)


class SparseLayer(nn.Module):
    """Common route/tactic logic; subclasses provide ``_dense`` and ``_sparse`` (and, for the 16-bit
    tactics, ``_dense_bf16`` and ``_sparse(..., half=dtype)``)."""

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
        if len(self.routes) == 1:
            return 0  # one route (every engine but ClassPruning's and PNG's): no parametrization lookup
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

    def _dense_bf16(
        self,
        x: Tensor,
        rw: RouteWeights,
        residual: Tensor | None = None,
        scale: float = 1.0,
        post_relu: bool = False,
    ) -> Tensor:
        raise NotImplementedError

    def kernel_library(self) -> KernelLibrary | None:
        """The compiled kernels this layer runs on (None: the engine runs dense)."""
        return self._state.kernel

    def amx_operands(self, x: Tensor | tuple[int, ...]) -> tuple[CSRWeight, Tensor, Tensor | None] | None:
        """(weights, bf16 values, bias) when this conv runs the bf16 sparse tactic on ``x`` (decided
        already, no route map, no autograd), for a fused call on AMX (:mod:`.fusion`); else None.
        The producer of ``x`` is asked for its bf16 hand-off, as the tactic itself would; given the
        input's shape instead (the fused call computes that input itself), nobody is asked."""
        kernel, route = self._state.kernel, self.active_route()
        if kernel is None or not kernel.has_amx or self._state.spatial is not None or torch.is_grad_enabled():
            return None
        shape = tuple(x.shape) if isinstance(x, Tensor) else tuple(x)
        if self._choices.by_key.get((route, shape, torch.get_num_threads())) != "sparse_bf16":
            return None
        if isinstance(x, Tensor):
            self._ask_producer(x, "bf16")
        rw = self.routes[route]
        assert rw.csr is not None
        return rw.csr, rw.values_half(torch.bfloat16), self._bias

    def _sparse(
        self,
        x: Tensor,
        rw: RouteWeights,
        residual: Tensor | None = None,
        scale: float = 1.0,
        post_relu: bool = False,
        half: torch.dtype | None = None,
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
        if x.device.type != "cpu" or x.dtype not in (torch.float32, *HALF_DTYPES):
            return f"input is {x.dtype} on {x.device.type} (the kernel takes float32, bfloat16 or float16 on CPU)"
        if not self._shape_ok(x):
            return f"input shape {tuple(x.shape)} not supported by the kernel"
        return None

    def _candidates(self, x: Tensor, rw: RouteWeights) -> tuple[list[str], str | None]:
        """The tactics this input may run with (dense first), and why sparse is not among them."""
        state = self._state
        why = self._why_not_sparse(x, rw)
        cands = ["dense"]
        if (
            (state.bf16 or state.f16)
            and self.half_capable
            and x.device.type == "cpu"
            and torch.backends.mkldnn.is_available()
        ):
            cands.append("dense_bf16")
        if why is None:
            cands.append("sparse")
            if state.bf16 and self.half_capable and state.kernel is not None and state.kernel.has_bf16:
                cands.append("sparse_bf16")
            if state.f16 and self.half_capable and state.kernel is not None and state.kernel.has_f16:
                cands.append("sparse_fp16")
        return cands, why

    #: Whether this layer kind has the 16-bit tactics (a Linear keeps f32).
    half_capable = False

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return self.run(x, residual)

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
        if choice is None:
            return self._decide(key, x, rw, extra)
        return self._run_tactic(choice, x, rw, extra)

    def _run_tactic(self, choice: str, x: Tensor, rw: RouteWeights, extra: Extra) -> Tensor:
        if choice != "dense":
            self._ask_producer(x, WANTS[choice])
        return self._run_tactic_plain(choice, x, rw, extra)

    def _ask_producer(self, x: Tensor, want: str = "f32") -> None:
        """Hook for the hand-off: a conv asks the conv that wrote ``x`` for the input form it reads
        fastest (``WANTS``)."""

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
        if choice is not None:
            return self._run_tactic_plain(choice, x, rw, extra)
        key = (route, tuple(x.shape), threads)
        out = self._decide(key, x, rw, extra)
        self._choices.by_tile[tile_key] = self._choices.by_key[key]
        return out

    def _record(
        self,
        key: tuple[int, tuple[int, ...], int],
        rw: RouteWeights,
        choice: str,
        reason: str,
        dense_ms: float | None = None,
        sparse_ms: float | None = None,
        times: dict[str, float] | None = None,
    ) -> None:
        """Keep a choice. ``dense_ms``/``sparse_ms``: the f32 timings alone (the form callers that
        restore decisions use); ``times``: every timed tactic."""
        route, shape, threads = key
        nm_text = f"{rw.nm[0]}:{rw.nm[1]}" if rw.nm else "-"
        f32 = {"dense": dense_ms, "sparse": sparse_ms}
        times = times or {k: v for k, v in f32.items() if v is not None}
        self._choices.by_key[key] = choice
        if len(times) > 1 and self._state.spatial is None:
            self._state.fresh.append((self, key))  # for the whole-model plans (runtime/plans.py)
        self._state.record(
            LayerDecision(
                self.layer_name,
                self.kind,
                route,
                shape,
                threads,
                nm_text,
                rw.density,
                times.get("dense"),
                times.get("sparse"),
                choice,
                reason,
                dict(times),
            )
        )

    def _decide(
        self, key: tuple[int, tuple[int, ...], int], x: Tensor, rw: RouteWeights, extra: Extra
    ) -> Tensor:
        state = self._state
        cands, why = self._candidates(x, rw)
        forced = state.config.tactic
        if forced != "auto" or len(cands) == 1:
            # forced, or nothing to choose: that kind, in 16 bits where the precision allows it
            kind = "sparse" if forced == "sparse" and why is None else "dense"
            choice = next(c for c in (f"{kind}_fp16", f"{kind}_bf16", kind) if c in cands or c == kind)
            reason = "forced" if kind == "sparse" else (why or "tactic forced to dense")
            self._record(key, rw, choice, reason)
            return self._run_tactic(choice, x, rw, extra)
        signature = self.signature(key, rw) + f"|res{int(extra[0] is not None)}"
        if cands != ["dense", "sparse"]:
            signature += "|" + ",".join(cands)  # an f32 engine keeps its cache keys
        cached = state.cached_times(signature)
        if cached is not None and set(cands) <= set(cached):
            times = {c: cached[c] for c in cands}
            choice = min(times, key=times.__getitem__)
            out = self._run_tactic(choice, x, rw, extra)
            if not _fits(choice, out):
                del times[choice]  # timed on another layer of this structure; this one overflows fp16
                choice = min(times, key=times.__getitem__)
                out = self._run_tactic(choice, x, rw, extra)
            self._record(key, rw, choice, "reused", times=times)
            return out
        outputs, times = self._time_all(x, rw, cands, state.config.timing_repeats, extra)
        if "sparse_fp16" in times and not _fits("sparse_fp16", outputs["sparse_fp16"]):
            del times["sparse_fp16"]  # fp16 overflowed (past 65504) on this input: not chosen
        choice = min(times, key=times.__getitem__)
        state.store_times(signature, times)
        self._record(key, rw, choice, "timed", times=times)
        if choice != "dense":
            self._ask_producer(x, WANTS[choice])
        return outputs[choice]  # the chosen tactic's output: later calls give exactly this

    def _time_all(
        self, x: Tensor, rw: RouteWeights, cands: list[str], repeats: int, extra: Extra
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Median ms of each tactic (with its fused epilogue), interleaved after one warm-up each."""
        outputs = {c: self._run_tactic_plain(c, x, rw, extra) for c in cands}
        runs = {c: partial(self._run_tactic_plain, c, x, rw, extra) for c in cands}
        timings = interleaved(runs, repeats, warmup=0)  # the outputs above were the warm-up
        return outputs, {c: timings.median(c) * 1e3 for c in cands}

    def _run_tactic_plain(self, choice: str, x: Tensor, rw: RouteWeights, extra: Extra) -> Tensor:
        """A tactic without asking the producer for a hand-off (timing runs on the input as given)."""
        if choice.startswith("sparse"):
            return self._sparse(x, rw, *extra, half=HALF_OF.get(choice))
        return self._dense_bf16(x, rw, *extra) if choice == "dense_bf16" else self._dense(x, rw, *extra)

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

    def reset_handoff(self) -> None:
        """Forget what consumers asked this layer to write (they ask again on the next forward)."""

    def handoff_state(self) -> object:
        """What consumers asked this layer to write (for :meth:`set_handoff_state`)."""
        return None

    def set_handoff_state(self, state: object) -> None:
        """Restore what :meth:`handoff_state` returned."""

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
        self.half_pad: tuple[int, int] | None = None  # 16-bit hand-off padding asked for by such consumers
        self.half_sole = False  # its output goes only to the conv that asks (a fused block's head)
        self.half_chain = False  # ... or to the next block of a chain, which reads 16 bits (fusion.mark_half_chains)
        self.bf16_cl_out = False  # that conv runs PyTorch's bf16 conv: give it bf16 channels-last
        self._bias16: Tensor | None = None if self._bias is None else self._bias.to(torch.bfloat16)

    half_capable = True

    def reset_handoff(self) -> None:
        self.out_pad = self.half_pad = None
        self.bf16_cl_out = False

    def handoff_state(self) -> object:
        return (self.out_pad, self.half_pad, self.bf16_cl_out)

    def set_handoff_state(self, state: object) -> None:
        self.out_pad, self.half_pad, self.bf16_cl_out = state  # type: ignore[misc]

    def _geometry(self) -> str:
        geometry = f"k{self.kernel_size}s{self.stride}p{self.padding}d{self.dilation}g{self.groups}"
        return geometry + (f"|shuffle{self.shuffle}" if self.shuffle > 1 else "")

    def _ask_producer(self, x: Tensor, want: str = "f32") -> None:
        producer = getattr(x, PRODUCER_ATTR, None)
        if not isinstance(producer, SparseConv2d) or not self._state.config.handoff:
            return
        if want == "bf16_cl":
            producer.bf16_cl_out = True  # used only by a sole-consumer producer on PyTorch's bf16 conv
            return
        if self.stride[1] != 1:
            return
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(want)
        ph, pw = self.padding  # type: ignore[misc]
        if ph == 0 and pw == 0 and half is None:
            return  # nothing to pad: a plain f32 tensor is read without a copy anyway
        kernel = self._state.kernel
        geometry = (self.kernel_size, self.stride, self.padding, self.dilation)
        if kernel is not None:
            shadow = half_shadow(x, half) if half is not None else None
            if any(t is not None and kernel.accepts_handoff(t, *geometry, half=half) for t in (x, shadow)):  # type: ignore[arg-type]
                return
        old = (producer.half_pad if half is not None else producer.out_pad) or (0, 0)
        pad = (max(old[0], ph), max(old[1], pw))
        if half is not None:
            # written only by the producer's 16-bit kernel, in its dtype (else: converted here)
            producer.half_pad = pad
        else:
            producer.out_pad = pad

    def _run_spatial(self, x: Tensor, residual: Tensor | None, scale: float, post_relu: bool) -> Tensor:
        return run_conv_spatial(self, x, residual, scale, post_relu)

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
        x = x.float() if x.dtype in HALF_DTYPES else x  # a 16-bit hand-off from a 16-bit producer
        out = F.conv2d(x, rw.dense, self._bias, self.stride, self.padding, self.dilation, self.groups)
        if self.shuffle > 1:  # ReLU and shuffle commute: the epilogue's ReLU may come after
            out = F.pixel_shuffle(out, self.shuffle)
        return _epilogue(out, self.relu, residual, scale, post_relu)

    def _dense_bf16(
        self,
        x: Tensor,
        rw: RouteWeights,
        residual: Tensor | None = None,
        scale: float = 1.0,
        post_relu: bool = False,
    ) -> Tensor:
        """PyTorch's conv in bf16 on channels-last tensors (oneDNN: AMX or AVX512-BF16 where the CPU
        has them; f32 accumulation), the epilogue in f32. Channels-last because oneDNN's NCHW bf16
        conv was 4x slower than its NHWC one here (EDSR 64->64 3x3, 320x180, 2 threads)."""
        xb = x.to(torch.bfloat16, memory_format=torch.channels_last)  # no copy for such an input
        # the bias goes in as bf16 (oneDNN adds it in f32 before rounding the output): no extra pass
        out = F.conv2d(
            xb, rw.dense_bf16(), self._bias16, self.stride, self.padding, self.dilation, self.groups
        )
        if self.shuffle > 1:
            out = F.pixel_shuffle(out, self.shuffle)
        if self.half_sole and self.bf16_cl_out and residual is None and not post_relu:
            # a fused block's head whose last conv also runs bf16: hand it bf16 channels-last as is
            out = F.relu(out, inplace=True) if self.relu else out  # ReLU commutes with the rounding
        else:
            out = _epilogue(out.float(), self.relu, residual, scale, post_relu)  # f32, channels-last:
            # converting to NCHW cost 4x more than the cast
        setattr(out, PRODUCER_ATTR, self)
        return out

    def _sparse(
        self,
        x: Tensor,
        rw: RouteWeights,
        residual: Tensor | None = None,
        scale: float = 1.0,
        post_relu: bool = False,
        half: torch.dtype | None = None,
    ) -> Tensor:
        kernel = self._state.kernel
        csr = rw.csr
        assert kernel is not None and csr is not None
        if residual is not None and (self.relu or self.shuffle > 1):
            # relu(conv) + residual is not the kernel epilogue's order; a shuffled output has none
            return _epilogue(self._sparse(x, rw, half=half), False, residual, scale, post_relu)
        handoff = self._state.config.handoff
        half_pad = self.half_pad if half is not None and handoff else None
        out = kernel.conv2d(
            x,
            csr.rowptr,
            csr.cin,
            csr.kpos,
            rw.values_half(half) if half is not None else csr.values,
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
            out_pad=self.out_pad if handoff else None,
            half_pad=half_pad,
            # only the asking conv reads this output (and no f32 consumer asked): 16 bits alone will do
            half_only=half_pad is not None
            and self.out_pad is None
            and (self.half_sole or (self.half_chain and half is not None)),
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
        return _epilogue(F.linear(x.float(), rw.dense, self._bias), self.relu, residual, scale, post_relu)

    def _sparse(
        self,
        x: Tensor,
        rw: RouteWeights,
        residual: Tensor | None = None,
        scale: float = 1.0,
        post_relu: bool = False,
        half: torch.dtype | None = None,  # never asked: a Linear has no 16-bit tactics
    ) -> Tensor:
        kernel = self._state.kernel
        csr = rw.csr
        assert kernel is not None and csr is not None
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).float().contiguous()
        out = kernel.linear(
            flat, csr.rowptr, csr.cin, csr.values, self._bias, self.out_features, relu=self.relu
        )
        return _epilogue(out.reshape(*lead, self.out_features), False, residual, scale, post_relu)

    def extra_repr(self) -> str:
        nms = ",".join(f"{r.nm[0]}:{r.nm[1]}" if r.nm else "dense" for r in self.routes)
        return f"{self.layer_name}: {self.in_features}->{self.out_features}, routes=[{nms}], relu={self.relu}"
