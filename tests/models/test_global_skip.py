"""EDSR's global skip: the network learns a residual over bicubic, and starts as bicubic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nmrestore.methods import OneShotConfig
from nmrestore.models import create_model
from nmrestore.runtime import compile_sparse
from nmrestore.sparsity import sparsify_


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_an_untrained_model_with_a_global_skip_is_bicubic(scale: int) -> None:
    model = create_model("edsr_small", scale=scale, global_skip=True).eval()
    x = torch.rand(1, 3, 12, 10)
    expected = x if scale == 1 else F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_the_skip_is_added_to_what_the_network_learns() -> None:
    torch.manual_seed(0)
    model = create_model("edsr_small", scale=2, global_skip=True)
    with torch.no_grad():
        model.tail[1].weight.normal_(0, 0.01)
    x = torch.rand(1, 3, 8, 8)
    bicubic = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
    with torch.no_grad():
        residual = model(x) - bicubic
        features = model.head(model.sub_mean(x))
        assert torch.allclose(residual, model.tail(model.body(features) + features), atol=1e-6)
    assert residual.abs().max() > 0
    default = create_model("edsr_small", scale=2)
    assert not default.global_skip and default.tail[1].weight.abs().sum() > 0  # the default is unchanged


def test_the_sparse_engine_keeps_the_skip() -> None:
    torch.manual_seed(0)
    model = create_model("edsr_small", scale=2, global_skip=True).eval()
    with torch.no_grad():
        model.tail[1].weight.normal_(0, 0.05)
    sparsify_(model, OneShotConfig(n=2, m=4))
    x = torch.rand(1, 3, 9, 11)
    with torch.no_grad():
        reference = model(x)
        fast = compile_sparse(model)(x)
    assert torch.allclose(fast, reference, atol=1e-4)


def test_a_multiscale_edsr_with_a_global_skip_is_bicubic_at_every_task_and_loads_its_single_task_model() -> None:
    from nmrestore.models.multitask import load_single_task_state, use_task

    model = create_model("edsr_small_multiscale", scale=2, tasks=(2, 3, 4), global_skip=True).eval()
    x = torch.rand(1, 3, 10, 9)
    for scale in (2, 3, 4):
        with use_task(model, f"x{scale}"), torch.no_grad():
            expected = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
            assert torch.equal(model(x), expected)
    torch.manual_seed(1)
    single = create_model("edsr_small", scale=3, global_skip=True).eval()
    with torch.no_grad():
        single.tail[1].weight.normal_(0, 0.02)
    load_single_task_state(model, single.state_dict(), "x3")
    with use_task(model, "x3"), torch.no_grad():
        assert torch.allclose(model(x), single(x), atol=1e-6)
    assert not create_model("edsr_small_multiscale").global_skip  # the default is unchanged
