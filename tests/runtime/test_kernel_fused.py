"""The fused tail on AMX (:meth:`FusedCalls.tail_bf16`, csrc/nm_amx_tail.h): the upsampler conv with
its pixel shuffle and the dense last conv in one call equal the two convs run apart, on every band
and step layout; what does not qualify is left to the two convs; the engine takes it for EDSR, and a
profile times it whole."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from nmrestore.models import create_model
from nmrestore.runtime import EngineConfig, compile_sparse, csr_from_dense
from nmrestore.runtime.fusion import FusedTail
from nmrestore.runtime.kernel_fused import FusedConv
from nmrestore.runtime.speed import profile_modules
from nmrestore.sparsity import NMConfig, sparsify_, squash_
from tests.runtime.kernel_helpers import (
    amx_kernel,
    block_shared_weight,
    fused_and_apart,
    half_conv,
    nm_weight,
)

_conv16 = functools.partial(half_conv, half=torch.bfloat16)
_amx = amx_kernel
_coarse = block_shared_weight


def _handoff(x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    eye = torch.zeros(c, c, 1, 1)
    eye[torch.arange(c), torch.arange(c)] = 1.0
    return _conv16(eye, x, None, padding=0, half_pad=(1, 1), half_only=True)


def _fused(w: torch.Tensor, b: torch.Tensor | None, relu: bool = False) -> FusedConv:
    csr = csr_from_dense(w)
    k = (w.shape[2], w.shape[3])
    return FusedConv(csr, csr.values.bfloat16(), b, w.shape[0], k, (k[0] // 2, k[1] // 2), (1, 1), relu)


@pytest.mark.parametrize(("n", "m"), [(2, 32), (4, 32)])
# fewer rows than a step; steps and a partial one per band; several bands, a partial segment
@pytest.mark.parametrize("size", [(3, 20), (13, 70), (31, 130)])
@pytest.mark.parametrize(("r", "outs", "relu"), [(2, 3, False), (2, 5, True), (4, 3, False)])
def test_the_fused_tail_equals_its_two_convs(n: int, m: int, size: tuple[int, int], r: int, outs: int, relu: bool) -> None:
    lib = _amx()
    c2 = 16
    w_up, b_up = _coarse((c2 * r * r, 32, 3, 3), n, m, seed=1), torch.randn(c2 * r * r)
    w_last, b_last = torch.randn(outs, c2, 3, 3) * 0.1, torch.randn(outs)
    x = _handoff(torch.randn(2, 32, *size))
    hr = _conv16(w_up, x, b_up, relu=relu, shuffle=r, half_pad=(1, 1), half_only=True)
    two = _conv16(w_last, hr, b_last)
    before = lib.amx_convs()
    fused = lib.tail_bf16(x, _fused(w_up, b_up, relu), r, _fused(w_last, b_last))
    assert fused is not None and lib.amx_convs() == before + 2
    assert fused.dtype == torch.float32 and fused.shape == two.shape
    assert torch.equal(fused, two)  # the same products and sums, the shuffled rows kept in L2


@pytest.mark.parametrize(("n", "m"), [(2, 32), (4, 32)])
@pytest.mark.parametrize("size", [(3, 16), (13, 64), (31, 144)])  # widths of whole 16-pixel groups
@pytest.mark.parametrize(("outs", "relu"), [(3, False), (5, True)])
def test_at_x2_the_last_conv_reads_channel_pairs_straight_from_the_buffer(
    n: int, m: int, size: tuple[int, int], outs: int, relu: bool
) -> None:
    """32 and 64 high-resolution channels: the upsampler writes channel pairs interleaved and the last
    conv loads its B tiles without a gather (csrc/nm_amx_tail.h, NMK_TAIL_PAIRS); the sums match the
    two convs (another order of the same products)."""
    lib = _amx()
    for c2 in (32, 64):
        w_up, b_up = _coarse((c2 * 4, 32, 3, 3), n, m, seed=c2), torch.randn(c2 * 4)
        w_last, b_last = torch.randn(outs, c2, 3, 3) * 0.1, torch.randn(outs)
        x = _handoff(torch.randn(1, 32, *size))
        hr = _conv16(w_up, x, b_up, relu=relu, shuffle=2, half_pad=(1, 1), half_only=True)
        two = _conv16(w_last, hr, b_last)
        fused = lib.tail_bf16(x, _fused(w_up, b_up, relu), 2, _fused(w_last, b_last))
        assert fused is not None and fused.shape == two.shape
        assert (fused - two).abs().max() <= 1e-4 * max(1.0, float(two.abs().max()))


def test_a_tail_that_does_not_qualify_is_left_to_the_two_convs(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = _amx()
    x = _handoff(torch.randn(1, 32, 9, 40))
    up = _fused(_coarse((64, 32, 3, 3), 2, 32), None)
    last = _fused(torch.randn(3, 16, 3, 3), None)
    assert lib.tail_bf16(x, _fused(nm_weight((64, 32, 3, 3), 2, 32), None), 2, last) is None  # per-channel
    assert lib.tail_bf16(x, up, 2, _fused(torch.randn(6, 16, 3, 3), None)) is None  # 6 x 3 taps > 16 rows
    assert lib.tail_bf16(x, up, 2, _fused(torch.randn(3, 16, 5, 5), None)) is None  # not 3x3
    assert lib.tail_bf16(x.float(), up, 2, last) is None  # not a bf16 hand-off
    monkeypatch.setenv("NMRESTORE_DISABLE_AMX", "1")
    assert lib.tail_bf16(x, up, 2, last) is None


@pytest.mark.parametrize("scale", [2, 4])
def test_the_bf16_engine_runs_edsrs_tail_as_one_amx_call(monkeypatch: pytest.MonkeyPatch, scale: int) -> None:
    _amx()
    torch.manual_seed(0)
    model = create_model("edsr_small", scale=scale, n_feats=32, n_blocks=2)
    sparsify_(model, NMConfig(n=4, m=32, out_block=16))
    model.eval()
    reference = squash_(copy.deepcopy(model))
    engine = compile_sparse(model, EngineConfig(precision="bf16", tactic="sparse"))
    assert isinstance(engine.tail, FusedTail)
    x = torch.rand(1, 3, 20, 70)
    fused, apart, calls = fused_and_apart(monkeypatch, engine, x, FusedTail, "_amx_tail")
    assert calls == [True]
    with torch.no_grad():
        ref = reference(x)
    assert torch.equal(fused, apart)
    assert float((fused - ref).abs().max()) <= 2e-2 * float(ref.abs().max())


def test_a_profile_times_the_fused_tail_whole_and_a_dense_tail_conv_by_conv() -> None:
    _amx()
    torch.manual_seed(0)
    model = create_model("edsr_small", scale=2, n_feats=32, n_blocks=2)
    sparsify_(model, NMConfig(n=4, m=32, out_block=16))
    model.eval()
    x = torch.rand(1, 3, 12, 40)
    dense_rows, _ = profile_modules(squash_(copy.deepcopy(model)), x, repeats=1)
    engine = compile_sparse(model, EngineConfig(precision="bf16", tactic="sparse"))
    rows, total = profile_modules(engine, x, repeats=1)
    names = {r.name: r.kind for r in rows}
    # the fused call runs neither conv's module: only the tail's own hooks see its time
    assert names["tail"] == "FusedTail" and not any(n.startswith("tail.") for n in names)
    assert {"tail.0.0", "tail.1"} <= {r.name for r in dense_rows}
    assert sum(r.ms for r in rows if r.name != "(other)") <= total + 1e-6
