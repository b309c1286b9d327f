"""The engine's fusions: a following ReLU or pixel shuffle into a sparse conv's epilogue, a residual
block's skip sum into its last conv's (:class:`FusedResidual`), a trunk's long skip likewise
(:class:`FusedLongSkip`), and the 16-bit hand-off chains between modules of an ``nn.Sequential``
(:func:`mark_half_chains`), and EDSR's tail as one call (:class:`FusedTail`). Applied by
:func:`nmrestore.runtime.engine.compile_sparse` and re-applied by :mod:`nmrestore.runtime.compiled`.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import torch
from torch import nn

from nmrestore.runtime.kernel_fused import FusedConv
from nmrestore.runtime.kernel_lib import HALF_DTYPES, half_shadow
from nmrestore.runtime.layers import PRODUCER_ATTR, SparseConv2d, SparseLayer
from nmrestore.runtime.packing import CSRWeight


def set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fuse_relus(model: nn.Module) -> int:
    """Fold ``nn.ReLU`` that directly follows a sparse layer in an ``nn.Sequential`` into it."""
    fused = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules.keys())
        for a, b in itertools.pairwise(keys):
            first, second = seq._modules[a], seq._modules[b]
            if isinstance(first, SparseLayer) and isinstance(second, nn.ReLU) and not first.relu:
                first.relu = True
                seq._modules[b] = nn.Identity()
                fused += 1
    return fused


def fuse_shuffles(model: nn.Module) -> int:
    """Fold ``nn.PixelShuffle`` that follows a sparse conv (after a fused ReLU) in an ``nn.Sequential``
    into it: the kernel writes the shuffled high-resolution output directly."""
    fused = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules.keys())
        for i, key in enumerate(keys):
            conv = seq._modules[key]
            if not isinstance(conv, SparseConv2d) or conv.shuffle > 1:
                continue
            j = i + 1
            while j < len(keys) and isinstance(seq._modules[keys[j]], nn.Identity):
                j += 1
            nxt = seq._modules[keys[j]] if j < len(keys) else None
            if isinstance(nxt, nn.PixelShuffle):
                r = int(nxt.upscale_factor)
                if 1 < r <= 4 and conv.out_channels % (r * r) == 0:
                    conv.shuffle = r
                    seq._modules[keys[j]] = nn.Identity()
                    fused += 1
    return fused


class FusedResidual(nn.Module):
    """A residual block ``act(scale * last(head(x)) + x)`` whose last sparse conv adds the skip
    (and the ReLU after it) in its epilogue instead of two more passes over the output."""

    def __init__(
        self,
        block: nn.Module,
        head: nn.Module,
        last: SparseConv2d,
        scale: float,
        post_relu: bool,
        first: SparseConv2d | None = None,
    ) -> None:
        super().__init__()
        self.block = block  # keeps the original names reachable (routes, state)
        self.head = head
        self.last = last
        self.scale = scale
        self.post_relu = post_relu
        self.first = first  # the head's only conv, if that is all it is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._amx_block(x) if self.first is not None else None
        if out is not None:
            return out
        h = self.head(x)
        # x may be a hand-off view: the kernel reads the residual through its strides, no copy
        return self.last.run(h, residual=x, scale=self.scale, post_relu=self.post_relu)

    def _amx_block(self, x: torch.Tensor) -> torch.Tensor | None:
        """Both convs in one AMX call (``KernelLibrary.block_bf16``: the intermediate stays in L2)
        where both run the bf16 sparse tactic on masks shared by 16-channel blocks; else None."""
        assert self.first is not None
        last, kernel = self.last, self.last.kernel_library()
        if kernel is None or last.half_pad is None or last.out_pad is not None:
            return None  # no consumer reads this block's output as a bf16 hand-off
        first_ops = self.first.amx_operands(x)
        last_ops = last.amx_operands(x) if first_ops is not None else None
        if first_ops is None or last_ops is None:
            return None
        out = kernel.block_bf16(
            x, (*first_ops, self.first.relu), last_ops, res_scale=self.scale, relu=self.post_relu,
            pad=last.half_pad, half_only=last.half_sole or last.half_chain,
        )  # fmt: skip
        if out is not None:
            setattr(out, PRODUCER_ATTR, last)
        return out

    def extra_repr(self) -> str:
        return f"fused residual: scale={self.scale:g}, relu after sum={self.post_relu}"


def residual_pattern(module: nn.Module) -> tuple[nn.Module, nn.Module, float, bool] | None:
    """(head, last conv, scale, ReLU after the sum) of the zoo's residual blocks, else None."""
    from nmrestore.models.carn import CarnResidualBlock
    from nmrestore.models.common import ResBlock
    from nmrestore.models.msrresnet import ResidualBlockNoBN

    if isinstance(module, ResBlock | CarnResidualBlock):  # x + s * body(x) / relu(x + body(x))
        body = module.body
        if len(body) < 2:
            return None
        head = nn.Sequential(*list(body)[:-1])
        scale = float(module.res_scale) if isinstance(module, ResBlock) else 1.0
        return head, body[-1], scale, isinstance(module, CarnResidualBlock)
    if isinstance(module, ResidualBlockNoBN):  # x + conv2(relu(conv1(x)))
        return nn.Sequential(module.conv1, module.relu), module.conv2, 1.0, False
    return None


