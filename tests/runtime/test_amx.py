"""The bf16 kernel's AMX path (csrc/nm_amx.h): which convs take it, their results against a bf16
reference, its epilogue and hand-off forms, padded K rows, the switch that turns it off; and the bf16
residual both bf16 paths read in a hand-off chain."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nmrestore.models import create_model
from nmrestore.runtime import EngineConfig, compile_sparse, csr_from_dense
from nmrestore.runtime.fusion import FusedResidual
from nmrestore.runtime.kernel import KernelLibrary, half_shadow
from nmrestore.sparsity import NMConfig, sparsify_, squash_
from tests.runtime.kernel_helpers import (
    amx_kernel,
    block_shared_weight,
    fused_and_apart,
    half_conv,
    half_kernel,
    nm_weight,
)

_conv16 = functools.partial(half_conv, half=torch.bfloat16)
_amx = amx_kernel


def _round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _reference(w: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None, **conv: int) -> torch.Tensor:
    return F.conv2d(_round(x), _round(w), b, **conv)


def _close(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal up to f32 summation order (bf16 products are exact in f32)."""
    assert out.shape == ref.shape
    err = float((out.float() - ref).abs().max())
    assert err <= rtol * (1.0 + float(ref.abs().max())), err


_coarse = block_shared_weight


