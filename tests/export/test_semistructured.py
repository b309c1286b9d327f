"""The 2:4 semi-structured path: clear refusals everywhere, real sparse kernels on a CUDA GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nmrestore.errors import SparsityError
from nmrestore.export import to_semi_structured_
from nmrestore.export.onnx import deployable_copy
from nmrestore.models import create_model
from nmrestore.sparsity import NMConfig, nm_layers, sparsify_

needs_sm80 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
    reason="needs a CUDA GPU with 2:4 sparse tensor cores (compute capability >= 8.0)",
)


class Pointwise(nn.Module):
    """3x3 head, two 1x1 convs (the swappable kind), 3x3 tail."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.mix = nn.Sequential(
            nn.Conv2d(channels, 2 * channels, 1), nn.ReLU(), nn.Conv2d(2 * channels, channels, 1)
        )
        self.tail = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.mix(self.head(x)))


def _sparse(model: nn.Module, n: int = 2, m: int = 4) -> nn.Module:
    torch.manual_seed(0)
    sparsify_(model, NMConfig(n=n, m=m))
    return model


def test_cpu_fails_naming_cuda() -> None:
    model = _sparse(Pointwise())
    with pytest.raises(SparsityError, match="CUDA") as info:
        to_semi_structured_(model)
    message = str(info.value)
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in message and "compute capability >= 8.0" in message
    else:
        assert "move it to the GPU first" in message
    assert len(list(nm_layers(model))) == 2  # nothing was changed


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        (lambda: _sparse(Pointwise(), 2, 8), "no 2:4 layer: the masks are 2:8"),
        (
            lambda: _sparse(create_model("edsr_small", scale=2, n_feats=16, n_blocks=1)),
            "only do matrix multiplies",
        ),
        (lambda: Pointwise(), "the model has no N:M masks"),
    ],
    ids=["2:8 masks", "only 3x3 convs", "dense model"],
)
def test_models_without_a_usable_two_four_layer_fail_clearly(model: object, needle: str) -> None:
    with pytest.raises(SparsityError, match=needle):
        to_semi_structured_(model())  # type: ignore[operator]


def test_unsupported_dtype() -> None:
    with pytest.raises(SparsityError, match="float16 or bfloat16"):
        to_semi_structured_(_sparse(Pointwise()), dtype=torch.float32)


@pytest.mark.gpu
@needs_sm80
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pointwise_convs_run_on_semi_structured_weights(dtype: torch.dtype) -> None:
    model = _sparse(Pointwise()).cuda().eval()
    reference, _ = deployable_copy(model)
    report = to_semi_structured_(model, dtype)
    assert report.swapped == ["mix.0", "mix.2"], report.table()
    sparse_type = torch.sparse.SparseSemiStructuredTensor
    assert all(isinstance(model.get_submodule(name).weight, sparse_type) for name in report.swapped)
    x = torch.rand(2, 3, 16, 24, device="cuda")
    with torch.no_grad():
        expected = reference.cuda()(x)
        got = model(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    tolerance = 2e-2 if dtype == torch.float16 else 6e-2
    assert torch.allclose(got, expected, atol=tolerance, rtol=tolerance), float((got - expected).abs().max())


@pytest.mark.gpu
@needs_sm80
def test_linears_run_on_semi_structured_weights() -> None:
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64))
    torch.manual_seed(0)
    sparsify_(model, NMConfig(n=2, m=4, dense_first_last=False))
    model = model.cuda().half().eval()
    reference, _ = deployable_copy(model)
    report = to_semi_structured_(model)
    assert report.swapped == ["0", "2", "4"], report.table()
    x = torch.rand(32, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        assert torch.allclose(model(x), reference.cuda().half()(x), atol=2e-2, rtol=2e-2)