class FusedLongSkip(nn.Module):
    """A trunk's long skip ``inner(x) + x`` (:class:`nmrestore.models.common.LongSkip`) whose sum the
    trunk's last sparse conv adds in its epilogue, where ``inner`` is an ``nn.Sequential`` ending in
    one: EDSR's and RCAN's ``body``. No parameters, so the model's names do not change. On a 16-bit
    engine ``x`` is read through its 16-bit copy where it has one."""

    def forward(self, inner: nn.Module, x: torch.Tensor) -> torch.Tensor:
        last = _skip_conv(inner)
        if last is None:
            return inner(x) + x
        h = x
        for child in list(inner.children())[:-1]:
            h = child(h)
        # the head's 16-bit copy where it wrote one, as each block of the chain reads its residual:
        # the f32 one is long out of cache (EDSR-baseline x2, bf16, 2:32: body.16 1.5 ms against 3.1)
        shadows = (half_shadow(x, half) for half in HALF_DTYPES)
        residual = next((s for s in shadows if s is not None), x)
        return last(h, residual=residual)  # through __call__: the conv's hooks (profiles) see it


def _skip_conv(inner: nn.Module) -> SparseConv2d | None:
    """``inner``'s last sparse conv when it can take the long skip's sum (no fused ReLU or shuffle)."""
    if not _plain_sequential(inner) or not len(inner):
        return None
    last = list(inner.children())[-1]
    ok = isinstance(last, SparseConv2d) and not last.relu and last.shuffle == 1
    return last if ok else None


def fuse_long_skips(model: nn.Module) -> int:
    """Replace each :class:`~nmrestore.models.common.LongSkip` by :class:`FusedLongSkip`. In
    EDSR's layout the trunk's sum goes to the tail alone, so its last conv may write a 16-bit-only
    hand-off where the tail reads its input only through sparse convs."""
    from nmrestore.models.common import LongSkip, MeanShiftedSR

    fused = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LongSkip) and name:
            set_child(model, name, FusedLongSkip())
            fused += 1
    for module in model.modules():
        if isinstance(module, MeanShiftedSR) and isinstance(module.long_skip, FusedLongSkip):
            last = _skip_conv(module.body)
            if last is not None and _input_convs_only(module.tail):
                last.half_chain = True
            # the head's features go to the trunk and to the fused sum alone: both read 16 bits
            # (EDSR-baseline x2, bf16, 2:32: head.0 and body.0 2.2 + 4.4 ms with an f32 copy, 1.6 + 2.8)
            head = _output_conv(module.head)
            if last is not None and head is not None and _input_convs_only(module.body):
                head.half_chain = True
    return fused


def fuse_residuals(model: nn.Module) -> int:
    fused = 0
    for name, module in list(model.named_modules()):
        pattern = residual_pattern(module)
        if pattern is None or not name:
            continue
        head, last, scale, post_relu = pattern
        if isinstance(last, SparseConv2d) and not last.relu and last.shuffle == 1:
            convs = [m for m in head.children() if not isinstance(m, nn.Identity)]
            first = convs[0] if len(convs) == 1 and isinstance(convs[0], SparseConv2d) else None
            set_child(model, name, FusedResidual(module, head, last, scale, post_relu, first))
            fused += 1
            if first is not None:
                first.half_sole = True  # head(x) goes only to `last`: a 16-bit-only hand-off is safe
    fuse_long_skips(model)
    mark_half_chains(model)
    fuse_tails(model)  # after the chains: the tail's own Sequential is marked as any other
    return fused