def _runs_on_amx(lib: KernelLibrary, call: functools.partial[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    before = lib.amx_convs()
    out = call()
    return out, lib.amx_convs() == before + 1


@pytest.mark.parametrize(("n", "m"), [(2, 4), (8, 32), (4, 32), (2, 32)])
@pytest.mark.parametrize("size", [(7, 5), (9, 70), (3, 130)])  # narrower than a segment, partial, wide
def test_block_shared_masks_run_on_amx_and_match_the_reference(n: int, m: int, size: tuple[int, int]) -> None:
    lib = _amx()
    w = _coarse((32, 64, 3, 3), n, m, seed=n + m)[:24]  # a last block of 8 channels, padded to 16
    x, b = torch.randn(2, 64, *size), torch.randn(24)
    out, on_amx = _runs_on_amx(lib, functools.partial(_conv16, w, x, b))
    assert on_amx
    _close(out, _reference(w, x, b, padding=1))


@pytest.mark.parametrize(
    ("cin", "cout", "k", "padding"), [(3, 16, 3, 1), (64, 16, 3, 1), (16, 32, 1, 0), (8, 16, 5, 2), (64, 3, 3, 1)]
)
def test_dense_convs_run_on_amx(cin: int, cout: int, k: int, padding: int) -> None:
    """Dense convs too, with fewer output channels than a block (EDSR's last conv, 64 -> 3)."""
    lib = _amx()
    w, x = torch.randn(cout, cin, k, k), torch.randn(1, cin, 11, 37)
    out, on_amx = _runs_on_amx(lib, functools.partial(_conv16, w, x, None, padding=padding))
    assert on_amx
    _close(out, _reference(w, x, None, padding=padding))


@pytest.mark.parametrize(
    ("cin", "cout", "k", "dilation", "size"),
    [
        (64, 3, 3, 1, (9, 640)),  # EDSR's last conv, a whole number of segments
        (64, 3, 3, 1, (5, 100)),  # the tap columns run into a partial segment
        (16, 5, 3, 2, (6, 70)),  # 15 of 16 rows, dilated
        (32, 2, 5, 1, (4, 63)),  # five tap columns
        (8, 4, 2, 1, (3, 129)),  # an even kernel, no padding
        (3, 1, 3, 1, (7, 20)),  # a K axis shorter than one step
    ],
)
@pytest.mark.parametrize("epilogue", ["plain", "residual-relu-handoff"])
def test_dense_convs_with_few_outputs_fold_their_tap_columns(
    cin: int, cout: int, k: int, dilation: int, size: tuple[int, int], epilogue: str
) -> None:
    """O * KW <= 16: each tap column is a tile row of its own, shifted into place per output row."""
    lib = _amx()
    g = torch.Generator().manual_seed(cin + cout + k)
    w, x, b = torch.randn(cout, cin, k, k, generator=g), torch.randn(2, cin, *size, generator=g), torch.randn(cout)
    padding = dilation * (k - 1) // 2
    ref = _reference(w, x, b, padding=padding, dilation=dilation)
    kwargs: dict[str, object] = {}
    if epilogue != "plain":
        res = torch.randn(ref.shape, generator=g).to(torch.bfloat16)
        ref = F.relu(0.5 * ref + res.float())
        kwargs = {"residual": res, "res_scale": 0.5, "relu": True, "half_pad": (1, 1)}
    out, on_amx = _runs_on_amx(
        lib, functools.partial(_conv16, w, x, b, padding=padding, dilation=dilation, **kwargs)
    )
    assert on_amx
    _close(out, ref)
    if epilogue != "plain":
        shadow = half_shadow(out, torch.bfloat16)
        assert shadow is not None
        assert torch.equal(shadow, _round(out).to(torch.bfloat16))


@pytest.mark.parametrize(
    ("w", "stride"),
    [
        (nm_weight((32, 64, 3, 3), 2, 32), 1),  # per-channel masks: a block's K axis would be nearly dense
        (_coarse((16, 64, 3, 3), 2, 32), 2),  # stride 2
    ],
)
def test_other_convs_stay_on_the_vector_path(w: torch.Tensor, stride: int) -> None:
    lib = _amx()
    x = torch.randn(1, 64, 9, 40)
    out, on_amx = _runs_on_amx(lib, functools.partial(_conv16, w, x, None, stride=stride))
    assert not on_amx
    _close(out, _reference(w, x, None, padding=1, stride=stride))


def test_the_switch_turns_it_off_and_both_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = _amx()
    w, x = _coarse((32, 64, 3, 3), 4, 32), torch.randn(1, 64, 12, 70)
    on, was_amx = _runs_on_amx(lib, functools.partial(_conv16, w, x, None))
    monkeypatch.setenv("NMRESTORE_DISABLE_AMX", "1")
    assert not lib.has_amx
    off, still_amx = _runs_on_amx(lib, functools.partial(_conv16, w, x, None))
    assert was_amx and not still_amx
    _close(on, off.float())


@pytest.mark.parametrize("res_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
def test_epilogue_residual_scale_relu_and_hand_offs(res_dtype: torch.dtype, relu: bool) -> None:
    lib = _amx()
    w, x, b = _coarse((32, 32, 3, 3), 2, 32), torch.randn(1, 32, 10, 70), torch.randn(32)
    res = torch.randn(1, 32, 10, 70).to(res_dtype)
    ref = 0.5 * _reference(w, x, b, padding=1) + res.float()
    ref = F.relu(ref) if relu else ref
    out = _conv16(w, x, b, residual=res, res_scale=0.5, relu=relu, half_pad=(1, 1))
    _close(out, ref)
    shadow = half_shadow(out, torch.bfloat16)
    assert shadow is not None
    _close(shadow.float(), _round(ref), rtol=1e-2)
    only, on_amx = _runs_on_amx(
        lib, functools.partial(_conv16, w, x, b, residual=res, res_scale=0.5, relu=relu, half_pad=(1, 1), half_only=True)
    )
    assert on_amx and only.dtype == torch.bfloat16
    assert torch.equal(only, shadow)


def test_a_nonfinite_input_reaches_only_the_blocks_that_read_it() -> None:
    """A block with fewer kept positions than the one before pads its K axis; those rows must not
    keep the previous block's inputs (0 * inf is nan)."""
    lib = _amx()
    w = torch.zeros(32, 32, 1, 1)
    w[:16, :, 0, 0] = torch.randn(16, 32)  # block 0 reads every channel (32 positions)
    w[16:, 1:3, 0, 0] = torch.randn(16, 2)  # block 1 reads channels 1 and 2 only (1 pair, 31 padded rows)
    x = torch.randn(1, 32, 4, 64)
    x[0, 20, 2, 5] = float("inf")
    out, on_amx = _runs_on_amx(lib, functools.partial(_conv16, w, x, None, padding=0))
    assert on_amx
    assert not torch.isfinite(out[0, :16, 2, 5]).all()
    assert torch.isfinite(out[0, 16:]).all()
    _close(out[0, 16:], _reference(w, torch.nan_to_num(x, posinf=0.0), None)[0, 16:])


@settings(max_examples=25, deadline=None)
@given(
    blocks=st.integers(1, 3),
    cin=st.sampled_from([16, 32, 48]),
    size=st.tuples(st.integers(1, 20), st.integers(1, 140)),
    k=st.sampled_from([1, 3]),
    nm_=st.sampled_from([(1, 8), (2, 8), (2, 4), (4, 16)]),
    seed=st.integers(0, 2**16),
)
def test_amx_property_random_shapes(
    blocks: int, cin: int, size: tuple[int, int], k: int, nm_: tuple[int, int], seed: int
) -> None:
    _amx()
    w = _coarse((16 * blocks, cin, k, k), *nm_, seed=seed)
    x = torch.randn(1, cin, *size, generator=torch.Generator().manual_seed(seed))
    _close(_conv16(w, x, None, padding=k // 2), _reference(w, x, None, padding=k // 2))


def test_the_vector_path_reads_a_bf16_residual() -> None:
    lib = half_kernel(torch.bfloat16)
    w, x = nm_weight((16, 32, 3, 3), 2, 32), torch.randn(1, 32, 9, 70)
    res = torch.randn(1, 16, 9, 70).to(torch.bfloat16)
    before = lib.amx_convs()
    out = _conv16(w, x, None, residual=res, res_scale=2.0)
    assert lib.amx_convs() == before
    _close(out, 2.0 * _reference(w, x, None, padding=1) + res.float())


@pytest.mark.parametrize("r", [2, 4])
@pytest.mark.parametrize("relu", [False, True])
def test_a_fused_pixel_shuffle_runs_on_amx(r: int, relu: bool) -> None:
    lib = _amx()
    w, x, b = _coarse((64, 32, 3, 3), 4, 32), torch.randn(1, 32, 5, 70), torch.randn(64)
    ref = F.pixel_shuffle(_reference(w, x, b, padding=1), r)
    ref = F.relu(ref) if relu else ref
    out, on_amx = _runs_on_amx(lib, functools.partial(_conv16, w, x, b, shuffle=r, relu=relu, half_pad=(1, 1)))
    assert on_amx
    _close(out, ref)
    shadow = half_shadow(out, torch.bfloat16)
    assert shadow is not None and torch.equal(shadow, _round(out).to(torch.bfloat16))


def _handoff(lib: KernelLibrary, x: torch.Tensor) -> torch.Tensor:
    """``x`` as a bf16 hand-off view (what a bf16 conv before a block writes)."""
    c = x.shape[1]
    eye = torch.zeros(c, c, 1, 1)
    eye[torch.arange(c), torch.arange(c)] = 1.0
    return _conv16(eye, x, None, padding=0, half_pad=(1, 1), half_only=True)


@pytest.mark.parametrize(("n", "m"), [(2, 32), (4, 32)])
# one band, a partial band, several; bands of several steps (the head conv's last rows copied)
@pytest.mark.parametrize("size", [(5, 20), (17, 70), (33, 130), (200, 20)])
@pytest.mark.parametrize(("relu1", "post_relu", "scale"), [(True, False, 1.0), (False, True, 0.5)])
def test_a_fused_block_equals_its_two_convs(
    n: int, m: int, size: tuple[int, int], relu1: bool, post_relu: bool, scale: float
) -> None:
    lib = _amx()
    w1, w2 = _coarse((32, 32, 3, 3), n, m, seed=1), _coarse((32, 32, 3, 3), n, m, seed=2)
    b1, b2 = torch.randn(32), torch.randn(32)
    x = _handoff(lib, torch.randn(2, 32, *size))
    t = _conv16(w1, x, b1, relu=relu1, half_pad=(1, 1), half_only=True)
    two = _conv16(w2, t, b2, residual=x, res_scale=scale, relu=post_relu, half_pad=(1, 1), half_only=True)
    first = (csr_from_dense(w1), csr_from_dense(w1).values.bfloat16(), b1, relu1)
    second = (csr_from_dense(w2), csr_from_dense(w2).values.bfloat16(), b2)
    before = lib.amx_convs()
    fused = lib.block_bf16(x, first, second, res_scale=scale, relu=post_relu)
    assert fused is not None and lib.amx_convs() == before + 2
    assert torch.equal(fused, two)  # the same products and sums, only t never left the cache
    with_f32 = lib.block_bf16(x, first, second, res_scale=scale, relu=post_relu, half_only=False)
    assert with_f32 is not None and with_f32.dtype == torch.float32
    shadow = half_shadow(with_f32, torch.bfloat16)
    assert shadow is not None and torch.equal(shadow, two) and torch.equal(with_f32.bfloat16(), two)


def test_a_block_that_does_not_qualify_is_left_to_the_two_convs(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = _amx()
    coarse = (csr_from_dense(_coarse((32, 32, 3, 3), 2, 32)), None, None)
    per_channel = csr_from_dense(nm_weight((32, 32, 3, 3), 2, 32))
    x = _handoff(lib, torch.randn(1, 32, 9, 40))
    ops = (coarse[0], coarse[0].values.bfloat16(), None)
    assert lib.block_bf16(x, (per_channel, per_channel.values.bfloat16(), None, True), ops) is None
    assert lib.block_bf16(x.float(), (*ops, True), ops) is None  # not a bf16 hand-off
    monkeypatch.setenv("NMRESTORE_DISABLE_AMX", "1")
    assert lib.block_bf16(x, (*ops, True), ops) is None


def _coarse_edsr() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("edsr_small", scale=2, n_feats=32, n_blocks=3)
    sparsify_(model, NMConfig(n=4, m=32, out_block=16))
    return model.eval()


def test_the_bf16_engine_runs_residual_blocks_as_one_amx_call(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = _amx()
    model = _coarse_edsr()
    reference = squash_(copy.deepcopy(model))
    engine = compile_sparse(model, EngineConfig(precision="bf16", tactic="sparse"))
    x = torch.rand(1, 3, 20, 70)
    fused, apart, calls = fused_and_apart(monkeypatch, engine, x, FusedResidual, "_amx_block")
    assert calls == [True, True, True]  # every block after the first forward
    with torch.no_grad():
        ref = reference(x)
    assert torch.equal(fused, apart)  # the same arithmetic, the intermediate kept in L2
    assert float((fused - ref).abs().max()) <= 2e-2
    assert lib.amx_convs() > 0


def test_a_fused_block_reads_an_f32_input_through_its_bf16_shadow() -> None:
    """EDSR's first block: its input is the first conv's f32 output (the long skip reads it too),
    with a bf16 hand-off shadow; conv1 reads the shadow, the skip adds the f32 values."""
    lib = _amx()
    w1, w2 = _coarse((32, 32, 3, 3), 2, 32, seed=3), _coarse((32, 32, 3, 3), 2, 32, seed=4)
    eye = torch.zeros(32, 32, 1, 1)
    eye[torch.arange(32), torch.arange(32)] = 1.0
    x = _conv16(eye, torch.randn(1, 32, 9, 70), None, padding=0, out_pad=(1, 1), half_pad=(1, 1))
    assert x.dtype == torch.float32 and half_shadow(x, torch.bfloat16) is not None
    c1, c2 = csr_from_dense(w1), csr_from_dense(w2)
    t = _conv16(w1, x, None, relu=True, half_pad=(1, 1), half_only=True)
    two = _conv16(w2, t, None, residual=x, half_pad=(1, 1), half_only=True)
    fused = lib.block_bf16(x, (c1, c1.values.bfloat16(), None, True), (c2, c2.values.bfloat16(), None))
    assert fused is not None and torch.equal(fused, two)
