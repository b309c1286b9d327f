"""The coarse AMX prototype (benchmarks/proto/coarse_amx.cpp): its fused epilogue and the whole-EDSR
pipeline give PyTorch's outputs within bf16 rounding. Runs only on a CPU with AMX-BF16."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _coarse import LEFT, CoarseEDSR, build, coarse_weight, pack, padded_bf16  # noqa: E402
from nmrestore.models import create_model  # noqa: E402
from nmrestore.runtime.cpu_features import cpu_features  # noqa: E402
from nmrestore.sparsity import NMConfig, sparsify_, squash_  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (cpu_features().get("amx_tile") and cpu_features().get("amx_bf16")), reason="needs AMX-BF16"
)


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    built = build(tmp_path_factory.mktemp("coarse"))
    if isinstance(built, str):
        pytest.skip(built)
    return built


def test_the_fused_epilogue_adds_the_skip_applies_relu_and_hands_off_bf16(lib) -> None:  # type: ignore[no-untyped-def]
    h, w = 5, 64
    g = torch.Generator().manual_seed(0)
    x, skip = torch.randn(1, 64, h, w, generator=g), torch.randn(h, 64, w, generator=g)
    weight = coarse_weight(torch.randn(64, 64, 3, 3, generator=g) * 0.1, 4, 32)
    bias = torch.randn(64, generator=g)
    kidx, apack, kpad = pack(weight)
    xpad = padded_bf16(x)
    out, out16 = torch.empty(h, 64, w), torch.zeros_like(xpad)
    done = lib.coarse_conv3x3(xpad.data_ptr(), 64, h, w, xpad.shape[2], LEFT, kidx.data_ptr(), apack.data_ptr(), 64,
                              kpad, bias.data_ptr(), skip.data_ptr(), 1, out.data_ptr(), out16.data_ptr(), 2)  # fmt: skip
    assert done == 0
    conv = F.conv2d(x.bfloat16().float(), weight.bfloat16().float(), bias, padding=1)[0].permute(1, 0, 2)
    torch.testing.assert_close(out, torch.relu(conv + skip), atol=1e-4, rtol=1e-4)
    assert torch.equal(out16[1 : h + 1, :, LEFT : LEFT + w], out.bfloat16())
    border = out16.clone()
    border[1 : h + 1, :, LEFT : LEFT + w] = 0
    assert not border.any()  # the hand-off's zero border (the next conv's padding) is left alone


def test_the_whole_coarse_edsr_matches_pytorch_within_bf16_rounding(lib) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = create_model("edsr_baseline", scale=2, n_blocks=2)
    sparsify_(model, NMConfig(n=4, m=32, out_block=16))
    model = squash_(model).eval()
    x = torch.rand(1, 3, 8, 64)
    with torch.no_grad():
        ref = model(x)
    out = CoarseEDSR(lib, model, 8, 64)(x)
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) < 2e-2