class FusedTail(nn.Sequential):
    """EDSR's and RCAN's tail ``nn.Sequential(upsampler, last)`` whose upsampler ends in a sparse conv
    with a fused pixel shuffle and whose ``last`` is a sparse 3x3 conv. Once both run the bf16
    sparse tactic, that conv and ``last`` are one AMX call
    (:meth:`~nmrestore.runtime.kernel_fused.FusedCalls.tail_bf16`: the shuffled activation never
    leaves L2; EDSR-baseline x2, coarse 2:32: 4.8 ms against 7.9 ms as two convs); otherwise the
    modules run in turn. The same children under the same names as the Sequential it replaces."""

    def __init__(self, tail: nn.Sequential, prefix: tuple[nn.Module, ...], up: SparseConv2d, last: SparseConv2d) -> None:
        super().__init__(OrderedDict(tail._modules))
        # tuples, not submodules: the modules are the children's, under their own names
        self._prefix, self._convs = prefix, (up, last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self._prefix:  # the upsampler's earlier steps (x4: the first conv)
            x = module(x)
        out = self._amx_tail(x)
        up, last = self._convs
        return out if out is not None else last(up(x))

    def _amx_tail(self, x: torch.Tensor) -> torch.Tensor | None:
        """Both convs in one AMX call where both run the bf16 sparse tactic here; else None."""
        up, last = self._convs
        kernel = last.kernel_library()
        if kernel is None or not kernel.has_amx or x.dim() != 4:
            return None
        r = up.shuffle
        b, _, h, w = x.shape
        (kh, kw), (ph, pw), (dh, dw) = up.kernel_size, up.padding, up.dilation  # type: ignore[misc]
        hr_shape = (b, up.out_channels // (r * r), (h + 2 * ph - dh * (kh - 1)) * r, (w + 2 * pw - dw * (kw - 1)) * r)
        last_ops = last.amx_operands(hr_shape)
        up_ops = up.amx_operands(x) if last_ops is not None else None
        if up_ops is None or last_ops is None:
            return None
        return kernel.tail_bf16(x, _fused_conv(up, up_ops), r, _fused_conv(last, last_ops))


def _fused_conv(conv: SparseConv2d, ops: tuple[CSRWeight, torch.Tensor, torch.Tensor | None]) -> FusedConv:
    return FusedConv(*ops, conv.out_channels, conv.kernel_size, conv.padding, conv.dilation, conv.relu)  # type: ignore[arg-type]


def _blocks_of_16(conv: SparseConv2d) -> bool:
    """Whether each route's kept positions are shared by blocks of 16 output channels (the AMX
    path's masks); per-channel masks keep the tail as it is, and profiles see its two convs."""
    for rw in conv.routes:
        kept = rw.dense.reshape(rw.dense.shape[0], -1) != 0
        if kept.shape[0] % 16 or not bool((kept.view(-1, 16, kept.shape[1]) == kept[::16, None]).all()):
            return False
    return True


def fuse_tails(model: nn.Module) -> int:
    """Replace each tail ``nn.Sequential(upsampler, last)`` of EDSR's layout (:class:`FusedTail`):
    the upsampler a plain ``nn.Sequential`` whose last step is a sparse conv with a fused pixel
    shuffle (stride 1) and masks shared by blocks of 16 output channels, ``last`` a sparse 3x3
    conv, padding 1, stride 1, without a fused shuffle."""
    from nmrestore.models.common import MeanShiftedSR

    fused = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, MeanShiftedSR) or not _plain_sequential(module.tail) or len(module.tail) != 2:
            continue
        upsampler, last = module.tail[0], module.tail[1]
        steps = [c for c in upsampler.children() if not isinstance(c, nn.Identity)] if _plain_sequential(upsampler) else []
        up = steps[-1] if steps else None
        if not isinstance(up, SparseConv2d) or up.shuffle < 2 or up.stride != (1, 1) or not _blocks_of_16(up):
            continue
        if not isinstance(last, SparseConv2d) or last.shuffle != 1 or last.stride != (1, 1):
            continue
        if last.kernel_size != (3, 3) or last.padding != (1, 1) or last.dilation != (1, 1):
            continue
        set_child(model, f"{name}.tail" if name else "tail", FusedTail(module.tail, tuple(steps[:-1]), up, last))
        fused += 1
    return fused


def mark_half_chains(model: nn.Module) -> None:
    """In an ``nn.Sequential``, a module whose output comes from a sparse conv, followed by a module
    that reads its input only through sparse convs (a fused block, a sparse conv), hands that output
    to that module alone: EDSR's and RCAN's bodies, EDSR's upsampler and last conv. The producing
    conv of a 16-bit engine may then write a 16-bit hand-off alone (fp16 or bf16), which the next
    module reads in place as its conv input (and, for a fused block, as its residual: both 16-bit
    kernels take a residual of their own dtype), saving an f32 write and half of each read."""
    for seq in model.modules():
        if not _plain_sequential(seq):
            continue
        children = [c for c in seq.children() if not isinstance(c, nn.Identity)]
        for a, b in itertools.pairwise(children):
            producer = _output_conv(a)
            if producer is not None and _input_convs_only(b):
                producer.half_chain = True


def _plain_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential`` (or a subclass that keeps its forward): each child's output goes to the next only."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _output_conv(module: nn.Module) -> SparseConv2d | None:
    """The sparse conv whose output is ``module``'s output, if there is one."""
    if isinstance(module, SparseConv2d):
        return module
    if isinstance(module, FusedResidual):
        return module.last
    if _plain_sequential(module):
        kids = [c for c in module.children() if not isinstance(c, nn.Identity)]
        return _output_conv(kids[-1]) if kids else None
    return None


def _input_convs_only(module: nn.Module) -> bool:
    """Whether ``module`` reads its input only through sparse convs (any of which takes fp16)."""
    if isinstance(module, SparseConv2d | FusedResidual):
        return True
    if isinstance(module, FusedTail):
        return _input_convs_only(module[0])
    if _plain_sequential(module):
        kids = [c for c in module.children() if not isinstance(c, nn.Identity)]
        return bool(kids) and _input_convs_only(kids[0])
    return False
