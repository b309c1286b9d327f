"""The uniform N:M baselines (one-shot, SR-STE): patterns hold after training, gradients are right."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from nmrestore.engine.runner import train
from nmrestore.methods import OneShotConfig, SRSTEConfig
from nmrestore.methods.srste import RefreshController
from nmrestore.recipes import recipe_from_dict
from nmrestore.sparsity import check_nm, nm_layers, nm_patterns, sparsify_, squash_
from tests.conftest import tiny_recipe_dict


def _trained(tmp_path: Path, sparsity: dict[str, object]) -> nn.Module:
    recipe = recipe_from_dict(
        tiny_recipe_dict(model={"kwargs": {"n_feats": 8, "n_blocks": 1}}, sparsity=sparsity)
    )
    return train(recipe, tmp_path / "run", show_progress=False).model


@pytest.mark.parametrize("method", ["oneshot", "srste"])
def test_trained_model_passes_check_nm_before_and_after_squash(tmp_path: Path, method: str) -> None:
    model = _trained(tmp_path, {"method": method, "n": 2, "m": 4})
    layers = list(nm_layers(model))
    assert layers and all(mask.n == 2 and mask.m == 4 for _, _, mask in layers)
    assert all(check.ok for check in check_nm(model))
    patterns = nm_patterns(model)
    squash_(model)
    assert all(check.ok for check in check_nm(model, patterns))


def _one_layer(config: OneShotConfig | SRSTEConfig) -> tuple[nn.Linear, object]:
    layer = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -3.0, 2.0, -0.5, 0.1, 0.4, -0.2, 5.0]]))
    report = sparsify_(nn.Sequential(layer), config, filter_fn=lambda name, module: True)
    return layer, report.controller


def test_srste_gradient_is_dense_gradient_plus_decay_on_pruned_weights() -> None:
    lam = 1e-2
    layer, controller = _one_layer(SRSTEConfig(n=2, m=4, srste_lambda=lam))
    assert isinstance(controller, RefreshController)
    w = layer.parametrizations.weight.original.detach().clone()
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]])  # 2 largest |w| of each 4
    assert torch.equal(layer.weight.detach() != 0, mask.bool())
    x = torch.arange(1.0, 9.0).view(1, 8)
    r = torch.tensor([[0.5]])
    (layer(x) * r).sum().backward()
    g = r.T @ x  # the gradient with respect to the (masked) weight
    expected = g + lam * (1 - mask) * w
    torch.testing.assert_close(layer.parametrizations.weight.original.grad, expected, rtol=0, atol=1e-7)


def test_oneshot_gradient_skips_pruned_weights_and_masks_stay_fixed() -> None:
    layer, controller = _one_layer(OneShotConfig(n=2, m=4))
    assert controller is None
    mask = layer.weight.detach() != 0
    x = torch.arange(1.0, 9.0).view(1, 8)
    layer(x).sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert torch.equal(grad != 0, mask)
    with torch.no_grad():  # the pruned weights grow; a fixed mask does not follow
        layer.parametrizations.weight.original.mul_(~mask * 100.0 + mask)
    assert torch.equal(layer.weight.detach() != 0, mask)


def test_srste_refresh_lets_grown_weights_back_in() -> None:
    layer, controller = _one_layer(SRSTEConfig(n=2, m=4))
    assert isinstance(controller, RefreshController)
    before = layer.weight.detach() != 0
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(~before * 100.0 + before)
    controller.step(1)  # refresh_every=1: what the Trainer calls after every optimizer step
    after = layer.weight.detach() != 0
    assert torch.equal(after, ~before)
    assert controller.refreshes == 1
    assert all(check.ok for check in check_nm(nn.Sequential(layer)))
