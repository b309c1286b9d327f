"""The f32 kernel on masks shared by blocks of output channels ("coarse" N:M, ``out_block``).

Where every whole block of 4 consecutive output channels keeps the same positions, the tiles run
those 4 channels at once (one input load for four FMAs); these tests check that path against
PyTorch through every epilogue and input layout, and that it is taken exactly when blocks share.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nmrestore.runtime import csr_from_dense
from nmrestore.sparsity import nm
from tests.runtime.kernel_helpers import (
    CONV_CASE,
    geometry_error,
    kernel,
    nm_weight,
    residual_block_matches,
    seeded_conv_error,
    sparse_conv,
    two_routes_side_by_side,
)

TOL = 1e-4


def coarse_weight(
    shape: tuple[int, int, int, int], n: int, m: int, block: int, seed: int = 0, scale: float = 1.0
) -> torch.Tensor:
    """A seeded random weight pruned to N:M along input channels with one mask per block of
    ``block`` output channels (the last, partial block on its own)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * scale
    o = shape[0]
    whole = o - o % block
    scores = w.abs().clone()
    if whole:
        scores[:whole] = nm.block_scores(w[:whole].abs(), block)
    return w * (nm.compute_ranks(scores, m) < n)


def test_channel_block_reports_the_kernels_blocks() -> None:
    lib = kernel()
    assert lib.channel_block(csr_from_dense(coarse_weight((16, 32, 3, 3), 4, 32, 16))) == 4
    assert lib.channel_block(csr_from_dense(coarse_weight((16, 32, 3, 3), 4, 32, 4))) == 4
    assert lib.channel_block(csr_from_dense(torch.randn(8, 32, 3, 3))) == 4  # dense: every position shared
    # per-channel masks, blocks of 2 only, and one block with a differing channel: channels alone
    assert lib.channel_block(csr_from_dense(nm_weight((16, 32, 3, 3), 4, 32))) == 1
    assert lib.channel_block(csr_from_dense(coarse_weight((16, 32, 3, 3), 4, 32, 2))) == 1
    w = coarse_weight((16, 32, 3, 3), 4, 32, 16)
    w[5] = nm_weight((1, 32, 3, 3), 4, 32, seed=9)[0]
    assert lib.channel_block(csr_from_dense(w)) == 1
    assert lib.channel_block(csr_from_dense(coarse_weight((3, 32, 3, 3), 4, 32, 1))) == 1  # fewer than a block


def test_a_block_with_one_weight_zero_where_its_block_keeps_it_is_still_exact() -> None:
    # a kept position whose trained value is 0 drops out of the CSR for that channel only: the
    # block no longer shares positions and must run channel by channel, still exactly
    w = coarse_weight((8, 32, 3, 3), 4, 32, 8, seed=3)
    kept = w[2].nonzero()[0]
    w[2][tuple(kept)] = 0.0
    assert kernel().channel_block(csr_from_dense(w)) == 1
    x = torch.randn(1, 32, 9, 40)
    assert (sparse_conv(w, x) - F.conv2d(x, w, padding=1)).abs().max() <= TOL


@pytest.mark.parametrize("out_channels", [4, 8, 12, 14])  # whole blocks, and 2 channels left alone
@pytest.mark.parametrize("size", [(7, 5), (9, 40), (5, 70), (3, 130)])  # narrower and wider than a tile
@pytest.mark.parametrize(("n", "m"), [(2, 32), (4, 32), (2, 4), (4, 4)])
def test_blocked_conv_matches_pytorch(out_channels: int, size: tuple[int, int], n: int, m: int) -> None:
    w = coarse_weight((out_channels, 32, 3, 3), n, m, 4, seed=out_channels + n)
    x = torch.randn(1, 32, *size)
    b = torch.randn(out_channels)
    assert kernel().channel_block(csr_from_dense(w)) == (4 if out_channels >= 4 else 1)
    assert (sparse_conv(w, x, b) - F.conv2d(x, w, b, padding=1)).abs().max() <= TOL


