"""Hand-off layout between sparse convs, the fused pixel shuffle, strided operands and the fallbacks.

Kernel level: a conv writes a zero-bordered hand-off view, the next conv reads it in place (with
its own, possibly smaller, padding), a residual is read through any strides, a shuffled output
lands where ``pixel_shuffle`` puts it. Engine level: the pairs are found on the first forward and
later forwards (which use them) still match the dense-with-zeros model exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nmrestore.models import create_model
from nmrestore.models.common import LongSkip
from nmrestore.runtime import (
    EngineConfig,
    SparseConv2d,
    compile_sparse,
    engine_state,
    sparse_layers,
)
from nmrestore.runtime import kernel as kernel_module
from nmrestore.runtime.fusion import FusedLongSkip
from nmrestore.runtime.kernel import handoff_layout
from nmrestore.sparsity import NMConfig, sparsify_, squash_
from tests.runtime.kernel_helpers import kernel, nm_weight, sparse_conv

TOL = 1e-4


def _nm_weight(shape: tuple[int, ...], n: int, m: int, seed: int = 0) -> torch.Tensor:
    return nm_weight(shape, n, m, seed, scale=0.3)  # activations stay O(1) through a chain


@pytest.mark.parametrize("size", [(5, 7), (9, 70), (13, 33)])  # narrower and wider than a tile
@pytest.mark.parametrize("relu", [False, True])
def test_a_chain_of_convs_through_the_handoff_layout(size: tuple[int, int], relu: bool) -> None:
    lib = kernel()
    w1, w2 = _nm_weight((16, 8, 3, 3), 2, 8, 1), _nm_weight((16, 16, 3, 3), 1, 8, 2)
    b1, b2 = torch.randn(16), torch.randn(16)
    x = torch.randn(2, 8, *size)
    h = sparse_conv(w1, x, b1, relu=relu, out_pad=(1, 1))
    layout = handoff_layout(h)
    assert layout is not None and not h.is_contiguous()  # a strided view of the padded buffer
    ref_h = F.conv2d(x, w1, b1, padding=1)
    ref_h = F.relu(ref_h) if relu else ref_h
    assert (h - ref_h).abs().max() <= TOL  # any PyTorch op reads it as an ordinary tensor
    assert lib.accepts_handoff(h, (3, 3), (1, 1), (1, 1), (1, 1))
    # in place, with the block input (itself a hand-off view) as the residual
    y = sparse_conv(w2, h, b2, residual=h, res_scale=0.5, out_pad=(1, 1))
    ref_y = ref_h + 0.5 * F.conv2d(ref_h, w2, b2, padding=1)
    assert handoff_layout(y) is not None
    assert (y - ref_y).abs().max() <= TOL
    z = sparse_conv(w2, y, None)  # and back to a plain tensor
    assert z.is_contiguous() and handoff_layout(z) is None
    assert (z - F.conv2d(ref_y, w2, None, padding=1)).abs().max() <= TOL


def test_the_border_stays_zero_whatever_the_buffer_held() -> None:
    kernel()
    w = _nm_weight((8, 8, 3, 3), 2, 4)
    x = torch.randn(1, 8, 6, 9)
    for _ in range(3):  # fresh buffers may reuse memory full of earlier values
        garbage = torch.full((1 << 16,), float("nan"))
        del garbage
        h = sparse_conv(w, x, out_pad=(2, 2))
        y = sparse_conv(w, h, padding=2, dilation=2)
        assert torch.isfinite(y).all()
        assert (y - F.conv2d(F.conv2d(x, w, padding=1), w, padding=2, dilation=2)).abs().max() <= TOL


def test_a_wider_border_serves_a_smaller_padding_and_a_too_small_one_is_padded() -> None:
    lib = kernel()
    w3, w1 = _nm_weight((8, 8, 3, 3), 2, 4), _nm_weight((8, 8, 1, 1), 2, 4)
    x = torch.randn(1, 8, 7, 11)
    ref = F.conv2d(x, w3, padding=1)
    wide = sparse_conv(w3, x, out_pad=(2, 2))
    assert lib.accepts_handoff(wide, (3, 3), (1, 1), (1, 1), (1, 1))  # pad 1 inside a border of 2
    assert (sparse_conv(w3, wide) - F.conv2d(ref, w3, padding=1)).abs().max() <= TOL
    assert (sparse_conv(w1, wide, padding=0) - F.conv2d(ref, w1)).abs().max() <= TOL
    narrow = sparse_conv(w3, x, out_pad=(1, 1))
    assert not lib.accepts_handoff(narrow, (5, 5), (1, 1), (2, 2), (1, 1))
    w5 = _nm_weight((8, 8, 5, 5), 2, 4)
    assert (sparse_conv(w5, narrow, padding=2) - F.conv2d(ref, w5, padding=2)).abs().max() <= TOL
    # a column stride cannot read the layout in place: it pads (phases) from the strided view
    assert not lib.accepts_handoff(narrow, (3, 3), (2, 2), (1, 1), (1, 1))
    assert (sparse_conv(w3, narrow, stride=2) - F.conv2d(ref, w3, stride=2, padding=1)).abs().max() <= TOL


def test_derived_tensors_lose_the_layout() -> None:
    kernel()
    w = _nm_weight((8, 8, 3, 3), 2, 4)
    h = sparse_conv(w, torch.randn(1, 8, 6, 6), out_pad=(1, 1))
    assert handoff_layout(h) is not None
    assert handoff_layout(h.contiguous()) is None and handoff_layout(h + 0) is None
    assert handoff_layout(h[:, :4]) is None
    h.transpose_(2, 3)  # same object, other strides: not read in place any more
    assert handoff_layout(h) is None


@pytest.mark.parametrize("r", [2, 3])
@pytest.mark.parametrize("size", [(4, 5), (7, 40)])
@pytest.mark.parametrize("relu", [False, True])
def test_fused_pixel_shuffle(r: int, size: tuple[int, int], relu: bool) -> None:
    kernel()
    w = _nm_weight((4 * r * r, 8, 3, 3), 2, 8, r)
    b = torch.randn(4 * r * r)
    x = torch.randn(2, 8, *size)
    ref = F.pixel_shuffle(F.conv2d(x, w, b, padding=1), r)
    ref = F.relu(ref) if relu else ref
    out = sparse_conv(w, x, b, relu=relu, shuffle=r)
    assert out.shape == ref.shape and (out - ref).abs().max() <= TOL
    padded = sparse_conv(w, x, b, relu=relu, shuffle=r, out_pad=(1, 1))  # shuffled into a hand-off view
    assert handoff_layout(padded) is not None and (padded - ref).abs().max() <= TOL
    with pytest.raises(ValueError, match="shuffle"):
        sparse_conv(w, x, b, shuffle=r, residual=torch.zeros_like(ref))


def test_strided_inputs_and_residuals_need_no_copy() -> None:
    kernel()
    w = _nm_weight((8, 8, 3, 3), 2, 4)
    big = torch.randn(2, 8, 9, 20)
    x = big[:, :, 1:8, 2:17]  # a non-contiguous view with a unit column stride
    res = torch.randn(2, 7, 15, 8).permute(0, 3, 1, 2)  # W not contiguous: copied
    ref = res + F.conv2d(x, w, padding=1)
    out = sparse_conv(w, x, residual=res)
    assert (out - ref).abs().max() <= TOL
    res2 = torch.randn(2, 16, 7, 15)[:, ::2]  # channel stride only
    assert (sparse_conv(w, x, residual=res2) - (res2 + F.conv2d(x, w, padding=1))).abs().max() <= TOL


# -- engine -----------------------------------------------------------------------------------
def _edsr(n: int = 1, m: int = 4, blocks: int = 3, scale: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("edsr_small", scale=scale, n_feats=16, n_blocks=blocks)
    sparsify_(model, NMConfig(n=n, m=m))
    return model.eval()


def test_engine_finds_the_handoff_pairs_and_stays_exact() -> None:
    kernel()
    model = _edsr()
    reference = squash_(copy.deepcopy(model))
    engine = compile_sparse(model, EngineConfig(tactic="sparse"))
    x = torch.rand(1, 3, 11, 37)
    with torch.no_grad():
        expected = reference(x)
        outputs = [engine(x) for _ in range(3)]
    for got in outputs:  # the first forward finds the pairs, the later ones use them
        assert (got - expected).abs().max() <= TOL
    pads = {layer.layer_name: layer.out_pad for layer in sparse_layers(engine)}
    # every body conv feeds another body conv; the last body conv adds the long skip in its
    # epilogue (FusedLongSkip) and feeds the upsampler conv
    assert pads["body.0.body.0"] == (1, 1) and pads["body.0.body.2"] == (1, 1)
    assert pads["body.2.body.2"] == (1, 1) and pads["body.3"] == (1, 1)
    assert pads["tail.0.0"] == (1, 1)  # its consumer, the dense last conv, runs on the kernel too (dense_convs)
    plain = compile_sparse(model, EngineConfig(tactic="sparse", handoff=False))
    with torch.no_grad():
        plain(x)
        assert torch.equal(plain(x), outputs[-1])  # the same arithmetic, only the layout differs
    assert all(layer.out_pad is None for layer in sparse_layers(plain))


def test_the_trunks_last_conv_adds_the_long_skip() -> None:
    """EDSR's ``body(features) + features`` runs as the body's last conv with ``features`` as its
    residual: the same f32 arithmetic as the sum in PyTorch, bit for bit."""
    kernel()
    model = _edsr()
    reference = squash_(copy.deepcopy(model))
    engine = compile_sparse(model, EngineConfig(tactic="sparse"))
    assert isinstance(engine.long_skip, FusedLongSkip)
    x = torch.rand(1, 3, 11, 37)
    with torch.no_grad():
        fused = [engine(x) for _ in range(2)]
        assert (fused[-1] - reference(x)).abs().max() <= TOL
        engine.long_skip = LongSkip()  # the sum back in PyTorch
        engine(x)
        assert torch.equal(engine(x), fused[-1])


def test_a_long_skip_that_cannot_fuse_sums_in_pytorch() -> None:
    inner = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())  # not a sparse conv last
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert torch.equal(FusedLongSkip()(inner, x), inner(x) + x)


def test_engine_fuses_the_pixel_shuffle_on_both_tactics() -> None:
    kernel()
    for scale in (2, 3, 4):
        model = _edsr(scale=scale, blocks=1)
        reference = squash_(copy.deepcopy(model))
        x = torch.rand(1, 3, 6, 9)
        for tactic in ("sparse", "dense", "auto"):
            engine = compile_sparse(model, EngineConfig(tactic=tactic, timing_repeats=1))  # type: ignore[arg-type]
            ups = [m for m in sparse_layers(engine) if m.layer_name.startswith("tail.0")]
            assert ups and all(
                isinstance(m, SparseConv2d) and m.shuffle == (3 if scale == 3 else 2) for m in ups
            )
            assert not any(isinstance(m, nn.PixelShuffle) for m in engine.modules())
            with torch.no_grad():
                for _ in range(2):
                    assert (engine(x) - reference(x)).abs().max() <= TOL, (scale, tactic)
        unfused = compile_sparse(model, EngineConfig(tactic="sparse", fuse_shuffle=False))
        assert any(isinstance(m, nn.PixelShuffle) for m in unfused.modules())
        with torch.no_grad():
            assert (unfused(x) - reference(x)).abs().max() <= TOL


def test_fused_shuffle_after_a_fused_relu_carn_style() -> None:
    kernel()
    torch.manual_seed(0)
    model = create_model("carn_small", scale=4)
    sparsify_(model, NMConfig(n=2, m=4))
    model.eval()
    engine = compile_sparse(model, EngineConfig(tactic="sparse"))
    shuffled = [m for m in sparse_layers(engine) if m.shuffle > 1]
    assert shuffled and all(m.relu for m in shuffled)  # CARN's upsampler: conv, ReLU, shuffle
    x = torch.rand(1, 3, 7, 10)
    with torch.no_grad():
        expected = squash_(copy.deepcopy(model))(x)
        for _ in range(2):
            assert (engine(x) - expected).abs().max() <= TOL


def test_a_dense_consumer_never_asks_for_the_layout() -> None:
    kernel()
    model = _edsr(n=2, m=4, blocks=2)
    engine = compile_sparse(model, EngineConfig(tactic="sparse"))
    consumer = engine.get_submodule("body.1.block.body.0")
    assert isinstance(consumer, SparseConv2d)
    consumer.routes[0].csr = None  # this layer now runs dense PyTorch
    consumer.routes[0].why_dense = "test"
    x = torch.rand(1, 3, 8, 12)
    with torch.no_grad():
        expected = squash_(copy.deepcopy(model))(x)
        for _ in range(3):
            assert (engine(x) - expected).abs().max() <= TOL
    producer = engine.get_submodule("body.0.last")
    assert isinstance(producer, SparseConv2d) and producer.out_pad is None
    state = engine_state(engine)
    assert state is not None and any(d.reason == "test" for d in state.table())


def test_handoff_views_feed_pytorch_ops_and_batches() -> None:
    kernel()
    model = _edsr(blocks=2)
    engine = compile_sparse(model, EngineConfig(tactic="sparse"))
    reference = squash_(copy.deepcopy(model))
    with torch.no_grad():
        for shape in ((2, 3, 9, 10), (1, 3, 9, 10), (3, 3, 5, 70), (2, 3, 9, 10)):
            x = torch.rand(*shape)
            for _ in range(2):
                assert (engine(x) - reference(x)).abs().max() <= TOL, shape
        # a hand-off view given to a dense PyTorch conv and to autograd-free ops
        h = engine.body[0](engine.head(engine.sub_mean(torch.rand(1, 3, 6, 6))))
        if handoff_layout(h) is not None:
            w = torch.randn(4, h.shape[1], 3, 3)
            assert torch.allclose(F.conv2d(h, w, padding=1), F.conv2d(h.contiguous(), w, padding=1), atol=TOL)


def test_pooled_outputs_are_never_overwritten_while_in_use() -> None:
    lib = kernel()
    w = _nm_weight((8, 8, 3, 3), 2, 4)
    x1, x2 = torch.randn(1, 8, 6, 7), torch.randn(1, 8, 6, 7)
    for pad in (None, (1, 1)):
        a = sparse_conv(w, x1, out_pad=pad)
        kept = a[:, 2:5]  # only a view of it survives
        kept_ref = kept.clone()
        del a
        b = sparse_conv(w, x2, out_pad=pad)  # must not land in the memory the view still uses
        assert torch.equal(kept, kept_ref)
        assert (b - F.conv2d(x2, w, padding=1)).abs().max() <= TOL
        ptr = b.data_ptr()
        del b
        c = sparse_conv(w, x2, out_pad=pad)
        if kernel_module._use_count is not None:
            assert c.data_ptr() == ptr  # free memory is reused (no fresh pages per call)
        del kept
    lib.release_workspace()


def _whole_buffer(view: torch.Tensor) -> torch.Tensor:
    """The (rows, C, width) buffer around a hand-off view of one image, border included."""
    layout = handoff_layout(view)
    assert layout is not None
    c = view.shape[1]
    row = c * layout.width
    return view.as_strided((layout.rows, c, layout.width), (row, layout.width, 1),
                           view.storage_offset() - layout.pad_h * row - layout.pad_w)  # fmt: skip


def test_a_reused_handoff_buffer_keeps_the_zero_border_its_last_conv_wrote() -> None:
    lib = kernel()
    if kernel_module._use_count is None:
        pytest.skip("this torch does not say who uses a storage: outputs are not pooled")
    w = _nm_weight((8, 8, 3, 3), 2, 4)
    x = torch.randn(1, 8, 6, 7)
    ref = F.conv2d(x, w, padding=1)
    a = sparse_conv(w, x, out_pad=(1, 1))
    layout = handoff_layout(a)
    assert layout is not None
    spot = (layout.pad_h, 0, layout.pad_w - 1)  # the left border column, read as the next conv's padding
    assert _whole_buffer(a)[spot] == 0
    _whole_buffer(a)[spot] = float("nan")  # what the kernels never do: write outside the image
    ptr = a.data_ptr()
    del a
    # the same layout from the same buffer: the border its conv zeroed is taken as it is
    b = sparse_conv(w, x, out_pad=(1, 1))
    assert b.data_ptr() == ptr and torch.isnan(_whole_buffer(b)[spot])
    assert torch.equal(b, sparse_conv(w, x, out_pad=(1, 1)))  # the image itself is written whole
    floats = _whole_buffer(b).untyped_storage().nbytes() // 4
    del b
    plain = lib._output_buffer(floats)  # the buffer handed out for anything else forgets its border
    del plain
    c = sparse_conv(w, x, out_pad=(1, 1))
    assert c.data_ptr() == ptr and _whole_buffer(c)[spot] == 0 and (c - ref).abs().max() <= TOL
    lib.release_workspace()
