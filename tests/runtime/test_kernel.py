"""The C++ kernels against PyTorch: conv geometry, N:M patterns, Linear, packing, fallback."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nmrestore.runtime import csr_from_dense, csr_from_packed, detect_nm, kernel_status, load_kernel
from nmrestore.sparsity import nm
from tests.runtime.kernel_helpers import kernel, nm_weight, sparse_conv

TOL = 1e-4


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_geometry_matches_pytorch(k: int, stride: int, padding: int, bias: bool) -> None:
    w = nm_weight((6, 8, k, k), 2, 4)
    x = torch.rand(2, 8, 11, 13)  # odd sizes, a batch of 2
    b = torch.randn(6) if bias else None
    ref = F.conv2d(x, w, b, stride=stride, padding=padding)
    out = sparse_conv(w, x, b, stride, padding)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= TOL


@pytest.mark.parametrize(("n", "m"), [(1, 4), (2, 4), (2, 8), (4, 32)])
@pytest.mark.parametrize("size", [(7, 5), (9, 70), (33, 17)])  # narrower and wider than one tile
def test_conv_nm_patterns(n: int, m: int, size: tuple[int, int]) -> None:
    w = nm_weight((16, 32, 3, 3), n, m, seed=n + m)
    x = torch.randn(1, 32, *size)
    b = torch.randn(16)
    ref = F.conv2d(x, w, b, padding=1)
    assert (sparse_conv(w, x, b, 1, 1) - ref).abs().max() <= TOL


@pytest.mark.parametrize("out_channels", [1, 7, 8])
@pytest.mark.parametrize("shuffle", [1, 3])
def test_paired_output_channels_match_pytorch(out_channels: int, shuffle: int) -> None:
    # at >= 20% density output channels run in pairs that load shared positions once; an odd count
    # (and x3 shuffle groups, which split pairs) leaves channels alone
    o = out_channels * shuffle * shuffle
    w = nm_weight((o, 16, 3, 3), 2, 4, seed=o)
    if o > 3:
        w[1] = 2 * w[0]  # the same positions: every one shared
        w[3] = torch.randn(16, 3, 3) * (w[2] == 0)  # the other positions: none shared
    x = torch.randn(1, 16, 9, 70)
    b = torch.randn(o)
    csr = csr_from_dense(w)
    out = kernel().conv2d(
        x, csr.rowptr, csr.cin, csr.kpos, csr.values, b, o, (3, 3), (1, 1), (1, 1), (1, 1), shuffle=shuffle
    )
    ref = F.conv2d(x, w, b, padding=1)
    ref = F.pixel_shuffle(ref, shuffle) if shuffle > 1 else ref
    assert (out - ref).abs().max() <= TOL


@pytest.mark.parametrize(("k", "dilation", "stride"), [(1, 1, 1), (3, 1, 1), (3, 2, 1), (5, 1, 2), (3, 3, 2)])
@pytest.mark.parametrize("border", [0, 1, 2])
def test_kernel_column_groups_match_pytorch(k: int, dilation: int, stride: int, border: int) -> None:
    # at >= 20% density a tile runs its weights kernel column by kernel column, loading whole aligned
    # vectors from up to 15 floats before its window; how far the window sits past a vector boundary
    # depends on where the input lives: 0 in the kernel's own padded copy (border 0), 16 - padding
    # in a hand-off view read in place (border 1, 2), wide rows ending inside a tile either way
    pad = dilation * (k - 1) // 2
    x = torch.randn(1, 32, 9, 70)
    w0 = nm_weight((32, 32, 3, 3), 16, 32, seed=1, scale=0.2)
    h = sparse_conv(w0, x, out_pad=(border, border)) if border else x
    ref_h = F.conv2d(x, w0, padding=1) if border else x
    w = nm_weight((12, 32, k, k), 16, 32, seed=k, scale=0.2)
    b = torch.randn(12)
    out = sparse_conv(w, h, b, stride, pad, dilation)
    ref = F.conv2d(ref_h, w, b, stride=stride, padding=pad, dilation=dilation)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=1e-5, atol=TOL)


@pytest.mark.parametrize("width", [40, 70, 130])
@pytest.mark.parametrize(("shuffle", "border"), [(1, 0), (2, 0), (2, 1)])
def test_widening_sparse_conv_matches_pytorch(width: int, shuffle: int, border: int) -> None:
    # an ungrouped layer with O >= 4 C (an upsampler's conv) runs 2x32 tiles where others run 2x64:
    # whole 32-column tiles, a narrower rest, and column chunks of several tiles, read from the
    # kernel's padded copy or in place from a hand-off view
    x = torch.randn(1, 32, 7, width)
    w0 = nm_weight((32, 32, 3, 3), 16, 32, seed=3, scale=0.2)
    h = sparse_conv(w0, x, out_pad=(border, border)) if border else x
    ref_h = F.conv2d(x, w0, padding=1) if border else x
    w = nm_weight((128, 32, 3, 3), 2, 32, seed=width)
    b = torch.randn(128)
    csr = csr_from_dense(w)
    out = kernel().conv2d(
        h, csr.rowptr, csr.cin, csr.kpos, csr.values, b, 128, (3, 3), (1, 1), (1, 1), (1, 1), shuffle=shuffle
    )
    ref = F.conv2d(ref_h, w, b, padding=1)
    ref = F.pixel_shuffle(ref, shuffle) if shuffle > 1 else ref
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=1e-5, atol=TOL)


def test_conv_fused_relu_dilation_and_groups() -> None:
    w = nm_weight((8, 8, 3, 3), 2, 4)
    x = torch.randn(1, 8, 12, 10)
    ref = F.relu(F.conv2d(x, w, None, padding=2, dilation=2))
    assert (sparse_conv(w, x, None, 1, 2, dilation=2, relu=True) - ref).abs().max() <= TOL
    wg = nm_weight((8, 4, 3, 3), 1, 4)  # two groups of 4 input channels
    ref = F.conv2d(x, wg, None, padding=1, groups=2)
    assert (sparse_conv(wg, x, None, 1, 1, groups=2) - ref).abs().max() <= TOL


@pytest.mark.parametrize("size", [(5, 7), (6, 70)])
@pytest.mark.parametrize("relu", [False, True])
def test_conv_residual_epilogue(size: tuple[int, int], relu: bool) -> None:
    w = nm_weight((8, 8, 3, 3), 2, 8)
    b = torch.randn(8)
    x = torch.randn(2, 8, *size)
    res = torch.randn(2, 8, *size)
    csr = csr_from_dense(w)
    out = kernel().conv2d(
        x,
        csr.rowptr,
        csr.cin,
        csr.kpos,
        csr.values,
        b,
        8,
        (3, 3),
        (1, 1),
        (1, 1),
        (1, 1),
        relu=relu,
        residual=res,
        res_scale=0.1,
    )
    ref = res + 0.1 * F.conv2d(x, w, b, padding=1)
    ref = F.relu(ref) if relu else ref
    assert (out - ref).abs().max() <= TOL


def test_conv_of_a_one_pixel_input() -> None:
    w = nm_weight((4, 8, 1, 1), 2, 4)
    x = torch.randn(3, 8, 1, 1)
    assert (sparse_conv(w, x, None, 1, 0) - F.conv2d(x, w)).abs().max() <= TOL


@pytest.mark.parametrize("relu", [False, True])
def test_linear_matches_pytorch(relu: bool) -> None:
    w = nm_weight((10, 32), 2, 8)
    x = torch.randn(5, 32)
    b = torch.randn(10)
    csr = csr_from_dense(w)
    out = kernel().linear(x, csr.rowptr, csr.cin, csr.values, b, 10, relu=relu)
    ref = F.linear(x, w, b)
    ref = F.relu(ref) if relu else ref
    assert (out - ref).abs().max() <= TOL


@pytest.mark.parametrize("shape", [(6, 8, 3, 3), (6, 8, 1, 1), (5, 16)])
def test_csr_from_packed_lists_exactly_the_kept_weights(shape: tuple[int, ...]) -> None:
    w = torch.randn(*shape)
    ranks = nm.compute_ranks(w, 4)
    packed = nm.pack(w, ranks, 2, 4)
    a = csr_from_packed(packed)
    b = csr_from_dense(w * (ranks < 2))
    assert torch.equal(a.rowptr, b.rowptr) and torch.equal(a.cin, b.cin) and torch.equal(a.kpos, b.kpos)
    assert torch.equal(a.values, b.values)
    assert a.nnz == w.numel() // 2 and a.density == pytest.approx(0.5)


def test_detect_nm_finds_the_sparsest_pattern() -> None:
    assert detect_nm(nm_weight((4, 32, 3, 3), 4, 32)) == (4, 32)
    assert detect_nm(nm_weight((4, 32, 3, 3), 2, 4)) == (2, 4)
    assert detect_nm(torch.randn(4, 32, 3, 3)) is None
    assert detect_nm(torch.randn(4, 3, 3, 3)) is None  # 3 channels: no group size fits


def test_kernel_builds_and_reports_itself() -> None:
    status = kernel_status()
    if not status.available:  # pragma: no cover
        pytest.skip(status.reason)
    assert status.library is not None and status.library.is_file()
    assert status.vector_floats >= 4 and "sparse kernel" in status.summary()


def test_no_compiler_means_unavailable_with_a_reason(
    fresh_kernel: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fresh_kernel.setenv("NMRESTORE_CXX", str(tmp_path / "no-such-compiler"))
    fresh_kernel.setenv("NMRESTORE_KERNEL_CACHE", str(tmp_path / "cache"))
    assert load_kernel() is None
    status = kernel_status()
    assert not status.available and "no C++ compiler" in status.reason


def test_a_failing_compiler_means_unavailable_with_its_error(
    fresh_kernel: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "broken-c++"
    fake.write_text(
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\necho 'boom: cannot compile' >&2\nexit 1\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    fresh_kernel.setenv("NMRESTORE_CXX", str(fake))
    fresh_kernel.setenv("NMRESTORE_KERNEL_CACHE", str(tmp_path / "cache"))
    assert load_kernel() is None
    assert "boom: cannot compile" in kernel_status().reason
    assert not any(p.suffix == ".so" for p in (tmp_path / "cache").rglob("*"))


def test_disabled_by_environment(fresh_kernel: pytest.MonkeyPatch) -> None:
    fresh_kernel.setenv("NMRESTORE_DISABLE_KERNEL", "1")
    assert load_kernel() is None
    assert "NMRESTORE_DISABLE_KERNEL" in kernel_status().reason
    assert os.environ["NMRESTORE_DISABLE_KERNEL"] == "1"


@pytest.mark.parametrize(("width", "shuffle", "border"), [(256, 1, 0), (257, 1, 0), (250, 1, 1), (128, 2, 0)])
def test_large_outputs_written_past_the_caches_match_pytorch(width: int, shuffle: int, border: int) -> None:
    # outputs of >= 2^20 floats are written with non-temporal stores where a vector is aligned (rows
    # of 256 floats: all; 257: some; a hand-off buffer's interior: all) and ordinary stores elsewhere
    c, o = 8, 32 if shuffle == 1 else 64
    x = torch.randn(1, c, 256 // shuffle, width)
    w = nm_weight((o, c, 3, 3), 2, 4, seed=width)
    b = torch.randn(o)
    assert o * x.shape[2] * width >= 2**20
    out = sparse_conv(w, x, b, relu=True, shuffle=shuffle, out_pad=(border, border) if border else None)
    ref = F.relu(F.conv2d(x, w, b, padding=1))
    ref = F.pixel_shuffle(ref, shuffle) if shuffle > 1 else ref
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= TOL


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("out_channels", "shuffle"), [(16, 1), (3, 1), (16, 2)])
def test_items_walking_several_row_tiles_match_pytorch(threads: int, out_channels: int, shuffle: int) -> None:
    # 2 images of 75 rows (38 row tiles: not a whole number of bands), 300 columns (two column chunks):
    # enough items that each walks several row tiles, with the last band shorter than the others
    w = nm_weight((out_channels, 16, 3, 3), 2, 8, seed=3)
    b = torch.randn(out_channels)
    x = torch.randn(2, 16, 75, 300)
    ref = F.conv2d(x, w, b, padding=1)
    if shuffle > 1:
        out = sparse_conv(w, x, b, relu=True, shuffle=shuffle, threads=threads)
        assert (out - F.relu(F.pixel_shuffle(ref, shuffle))).abs().max() <= TOL
        return
    res = torch.randn_like(ref)
    out = sparse_conv(w, x, b, relu=True, residual=res, res_scale=0.5, threads=threads)
    assert (out - F.relu(res + 0.5 * ref)).abs().max() <= TOL