@pytest.mark.parametrize(("k", "dilation", "stride"), [(1, 1, 1), (3, 2, 1), (5, 1, 2), (3, 1, 2)])
def test_blocked_conv_geometry_matches_pytorch(k: int, dilation: int, stride: int) -> None:
    w = coarse_weight((8, 16, k, k), 4, 16, 8, seed=k)
    assert geometry_error(w, torch.randn(2, 16, 11, 37), torch.randn(8), stride, dilation) <= TOL


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("border", [0, 1])
def test_blocked_residual_epilogue_and_handoff(relu: bool, border: int) -> None:
    # a residual block as the engine runs it: the first conv hands its output over in a zero-bordered
    # buffer (read in place by the second), the second adds the scaled skip and applies the ReLU
    first, second = coarse_weight((32, 32, 3, 3), 4, 32, 16, seed=1, scale=0.2), coarse_weight((32, 32, 3, 3), 4, 32, 16, seed=2)
    assert residual_block_matches(first, second, relu, border, TOL)


@pytest.mark.parametrize("shuffle", [2, 3])
@pytest.mark.parametrize("width", [20, 70])
def test_blocked_conv_with_fused_pixel_shuffle(shuffle: int, width: int) -> None:
    # x2: the 4 channels of one shuffled channel are one block; x3: 9 channels per shuffled channel,
    # so blocks straddle them and those channels run alone
    o = 4 * shuffle * shuffle
    w = coarse_weight((o, 16, 3, 3), 2, 16, 4, seed=o)
    x = torch.randn(1, 16, 5, width)
    b = torch.randn(o)
    out = sparse_conv(w, x, b, shuffle=shuffle)
    ref = F.pixel_shuffle(F.conv2d(x, w, b, padding=1), shuffle)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= TOL


def test_blocked_tiles_on_routes_match_pytorch() -> None:
    # spatial routing (one kernel call for every tile of an image, each on its route): a blocked
    # route and a per-channel route side by side, in place in hand-off buffers
    c = 16
    coarse = coarse_weight((c, c, 3, 3), 2, 16, 8, seed=4)
    fine = nm_weight((c, c, 3, 3), 8, 16, seed=5)
    h = sparse_conv(coarse_weight((c, c, 3, 3), 16, 16, 8, seed=6, scale=0.2), torch.randn(1, c, 8, 64), out_pad=(1, 1))
    assert two_routes_side_by_side(coarse, fine, h) <= TOL  # the coarse route on the left


@settings(max_examples=40, deadline=None)
@given(blocks=st.integers(1, 4), rest=st.integers(0, 3), c_groups=st.integers(1, 3), **CONV_CASE)
def test_blocked_conv_property(
    blocks: int, rest: int, c_groups: int, n: int, k: int, h: int, w: int, seed: int
) -> None:
    # any number of whole blocks and leftover channels, any spatial size: exactly PyTorch's conv
    weight = coarse_weight((4 * blocks + rest, 8 * c_groups, k, k), n, 8, 4, seed=seed)
    assert seeded_conv_error(weight, h, w, seed) <= TOL


@pytest.mark.parametrize("shuffle", [1, 2])
def test_blocked_conv_with_a_large_output_matches_pytorch(shuffle: int) -> None:
    # >= 2^20 output floats: the blocks' tiles write with non-temporal stores (see nm_kernels.cpp)
    o = 16 * shuffle * shuffle
    w = coarse_weight((o, 16, 3, 3), 2, 16, 16, seed=shuffle)
    x = torch.randn(1, 16, 256 // shuffle, 256)
    b = torch.randn(o)
    skip = torch.randn(1, o, 256, 256) if shuffle == 1 else None
    out = sparse_conv(w, x, b, relu=True, residual=skip, shuffle=shuffle)
    ref = F.conv2d(x, w, b, padding=1) + (skip if skip is not None else 0)
    ref = F.pixel_shuffle(F.relu(ref), shuffle) if shuffle > 1 else F.relu(ref)
    assert (out - ref).abs().max() <= TOL
