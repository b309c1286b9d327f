"""Exact hand-made cases and property tests for the pure N:M math."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from nmrestore.errors import SparsityError
from nmrestore.sparsity import nm


def test_hand_made_two_of_four_keeps_positions_one_and_two() -> None:
    w = torch.tensor([[1.0, -3.0, 2.0, -0.5]])
    ranks = nm.compute_ranks(w, 4)
    assert ranks.tolist() == [[2, 0, 1, 3]]
    assert ranks.dtype == torch.uint8
    assert nm.mask_from_ranks(ranks, 2).tolist() == [[False, True, True, False]]


def test_ties_break_towards_lower_index() -> None:
    w = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
    assert nm.compute_ranks(w, 4).tolist() == [[0, 1, 2, 3]]


def test_conv_groups_run_along_input_channels_element_by_element() -> None:
    # (O=2, I=4, kh=1, kw=2): every (o, kh, kw) has its own group over the 4 input channels.
    w = torch.zeros(2, 4, 1, 2)
    w[0, :, 0, 0] = torch.tensor([4.0, 1.0, 3.0, 2.0])
    w[0, :, 0, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w[1, :, 0, 0] = torch.tensor([-9.0, 0.0, 0.5, 8.0])
    w[1, :, 0, 1] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    mask = nm.mask_from_ranks(nm.compute_ranks(w, 4), 2)
    assert mask[0, :, 0, 0].tolist() == [True, False, True, False]
    assert mask[0, :, 0, 1].tolist() == [False, False, True, True]
    assert mask[1, :, 0, 0].tolist() == [True, False, False, True]
    assert mask[1, :, 0, 1].tolist() == [True, False, False, True]  # tie among zeros: lowest index
    # and nothing is grouped along output channels or kernel positions
    g = nm.to_groups(w, 4)
    assert g.shape == (2, 1, 2, 1, 4)
    assert torch.equal(g[1, 0, 0, 0], w[1, :, 0, 0])


def test_linear_and_transposed_axes() -> None:
    linear = torch.arange(8.0).reshape(1, 8)
    assert nm.to_groups(linear, 4).shape == (1, 2, 4)
    # ConvTranspose2d weight (I, O, kh, kw): the input axis is 0
    deconv = torch.randn(8, 3, 2, 2)
    g = nm.to_groups(deconv, 4, in_axis=0)
    assert g.shape == (3, 2, 2, 2, 4)
    assert torch.equal(g[1, 0, 1, 1], deconv[4:8, 1, 0, 1])
    assert torch.equal(nm.from_groups(g, deconv.shape, in_axis=0), deconv)


def test_grouped_conv_groups_stay_inside_conv_groups() -> None:
    # Conv2d(16, 8, groups=2): weight (8, 8, k, k); each conv group owns 8 input channels on axis 1.
    w = torch.randn(8, 8, 3, 3)
    g = nm.to_groups(w, 4)
    assert g.shape == (8, 3, 3, 2, 4)


def test_not_divisible_raises() -> None:
    with pytest.raises(SparsityError, match="3 input channels are not a multiple of M=4"):
        nm.to_groups(torch.randn(4, 3, 3, 3), 4)


def test_keep_table_and_bad_n() -> None:
    assert nm.keep_table(2, 4).tolist() == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(SparsityError):
        nm.keep_table(5, 4)


shapes = st.sampled_from([(4, 8, 3, 3), (2, 32, 1, 1), (3, 16), (5, 4, 2, 2), (1, 64, 3, 3)])
nms = st.sampled_from([(1, 4), (2, 4), (3, 4), (4, 4), (1, 8), (2, 8), (8, 32), (2, 32), (1, 16)])


def _weight(shape: tuple[int, ...], seed: int, quantize: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    return torch.round(w * 2) / 2 if quantize else w  # quantised weights produce many ties


@settings(max_examples=60, deadline=None)
@given(shape=shapes, pattern=nms, seed=st.integers(0, 2**16), quantize=st.booleans())
def test_every_group_keeps_exactly_n_and_masks_nest(
    shape: tuple[int, ...], pattern: tuple[int, int], seed: int, quantize: bool
) -> None:
    n, m = pattern
    if shape[1] % m:
        return
    w = _weight(shape, seed, quantize)
    ranks = nm.compute_ranks(w, m)
    groups = nm.to_groups(ranks.long(), m)
    assert torch.equal(torch.sort(groups, -1).values, torch.arange(m).expand_as(groups))
    for k in range(1, m + 1):
        mask = nm.mask_from_ranks(ranks, k)
        assert bool((nm.to_groups(mask, m).sum(-1) == k).all())
        if k > 1:
            assert bool((nm.mask_from_ranks(ranks, k - 1) <= mask).all())  # nested in N
    kept = nm.to_groups(w.abs() * nm.mask_from_ranks(ranks, n), m)
    dropped = nm.to_groups(w.abs().masked_fill(nm.mask_from_ranks(ranks, n), -1), m)
    # every kept magnitude is >= every pruned magnitude of its group
    assert bool((kept.masked_fill(kept == 0, float("inf")).min(-1).values >= dropped.max(-1).values).all() or n == m)
    assert nm.is_nm(w * nm.mask_from_ranks(ranks, n), n, m)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, pattern=nms, seed=st.integers(0, 2**16), axis=st.sampled_from([0, 1]))
def test_pack_unpack_is_identity(shape: tuple[int, ...], pattern: tuple[int, int], seed: int, axis: int) -> None:
    n, m = pattern
    if shape[axis] % m:
        return
    w = _weight(shape, seed, quantize=False)
    ranks = nm.compute_ranks(w, m, axis)
    sparse = w * nm.mask_from_ranks(ranks, n)
    packed = nm.pack(sparse, ranks, n, m, axis)
    assert torch.equal(nm.unpack(packed), sparse)
    assert packed.nbytes == nm.packed_nbytes(w.numel(), n, m)
    assert packed.indices.dtype == torch.uint8


def test_pack_bit_widths() -> None:
    assert [nm.index_bits(m) for m in (2, 4, 8, 16, 32)] == [1, 2, 3, 4, 5]
    # 64x64x3x3 at 2:4: 18432 values (fp32) + 18432 indices x 2 bits
    assert nm.packed_nbytes(64 * 64 * 9, 2, 4) == 18432 * 4 + 18432 * 2 // 8


def test_pattern_check_rejects_broken_pattern() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    assert nm.is_nm(w, 3, 4)
    assert not nm.is_nm(w, 2, 4)
    assert nm.density(w) == 0.75
