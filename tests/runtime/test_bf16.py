"""The bf16 kernel against a bf16 reference, its hand-off forms, the fallback without it, and the
engine's precision setting (which tactics it times, which it picks, what it gives)."""

from __future__ import annotations

import copy
import functools
import json
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
from nmrestore.runtime.engine import bf16_allowed
from nmrestore.runtime.kernel import half_shadow, handoff_layout
from nmrestore.runtime.layers import Extra, RouteWeights, SparseLayer
from nmrestore.sparsity import NMConfig, sparsify_, squash_
from tests.runtime.kernel_helpers import half_conv, half_kernel, kernel, nm_weight

NMS = [(2, 4), (8, 32), (4, 32), (2, 32)]


def _round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _reference(w: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None, **conv: int) -> torch.Tensor:
    """What the bf16 kernel computes: bf16-rounded weights and activations, f32 accumulation."""
    return F.conv2d(_round(x), _round(w), b, **conv)


_conv16 = functools.partial(half_conv, half=torch.bfloat16)
_bf16_kernel = functools.partial(half_kernel, torch.bfloat16)


def _close(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal up to f32 summation order: products are exact, only the order of the adds differs."""
    assert out.shape == ref.shape
    err = float((out.float() - ref).abs().max())
    assert err <= rtol * (1.0 + float(ref.abs().max())), err


@pytest.mark.parametrize(("n", "m"), NMS)
@pytest.mark.parametrize("size", [(7, 5), (9, 70), (4, 33)])  # narrower and wider than a tile, odd
def test_bf16_kernel_matches_the_bf16_reference(n: int, m: int, size: tuple[int, int]) -> None:
    w = nm_weight((16, 32, 3, 3), n, m, seed=n + m)
    x, b = torch.randn(2, 32, *size), torch.randn(16)
    _close(_conv16(w, x, b), _reference(w, x, b, padding=1))


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 2])
def test_bf16_kernel_geometry(k: int, stride: int, padding: int) -> None:
    w = nm_weight((6, 8, k, k), 2, 4)
    x = torch.rand(2, 8, 11, 13)
    _close(_conv16(w, x, None, stride, padding), _reference(w, x, None, stride=stride, padding=padding))


def test_bf16_kernel_dilation_groups_odd_channel_counts() -> None:
    x = torch.randn(1, 8, 12, 10)
    w = nm_weight((5, 8, 3, 3), 2, 4)  # 5 outputs: an odd count of everything
    _close(_conv16(w, x, None, 1, 2, dilation=2), _reference(w, x, None, padding=2, dilation=2))
    wg = nm_weight((8, 4, 3, 3), 1, 4)  # two groups of 4 input channels
    _close(_conv16(wg, x, None, groups=2), _reference(wg, x, None, padding=1, groups=2))
    w3, b3 = nm_weight((4, 8, 3, 3), 3, 8), torch.randn(4)  # an odd number of kept weights per channel
    _close(_conv16(w3, x, b3), _reference(w3, x, b3, padding=1))


@pytest.mark.parametrize("relu", [False, True])
def test_bf16_kernel_epilogue_residual_relu_and_shuffle(relu: bool) -> None:
    w, b = nm_weight((8, 8, 3, 3), 2, 8), torch.randn(8)
    x, res = torch.randn(2, 8, 6, 70), torch.randn(2, 8, 6, 70)
    ref = res + 0.1 * _reference(w, x, b, padding=1)
    _close(_conv16(w, x, b, relu=relu, residual=res, res_scale=0.1), F.relu(ref) if relu else ref)
    ws = nm_weight((32, 8, 3, 3), 2, 8)
    ref = F.pixel_shuffle(_reference(ws, x, None, padding=1), 2)
    ref = F.relu(ref) if relu else ref
    out = _conv16(ws, x, None, relu=relu, shuffle=2, half_pad=(1, 1))  # with a bf16 copy of the HR output
    _close(out, ref)
    shadow = half_shadow(out)
    assert shadow is not None and torch.equal(shadow, out.to(torch.bfloat16))


def test_bf16_handoff_only_and_shadow_forms() -> None:
    w1, w2 = nm_weight((16, 8, 3, 3), 2, 8, 1, scale=0.3), nm_weight((16, 16, 3, 3), 1, 8, 2, scale=0.3)
    x = torch.randn(2, 8, 9, 70)
    h = _conv16(w1, x, None, relu=True, half_pad=(1, 1), half_only=True)  # the fused block's head
    assert h.dtype == torch.bfloat16 and handoff_layout(h) is not None
    ref_h = F.relu(_reference(w1, x, None, padding=1))
    assert (h.float() - ref_h).abs().max() <= 2**-7 * (1 + ref_h.abs().max())  # one bf16 rounding
    res = torch.randn(2, 16, 9, 70)
    y = _conv16(w2, h, None, residual=res, res_scale=0.5, out_pad=(1, 1), half_pad=(1, 1))  # read in place
    ref_y = res + 0.5 * _reference(w2, h.float(), None, padding=1)
    _close(y, ref_y)
    shadow = half_shadow(y)
    assert y.dtype == torch.float32 and shadow is not None and torch.equal(shadow, y.to(torch.bfloat16))
    _close(_conv16(w2, y, None), _reference(w2, y, None, padding=1))  # a consumer reads the shadow
    y.mul_(2)  # modified in place: the copy is stale and must not be read
    assert half_shadow(y) is None
    _close(_conv16(w2, y, None), _reference(w2, y, None, padding=1))


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
def test_bf16_kernel_property_random_shapes(
    nm: tuple[int, int], out_ch: int, groups: int, h: int, w: int, k: int, stride: int, pad: int
) -> None:
    n, m = nm
    groups = 1 if m == 32 else min(groups, 2)  # M divides the per-group input channels
    weight = nm_weight((out_ch * groups, 32 // groups if m == 32 else 8, k, k), n, m if m == 32 else 4)
    if h + 2 * pad < k or w + 2 * pad < k:
        return
    x = torch.randn(1, weight.shape[1] * groups, h, w)
    ref = _reference(weight, x, None, stride=stride, padding=pad, groups=groups)
    _close(_conv16(weight, x, None, stride, pad, groups=groups), ref)


def test_without_bf16_the_build_falls_back_to_f32(fresh_kernel: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fresh_kernel.setenv("NMRESTORE_DISABLE_BF16", "1")
    fresh_kernel.setenv("NMRESTORE_KERNEL_CACHE", str(tmp_path / "cache"))
    lib = load_kernel()
    assert lib is not None and not lib.has_bf16
    status = kernel_status()
    assert not status.bf16 and "NMRESTORE_DISABLE_BF16" in status.bf16_reason
    assert kernel_module.NO_BF16_FLAG in status.flags and "no bf16 kernels" in status.summary()
    csr = csr_from_dense(nm_weight((4, 8, 3, 3), 2, 4))
    with pytest.raises(RuntimeError, match="no bf16 kernels"):
        lib.conv2d(torch.rand(1, 8, 5, 5), csr.rowptr, csr.cin, csr.kpos, csr.values.bfloat16(), None, 4,
                   (3, 3), (1, 1), (1, 1), (1, 1))  # fmt: skip
    model = _edsr()
    engine = compile_sparse(model, EngineConfig(precision="bf16", tactic="sparse"))
    x = torch.rand(1, 3, 9, 11)
    with torch.no_grad():
        out = engine(x)
        assert (out - squash_(copy.deepcopy(model))(x)).abs().max() <= 3e-2  # first/last conv in bf16
    choices = {d.layer: d.choice for d in engine_state(engine).table()}  # type: ignore[union-attr]
    assert choices["body.0.body.0"] == "sparse" and "sparse_bf16" not in choices.values()


def test_a_cpu_without_avx512_bf16_never_compiles_them(
    fresh_kernel: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fresh_kernel.setattr(kernel_module, "cpu_features", lambda: {"avx512_bf16": False})
    fresh_kernel.setenv("NMRESTORE_KERNEL_CACHE", str(tmp_path / "cache"))
    assert kernel_module.bf16_build_reason() == "the CPU has no avx512_bf16"
    lib = load_kernel()
    assert lib is not None and not lib.has_bf16 and kernel_module.NO_BF16_FLAG in kernel_status().flags


def test_auto_precision_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from nmrestore.runtime import engine as engine_module

    monkeypatch.setattr(engine_module, "cpu_features", lambda: {"avx512_bf16": False, "amx_bf16": False})
    assert not bf16_allowed("auto") and bf16_allowed("bf16") and not bf16_allowed("f32")
    monkeypatch.setattr(engine_module, "cpu_features", lambda: {"avx512_bf16": False, "amx_bf16": True})
    assert bf16_allowed("auto")


def _edsr(n: int = 4, m: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("edsr_small", scale=2, n_feats=32, n_blocks=2)
    sparsify_(model, NMConfig(n=n, m=m))
    return model.eval()


@pytest.mark.parametrize("winner", ["dense", "dense_bf16", "sparse", "sparse_bf16"])
def test_the_tactic_choice_picks_the_fastest_of_all_four(
    winner: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _bf16_kernel()
    timed: list[list[str]] = []

    def fake(
        self: SparseLayer, x: torch.Tensor, rw: RouteWeights, cands: list[str], repeats: int, extra: Extra
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:  # made-up timings: `winner` is fastest
        timed.append(list(cands))
        outputs = {c: self._run_tactic_plain(c, x, rw, extra) for c in cands}
        return outputs, {c: (1.0 if c == winner else 2.0 + len(c)) for c in cands}

    monkeypatch.setattr(SparseLayer, "_time_all", fake)
    model = _edsr()
    cache = tmp_path / "tactics.json"
    # dense_convs off: the first/last convs are wrapped only to choose dense f32 or dense bf16
    config = EngineConfig(precision="bf16", timing_repeats=1, cache_file=cache, refine=False, dense_convs=False)
    engine = compile_sparse(model, config)
    x = torch.rand(1, 3, 9, 11)
    with torch.no_grad():
        first, again = engine(x), engine(x)  # the second forward runs the bf16 hand-off pairs
    # the second forward hands bf16 between the blocks (their skip sums too): bf16 rounding apart
    assert torch.allclose(first, again, atol=2e-3)
    table = engine_state(engine).table()  # type: ignore[union-attr]
    body = [d for d in table if d.nm == "4:32"]
    assert {c for cands in timed for c in cands} == {"dense", "dense_bf16", "sparse", "sparse_bf16"}
    assert body and all(d.choice == winner for d in body), format_decisions(table)
    assert {d.layer for d in table if d.nm == "-"} >= {
        "head.0",
        "tail.1",
    }  # first/last conv: dense f32 or bf16
    assert all(d.choice in ("dense", "dense_bf16") for d in table if d.nm == "-")
    reference = squash_(copy.deepcopy(model))(x)
    assert (first - reference).abs().max() <= (1e-4 if winner in ("dense", "sparse") else 3e-2)
    assert json.loads(cache.read_text())["format"] == "nmrestore-tactics-2"
    second = compile_sparse(model, config)
    with torch.no_grad():
        second(x)
    assert {d.reason for d in engine_state(second).table()} == {"reused"}  # type: ignore[union-attr]


def test_a_whole_model_plan_overrides_a_greedy_mix(monkeypatch: pytest.MonkeyPatch) -> None:
    _bf16_kernel()
    from nmrestore.runtime import plans
    from nmrestore.runtime.timing import Timings

    def fake_layer_times(
        self: SparseLayer, x: torch.Tensor, rw: RouteWeights, cands: list[str], repeats: int, extra: Extra
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:  # greedy: the bf16 kernel everywhere
        outputs = {c: self._run_tactic_plain(c, x, rw, extra) for c in cands}
        return outputs, {c: {"sparse_bf16": 1.0, "dense_bf16": 2.0}.get(c, 3.0) for c in cands}

    seen: list[str] = []

    def fake_interleaved(runs: dict, rounds: int, warmup: int = 1) -> Timings:  # type: ignore[type-arg]
        seen.extend(runs)
        for run in runs.values():
            run()  # every plan really runs
        return Timings({k: [1.0 if k == "bf16 dense" else 2.0] for k in runs})

    monkeypatch.setattr(SparseLayer, "_time_all", fake_layer_times)
    monkeypatch.setattr(plans, "interleaved", fake_interleaved)
    model = _edsr()
    engine = compile_sparse(model, EngineConfig(precision="bf16", timing_repeats=1))
    x = torch.rand(1, 3, 9, 11)
    with torch.no_grad():
        outs = [engine(x) for _ in range(3)]
    state = engine_state(engine)
    assert state is not None and state.plans == ["bf16 dense"]
    # identical plans are timed once: "f32" (a tie goes to dense) is "f32 dense", "bf16" is "bf16 kernel"
    assert set(seen) == {"per-layer", "f32", "f32 kernel", "bf16 dense"}
    body = [d for d in state.table() if d.nm == "4:32"]
    assert all(d.choice == "dense_bf16" and "whole-model plan 'bf16 dense'" in d.reason for d in body)
    assert torch.equal(outs[1], outs[2])  # decided once per shape: no further timing
    assert (outs[2] - squash_(copy.deepcopy(model))(x)).abs().max() <= 3e-2


def test_forced_tactics_at_bf16_and_the_fused_block_hand_off() -> None:
    _bf16_kernel()
    model = _edsr(2, 32)
    reference = squash_(copy.deepcopy(model))
    x = torch.rand(1, 3, 10, 70)
    for tactic, expect in (("sparse", "sparse_bf16"), ("dense", "dense_bf16")):
        engine = compile_sparse(model, EngineConfig(precision="bf16", tactic=tactic))  # type: ignore[arg-type]
        with torch.no_grad():
            outs = [engine(x) for _ in range(3)]
        ref = reference(x)
        for out in outs:
            assert (out - ref).abs().max() <= 3e-2 and (out - ref).abs().mean() <= 2e-3
        assert torch.equal(outs[1], outs[2])
        choices = {d.layer: d.choice for d in engine_state(engine).table()}  # type: ignore[union-attr]
        # the forced tactic applies to the dense first conv on the kernel too (dense_convs)
        assert choices["body.0.body.0"] == expect and choices["head.0"] == expect
    engine = compile_sparse(model, EngineConfig(precision="bf16", tactic="sparse"))
    conv1 = engine.body[0].head[0]  # type: ignore[index]
    with torch.no_grad():
        engine(x), engine(x)
        assert conv1.half_sole and conv1.half_pad == (1, 1)
        h = conv1(torch.rand(1, 32, 10, 70))
        assert h.dtype == torch.bfloat16 and handoff_layout(h) is not None  # a bf16-only hand-off now
    engine = compile_sparse(model, EngineConfig(precision="bf16", tactic="dense"))
    conv1 = engine.body[0].head[0]  # type: ignore[index]
    with torch.no_grad():
        engine(x), engine(x)
        h = conv1(torch.rand(1, 32, 10, 70))
    assert (
        conv1.bf16_cl_out and h.dtype == torch.bfloat16 and h.is_contiguous(memory_format=torch.channels_last)
    )


def test_f32_engines_keep_the_old_cache_format_readable(tmp_path: Path) -> None:
    kernel()
    model = _edsr()
    cache = tmp_path / "old.json"
    engine = compile_sparse(model, EngineConfig(timing_repeats=1, cache_file=cache))
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        engine(x)
    timings = json.loads(cache.read_text())["timings"]
    old = {k: [v["dense"], v["sparse"]] for k, v in timings.items()}  # as format 1 wrote them
    cache.write_text(json.dumps({"format": "nmrestore-tactics-1", "timings": old}))
    # refine off: a whole-model plan may override reused choices (its reason says so)
    second = compile_sparse(model, EngineConfig(timing_repeats=1, cache_file=cache, refine=False))
    with torch.no_grad():
        second(x)
    state = engine_state(second)
    assert state is not None and {d.reason for d in state.table() if d.nm == "4:32"} == {"reused"}
    assert state.cached_timing(next(iter(state.timings)).split("|", 1)[1]) is not None
