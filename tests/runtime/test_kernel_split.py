"""The f32 kernel on sparse layers split by blocks of input channels.

Below 20% density, a layer with per-channel masks and at least two whole blocks of 32 input
channels runs block by block: every output channel sums over the first 32 input channels, its
partial sums kept aside, then over the next 32. These tests check that it is split exactly where
``input_blocks`` says, and that the split conv equals PyTorch's through every epilogue, input
layout, geometry and the routed-tiles entry point.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nmrestore.runtime import csr_from_dense
from tests.runtime import kernel_helpers as kh
from tests.runtime.test_kernel_blocks import coarse_weight

TOL = 1e-4


def test_input_blocks_reports_where_the_kernel_splits() -> None:
    lib = kh.kernel()
    assert lib.input_blocks(csr_from_dense(kh.nm_weight((64, 64, 3, 3), 4, 32))) == 2
    assert lib.input_blocks(csr_from_dense(kh.nm_weight((64, 64, 3, 3), 2, 32))) == 2
    assert lib.input_blocks(csr_from_dense(kh.nm_weight((48, 128, 3, 3), 1, 32))) == 4
    assert lib.input_blocks(csr_from_dense(kh.nm_weight((64, 96, 1, 1), 4, 32))) == 3
    # unsplit: 20% dense and more (pairs and kernel-column groups run there), one block of input
    # channels only, channels not a whole number of blocks, masks shared by blocks of outputs, and
    # a conv that widens its channels 4x (its 2x32 tiles' window already stays in L1)
    assert lib.input_blocks(csr_from_dense(kh.nm_weight((64, 64, 3, 3), 8, 32))) == 1
    assert lib.input_blocks(csr_from_dense(kh.nm_weight((64, 32, 3, 3), 2, 32))) == 1
    assert lib.input_blocks(csr_from_dense(kh.nm_weight((64, 80, 3, 3), 2, 16))) == 1
    assert lib.input_blocks(csr_from_dense(coarse_weight((64, 64, 3, 3), 4, 32, 16))) == 1
    assert lib.input_blocks(csr_from_dense(kh.nm_weight((256, 64, 3, 3), 4, 32))) == 1
    assert lib.input_blocks(csr_from_dense(torch.randn(3, 64, 3, 3))) == 1  # dense


@pytest.mark.parametrize("out_channels", [1, 5, 64, 70, 130])  # fewer than, one and several chunks of 64
@pytest.mark.parametrize("size", [(7, 5), (9, 40), (5, 70), (3, 130)])  # narrower and wider than a tile
@pytest.mark.parametrize(("n", "c"), [(2, 64), (4, 64), (1, 96)])
def test_split_conv_matches_pytorch(out_channels: int, size: tuple[int, int], n: int, c: int) -> None:
    w = kh.nm_weight((out_channels, c, 3, 3), n, 32, seed=out_channels + n)
    x = torch.randn(1, c, *size)
    b = torch.randn(out_channels)
    assert kh.kernel().input_blocks(csr_from_dense(w)) == c // 32
    assert (kh.sparse_conv(w, x, b) - F.conv2d(x, w, b, padding=1)).abs().max() <= TOL


def test_a_channel_that_keeps_nothing_in_one_block_is_still_exact() -> None:
    # channel 3 keeps weights only among the first 32 inputs, channel 4 only among the last 32, and
    # channel 5 nothing at all: their other blocks add nothing to the partial sums
    w = kh.nm_weight((8, 64, 3, 3), 4, 32, seed=7)
    w[3, 32:] = 0
    w[4, :32] = 0
    w[5] = 0
    assert kh.kernel().input_blocks(csr_from_dense(w)) == 2
    x = torch.randn(1, 64, 6, 50)
    b = torch.randn(8)
    assert (kh.sparse_conv(w, x, b) - F.conv2d(x, w, b, padding=1)).abs().max() <= TOL


@pytest.mark.parametrize(("k", "dilation", "stride"), [(1, 1, 1), (3, 2, 1), (5, 1, 2), (3, 1, 2)])
def test_split_conv_geometry_matches_pytorch(k: int, dilation: int, stride: int) -> None:
    w = kh.nm_weight((16, 64, k, k), 2, 32, seed=k)
    assert kh.kernel().input_blocks(csr_from_dense(w)) == 2
    assert kh.geometry_error(w, torch.randn(2, 64, 11, 37), torch.randn(16), stride, dilation) <= TOL


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("border", [0, 1])
def test_split_residual_epilogue_and_handoff(relu: bool, border: int) -> None:
    # a residual block as the engine runs it: the first conv hands its output over in a zero-bordered
    # buffer (read in place by the second), the second adds the scaled skip and applies the ReLU
    first, second = kh.nm_weight((64, 64, 3, 3), 4, 32, seed=1, scale=0.2), kh.nm_weight((64, 64, 3, 3), 4, 32, seed=2)
    assert kh.residual_block_matches(first, second, relu, border, TOL)


def test_split_conv_with_a_large_output_matches_pytorch() -> None:
    # >= 2^20 output floats: the tiles write with non-temporal stores, after both blocks' sums
    w = kh.nm_weight((32, 64, 3, 3), 2, 32, seed=3)
    x = torch.randn(1, 64, 160, 256)
    b = torch.randn(32)
    skip = torch.randn(1, 32, 160, 256)
    out = kh.sparse_conv(w, x, b, relu=True, residual=skip)
    ref = F.relu(F.conv2d(x, w, b, padding=1) + skip)
    assert (out - ref).abs().max() <= TOL


def test_a_shuffled_conv_is_not_split_and_stays_exact() -> None:
    # a fused pixel shuffle runs its conv unsplit (see split_by_channels); 64 -> 4 x 16 channels
    w = kh.nm_weight((64, 64, 3, 3), 2, 32, seed=8)
    assert kh.kernel().input_blocks(csr_from_dense(w)) == 2  # as a plain conv it would be
    x = torch.randn(1, 64, 5, 40)
    b = torch.randn(64)
    out = kh.sparse_conv(w, x, b, shuffle=2)
    ref = F.pixel_shuffle(F.conv2d(x, w, b, padding=1), 2)
    assert (out - ref).abs().max() <= TOL


def test_split_tiles_on_routes_match_pytorch() -> None:
    # spatial routing (one kernel call for every tile of an image, each on its route): a split route
    # (4:32) and an unsplit one (16:32) side by side, in place in hand-off buffers
    lib = kh.kernel()
    c = 64
    sparse = kh.nm_weight((c, c, 3, 3), 4, 32, seed=4, scale=0.2)
    denser = kh.nm_weight((c, c, 3, 3), 16, 32, seed=5, scale=0.2)
    assert (lib.input_blocks(csr_from_dense(sparse)), lib.input_blocks(csr_from_dense(denser))) == (2, 1)
    h = kh.sparse_conv(kh.nm_weight((c, c, 3, 3), 16, 32, seed=6, scale=0.2), torch.randn(1, c, 8, 64), out_pad=(1, 1))
    assert kh.two_routes_side_by_side(sparse, denser, h) <= TOL  # the split route on the left


@settings(max_examples=40, deadline=None)
@given(out_channels=st.integers(1, 140), blocks=st.integers(2, 3), **kh.CONV_CASE)
def test_split_conv_property(out_channels: int, blocks: int, n: int, k: int, h: int, w: int, seed: int) -> None:
    # any number of output channels (one chunk of 64 and more), any spatial size: PyTorch's conv
    weight = kh.nm_weight((out_channels, 32 * blocks, k, k), n, 32, seed=seed)
    assert kh.seeded_conv_error(weight, h, w, seed) <= TOL
