"""The fp16 kernel (AVX512-FP16) against an fp16 reference with a proven error bound, its hand-off
and residual forms, the fallback without it, and the engine's ``precision="fp16"``."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nmrestore.models import create_model
from nmrestore.runtime import (
    EngineConfig,
    compile_sparse,
    csr_from_dense,
    engine_state,
    format_decisions,
    kernel_status,
    load_kernel,
)
from nmrestore.runtime import kernel as kernel_module
from nmrestore.runtime.engine import f16_allowed
from nmrestore.runtime.kernel import half_shadow, handoff_layout
from nmrestore.runtime.layers import SparseConv2d
from nmrestore.sparsity import NMConfig, sparsify_, squash_
from tests.runtime.kernel_helpers import half_conv, half_kernel, kernel, nm_weight

NMS = [(2, 4), (8, 32), (4, 32), (2, 32)]
U = 2.0**-11  # fp16 unit roundoff


def _round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).double()


_conv16 = functools.partial(half_conv, half=torch.float16)
_f16_kernel = functools.partial(half_kernel, torch.float16)


def _check(out: torch.Tensor, w: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None, **conv: int) -> None:
    """``out`` within the worst-case bound of fp16 summation of the fp16-rounded products:
    |fl(sum) - sum| <= gamma_n * sum |terms|, n = kept weights per output + the bias + the output
    rounding (each kernel path is a tree of fp16 adds of depth at most n)."""
    xr, wr = _round(x), _round(w)
    ref = F.conv2d(xr, wr, None if b is None else b.double(), **conv)
    mags = F.conv2d(xr.abs(), wr.abs(), None if b is None else b.double().abs(), **conv)
    n = int((w != 0).flatten(1).sum(1).max()) + 2
    bound = n * U / (1 - n * U) * mags + U * ref.abs() + 1e-6
    assert out.shape == ref.shape
    excess = (out.double() - ref).abs() - bound
    assert float(excess.max()) <= 0, float(excess.max())


@pytest.mark.parametrize(("n", "m"), NMS)
@pytest.mark.parametrize("channels", [32, 64, 96])  # 64 and 96 at low density: split by input blocks
@pytest.mark.parametrize("size", [(7, 5), (9, 70), (4, 33)])  # narrower and wider than a tile, odd
def test_fp16_kernel_within_the_fp16_summation_bound(n: int, m: int, channels: int, size: tuple[int, int]) -> None:
    w = nm_weight((16, channels, 3, 3), n, m, seed=n + m)
    x, b = torch.randn(2, channels, *size), torch.randn(16)
    _check(_conv16(w, x, b), w, x, b, padding=1)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 2])
def test_fp16_kernel_geometry(k: int, stride: int, padding: int) -> None:
    w = nm_weight((6, 8, k, k), 2, 4)
    x = torch.rand(2, 8, 11, 13)
    _check(_conv16(w, x, None, stride, padding), w, x, None, stride=stride, padding=padding)


def test_fp16_kernel_dilation_groups_odd_counts() -> None:
    x = torch.randn(1, 8, 12, 10)
    w = nm_weight((5, 8, 3, 3), 2, 4)
    _check(_conv16(w, x, None, 1, 2, dilation=2), w, x, None, padding=2, dilation=2)
    wg = nm_weight((8, 4, 3, 3), 1, 4)
    _check(_conv16(wg, x, None, groups=2), wg, x, None, padding=1, groups=2)
    w3, b3 = nm_weight((4, 8, 3, 3), 3, 8), torch.randn(4)  # an odd number of kept weights per channel
    _check(_conv16(w3, x, b3), w3, x, b3, padding=1)


@pytest.mark.parametrize("out_ch", [2, 3, 5, 8])
def test_fp16_kernel_channels_sharing_positions_run_in_groups(out_ch: int) -> None:
    """Dense convs and masks shared by blocks of 4 output channels take the grouped path (one load for
    up to four channels' FMAs); the results stay within the same bound."""
    x, b = torch.randn(2, 64, 6, 70), torch.randn(out_ch)
    dense = torch.randn(out_ch, 64, 3, 3)
    _check(_conv16(dense, x, b), dense, x, b, padding=1)
    shared = nm_weight((1, 64, 3, 3), 2, 32, seed=3) != 0  # one mask for every channel
    coarse = torch.randn(out_ch, 64, 3, 3) * shared
    res = torch.randn(2, out_ch, 6, 70).half()
    out = _conv16(coarse, x, None, residual=res, relu=True)
    ref = F.relu(res.double() + F.conv2d(_round(x), _round(coarse), padding=1))
    assert float((out.double() - ref).abs().max()) <= 40 * U * (1 + float(ref.abs().max()))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("res_dtype", [torch.float32, torch.float16])
def test_fp16_kernel_residual_of_either_dtype(relu: bool, res_dtype: torch.dtype) -> None:
    w, b = nm_weight((8, 64, 3, 3), 2, 32), torch.randn(8)
    x, res = torch.randn(2, 64, 6, 70), torch.randn(2, 8, 6, 70).to(res_dtype)
    out = _conv16(w, x, b, relu=relu, residual=res, res_scale=0.1)
    ref = res.double() + 0.1 * F.conv2d(_round(x), _round(w), b.double(), padding=1)
    ref = F.relu(ref) if relu else ref
    mags = res.double().abs() + 0.1 * F.conv2d(_round(x).abs(), _round(w).abs(), b.double().abs(), padding=1)
    assert out.dtype == torch.float32
    assert float(((out.double() - ref).abs() - 40 * U * mags).max()) <= 1e-6


def test_fp16_shuffle_and_hand_off_forms() -> None:
    x = torch.randn(2, 8, 6, 70)
    ws = nm_weight((32, 8, 3, 3), 2, 8)
    out = _conv16(ws, x, None, relu=True, shuffle=2, half_pad=(1, 1))  # with an fp16 copy of the HR output
    ref = F.relu(F.pixel_shuffle(F.conv2d(_round(x), _round(ws), padding=1), 2))
    assert (out.double() - ref).abs().max() <= 20 * U * (1 + ref.abs().max())
    shadow = half_shadow(out, torch.float16)
    assert shadow is not None and torch.equal(shadow, out.to(torch.float16))
    assert half_shadow(out, torch.bfloat16) is None  # a bf16 consumer does not take it

    w1, w2 = nm_weight((16, 8, 3, 3), 2, 8, 1, scale=0.3), nm_weight((16, 16, 3, 3), 1, 8, 2, scale=0.3)
    h = _conv16(w1, x, None, relu=True, half_pad=(1, 1), half_only=True)  # a fused block's head
    assert h.dtype == torch.float16 and handoff_layout(h) is not None
    res = _conv16(w2, h, None, half_pad=(1, 1), half_only=True)  # fp16 in place, fp16 out
    y = _conv16(w2, h, None, residual=res, res_scale=0.5, half_pad=(1, 1), half_only=True)  # fp16 residual
    assert y.dtype == torch.float16
    ref_y = res.double() + 0.5 * F.conv2d(h.double(), _round(w2), padding=1)
    assert (y.double() - ref_y).abs().max() <= 20 * U * (1 + ref_y.abs().max())


@settings(max_examples=12, deadline=None)
@given(
    nm=st.sampled_from(NMS),
    out_ch=st.integers(1, 9),
    groups=st.integers(1, 8),
    h=st.integers(1, 12),
    w=st.integers(1, 80),
    k=st.sampled_from([1, 3]),
    stride=st.integers(1, 2),
    pad=st.integers(0, 2),
)
def test_fp16_kernel_property_random_shapes(
    nm: tuple[int, int], out_ch: int, groups: int, h: int, w: int, k: int, stride: int, pad: int
) -> None:
    n, m = nm
    groups = 1 if m == 32 else min(groups, 2)
    weight = nm_weight((out_ch * groups, 64 // groups if m == 32 else 8, k, k), n, m if m == 32 else 4)
    if h + 2 * pad < k or w + 2 * pad < k:
        return
    x = torch.randn(1, weight.shape[1] * groups, h, w)
    _check(_conv16(weight, x, None, stride, pad, groups=groups), weight, x, None, stride=stride, padding=pad,
           groups=groups)  # fmt: skip


def _edsr(n: int = 2, m: int = 32, feats: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("edsr_small", scale=2, n_feats=feats, n_blocks=3)
    sparsify_(model, NMConfig(n=n, m=m))
    return model.eval()


def test_without_fp16_the_build_falls_back(fresh_kernel: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fresh_kernel.setenv("NMRESTORE_DISABLE_FP16", "1")
    fresh_kernel.setenv("NMRESTORE_KERNEL_CACHE", str(tmp_path / "cache"))
    lib = load_kernel()
    assert lib is not None and not lib.has_f16
    status = kernel_status()
    assert not status.f16 and "NMRESTORE_DISABLE_FP16" in status.f16_reason
    assert kernel_module.NO_F16_FLAG in status.flags and "no fp16 kernels" in status.summary()
    csr = csr_from_dense(nm_weight((4, 8, 3, 3), 2, 4))
    with pytest.raises(RuntimeError, match="no fp16 kernels"):
        lib.conv2d(torch.rand(1, 8, 5, 5), csr.rowptr, csr.cin, csr.kpos, csr.values.half(), None, 4,
                   (3, 3), (1, 1), (1, 1), (1, 1))  # fmt: skip
    engine = compile_sparse(_edsr(), EngineConfig(precision="fp16", tactic="sparse"))
    with torch.no_grad():
        engine(torch.rand(1, 3, 9, 11))
    choices = {d.layer: d.choice for d in engine_state(engine).table()}  # type: ignore[union-attr]
    assert choices["body.0.body.0"] == "sparse" and "sparse_fp16" not in choices.values()


def test_a_cpu_without_avx512_fp16_never_compiles_them(fresh_kernel: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fresh_kernel.delenv("NMRESTORE_DISABLE_FP16", raising=False)  # the CPU's reason, not the switch's
    fresh_kernel.setattr(kernel_module, "cpu_features", lambda: {"avx512_bf16": True, "avx512_fp16": False})
    fresh_kernel.setenv("NMRESTORE_KERNEL_CACHE", str(tmp_path / "cache"))
    assert kernel_module.f16_build_reason() == "the CPU has no avx512_fp16"
    lib = load_kernel()
    assert lib is not None and not lib.has_f16 and kernel_module.NO_F16_FLAG in kernel_status().flags


def test_auto_precision_adds_fp16_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from nmrestore.runtime import engine as engine_module

    monkeypatch.setattr(engine_module, "cpu_features", lambda: {"avx512_fp16": False})
    assert not f16_allowed("auto") and f16_allowed("fp16") and not f16_allowed("bf16")
    monkeypatch.setattr(engine_module, "cpu_features", lambda: {"avx512_fp16": True})
    assert f16_allowed("auto")


def test_fp16_engine_chains_fp16_hand_offs_through_the_body() -> None:
    _f16_kernel()
    model = _edsr()
    reference = squash_(copy.deepcopy(model))
    x = torch.rand(1, 3, 10, 70)
    engine = compile_sparse(model, EngineConfig(precision="fp16", tactic="sparse"))
    with torch.no_grad():
        outs = [engine(x) for _ in range(3)]
        ref = reference(x)
    for out in outs:
        assert out.dtype == torch.float32 and (out - ref).abs().max() <= 1e-2
    assert torch.equal(outs[1], outs[2])
    choices = {d.layer: d.choice for d in engine_state(engine).table()}  # type: ignore[union-attr]
    assert choices["body.0.body.0"] == "sparse_fp16" and choices["tail.0.0"] == "sparse_fp16"
    blocks = [engine.body[i] for i in range(3)]  # type: ignore[index]
    # a block followed by a block or a sparse conv writes fp16 alone, and so does the body's last
    # conv, which adds the long skip (FusedLongSkip) and hands the sum to the tail alone, and the
    # first conv, whose output goes to the first block and to that sum, both of which read fp16
    assert all(b.last.half_chain for b in blocks) and engine.body[3].half_chain  # type: ignore[index]
    assert engine.tail[0][0].half_chain and engine.head[0].half_chain  # type: ignore[index]
    seen: list[torch.dtype] = []
    hooks = [
        blocks[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype)),
        engine.tail.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype)),  # type: ignore[union-attr]
    ]
    with torch.no_grad():
        assert torch.equal(engine(x), outs[2])
    for hook in hooks:
        hook.remove()
    # block 1 read block 0's fp16 hand-off (input and residual), the tail the trunk's sum
    assert seen == [torch.float16, torch.float16]


def test_bf16_engines_chain_bf16_block_outputs() -> None:
    lib = kernel()
    if not lib.has_bf16:
        pytest.skip("no bf16 kernels here")
    engine = compile_sparse(_edsr(), EngineConfig(precision="bf16", tactic="sparse"))
    seen: list[torch.dtype] = []
    engine.body[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))  # type: ignore[index]
    with torch.no_grad():
        for _ in range(2):
            engine(torch.rand(1, 3, 10, 70))
    assert seen[1:] == [torch.bfloat16]  # once decided, block 1 reads block 0's bf16 hand-off


def test_a_16_bit_engine_hands_the_heads_features_to_the_trunk_and_the_long_skip_in_16_bits() -> None:
    lib = kernel()
    if not lib.has_bf16:
        pytest.skip("no bf16 kernels here")
    model = _edsr()
    engine = compile_sparse(model, EngineConfig(precision="bf16", tactic="sparse"))
    residuals: list[torch.dtype] = []
    engine.body[3].register_forward_pre_hook(  # type: ignore[index]
        lambda mod, args, kwargs: residuals.append(kwargs["residual"].dtype), with_kwargs=True
    )
    inputs: list[torch.dtype] = []
    engine.body[0].register_forward_pre_hook(lambda mod, args: inputs.append(args[0].dtype))  # type: ignore[index]
    x = torch.rand(1, 3, 10, 70)
    with torch.no_grad():
        outs = [engine(x) for _ in range(2)]
        ref = squash_(copy.deepcopy(model))(x)
    # once decided, the head writes its features as a bf16 hand-off alone: the first block reads it
    # as its input and residual, the trunk's last conv as the long skip's residual
    assert residuals[-1] == torch.bfloat16 and inputs[-1] == torch.bfloat16
    assert (outs[-1] - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_fp16_is_not_chosen_where_it_overflows(monkeypatch: pytest.MonkeyPatch) -> None:
    _f16_kernel()
    model = _edsr()
    with torch.no_grad():
        model.head[0].weight.mul_(1e6)  # type: ignore[index]  # activations far past fp16's 65504
    engine = compile_sparse(model, EngineConfig(precision="fp16", timing_repeats=1, refine=False))
    x = torch.rand(1, 3, 10, 70)
    with torch.no_grad():
        out = engine(x)
        ref = squash_(copy.deepcopy(model))(x)
    assert bool(torch.isfinite(out).all()) and (out - ref).abs().max() <= 2e-2 * ref.abs().max()  # bf16-level
    table = engine_state(engine).table()  # type: ignore[union-attr]
    # the layers whose fp16 output overflowed on this input dropped it from their timed choices
    dropped = [d.layer for d in table if "sparse" in d.times_ms and "sparse_fp16" not in d.times_ms]
    assert "head.0" in dropped or "body.0.body.0" in dropped, format_decisions(table)


def test_hand_off_state_round_trips() -> None:
    _f16_kernel()
    engine = compile_sparse(_edsr(), EngineConfig(precision="fp16", tactic="sparse"))
    with torch.no_grad():
        engine(torch.rand(1, 3, 10, 70)), engine(torch.rand(1, 3, 10, 70))
    conv = engine.body[0].head[0]  # type: ignore[index]
    assert isinstance(conv, SparseConv2d)
    state = conv.handoff_state()
    assert state == (conv.out_pad, conv.half_pad, conv.bf16_cl_out) and conv.half_pad == (1, 1)
    conv.reset_handoff()
    assert conv.half_pad is None
    conv.set_handoff_state(state)
    assert conv.handoff_state() == state
