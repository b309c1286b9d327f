"""One SLS training step equals the published code's, transcribed here as the specification.

The transcription follows JungHunOh/SLS_CVPR2022 (``model/common.py`` ``SparseConv`` and
``trainer.py``): pruning units from the weight magnitudes of every group of M input channels, the
mask ``units[0] + sum_k units[k] * (binary_k - p_k.detach() + p_k)`` with ``p = cumprod(clamp(s, 0,
1.03))``, and the loss ``L1 + lamb * coef * sum_l (1 + sum_k binary_k) / M * ops_l * h_l * w_l`` on raw
MACs. nmrestore's cost is normalised by the prunable MACs C_ref, so ``lamb = lam / C_ref``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmrestore.methods.sls import SLSConfig
from nmrestore.methods.sls.controller import SLSController
from nmrestore.models import create_model
from nmrestore.sparsity import sparsify_
from nmrestore.sparsity.parametrization import dense_weight

M = 32
LR_SIZE = (12, 12)


def published_pruning_units(weight: Tensor, m: int) -> Tensor:
    """``SparseConv.update_pruning_units``: unit k keeps the (k+1)-th largest |w| of every group."""
    out_c, in_c, kh, kw = weight.shape
    flat = weight.detach().permute(2, 3, 0, 1).reshape(-1, in_c).reshape(-1, m)
    idxes = flat.abs().sort(dim=1).indices
    order = torch.zeros_like(flat, dtype=torch.long)
    for n in range(1, m + 1):
        order.scatter_(1, idxes[:, -n].unsqueeze(-1), n)
    order = order.reshape(kh, kw, out_c, in_c).permute(2, 3, 0, 1)
    return torch.stack([(order == i + 1).to(weight.dtype) for i in range(m)])


def published_mask(units: Tensor, scores: Tensor) -> Tensor:
    """``SparseConv.forward`` in training mode, before the budget is reached."""
    prob = torch.cumprod(torch.clamp(scores, 0, 1.03), 0)
    binary = (prob > 0.5).int()
    mn_mask = binary - prob.detach() + prob
    return units[0] + torch.sum(units[1:] * mn_mask.view(-1, 1, 1, 1, 1), dim=0)


def published_cost(scores: Tensor, ops_per_position: int, h: int, w: int) -> Tensor:
    """``SparseConv.compute_costs`` (pruned cost; STE through the binary scores)."""
    prob = torch.cumprod(torch.clamp(scores, 0, 1.03), 0)
    binary = (prob > 0.5).int()
    binary = binary - prob.detach() + prob
    return (1 + binary.sum()) / M * ops_per_position * h * w


@pytest.mark.parametrize("coef", [1.0, 1.2**3])
def test_one_step_matches_the_published_forward_and_backward(coef: float) -> None:
    torch.manual_seed(0)
    model = create_model("carn_small", scale=4)
    reference_net = copy.deepcopy(model)
    lam = 0.05
    controller = sparsify_(model, SLSConfig(m=M, lam=lam, input_size=LR_SIZE)).controller
    assert isinstance(controller, SLSController)
    controller.coef = coef
    names = controller.layer_names()
    assert len(names) >= 6
    # scores away from their init, so that some ranks are dropped and the STE matters. They stay <= 1,
    # so p is non-increasing: where p climbs back above 0.5 after a dip (possible up to the 1.03 clamp)
    # the published code keeps the later ranks and nmrestore does not (its documented prefix rule).
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mask in controller.masks:
            mask.scores.copy_(0.85 + 0.15 * torch.rand(M - 1, generator=generator))
            mask.sync_n()
    x = torch.rand(2, 3, *LR_SIZE, generator=generator)
    y = torch.rand(2, 3, LR_SIZE[0] * 4, LR_SIZE[1] * 4, generator=generator)

    # nmrestore
    model.train()
    loss = F.l1_loss(model(x), y) + sum(controller.regularizer().values())
    loss.backward()

    # the published code, on a dense copy of the same weights and scores
    modules = dict(reference_net.named_modules())
    weights = {n: dense_weight(m).detach().clone().requires_grad_(True) for n, m in zip(names, controller.modules, strict=True)}
    scores = {n: mask.scores.detach().clone().requires_grad_(True) for n, mask in zip(names, controller.masks, strict=True)}
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        modules[n].register_forward_hook(lambda _m, _i, out, n=n: sizes.__setitem__(n, tuple(out.shape[-2:])))
        for n in names
    ]
    params = dict(reference_net.named_parameters())
    replaced = {
        f"{n}.weight": weights[n] * published_mask(published_pruning_units(weights[n], M), scores[n]) for n in names
    }
    out = torch.func.functional_call(reference_net, {**params, **replaced}, (x,))
    for hook in hooks:
        hook.remove()
    ops = {n: modules[n].weight[0].numel() * modules[n].out_channels for n in names}
    costs = [published_cost(scores[n], ops[n], *sizes[n]) for n in names]
    c_ref = sum(ops[n] * sizes[n][0] * sizes[n][1] for n in names)
    reference_loss = F.l1_loss(out, y) + (lam / c_ref) * coef * sum(costs)
    reference_loss.backward()

    assert loss.item() == pytest.approx(reference_loss.item(), rel=1e-6)
    for name, module, mask in zip(names, controller.modules, controller.masks, strict=True):
        original = module.parametrizations.weight.original
        torch.testing.assert_close(original.grad, weights[name].grad, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(mask.scores.grad, scores[name].grad, rtol=1e-5, atol=1e-9, msg=name)
    assert any(mask.scores_n() < M for mask in controller.masks)  # some layer really dropped ranks


def test_dense_parameters_get_the_same_gradients() -> None:
    """Biases and unpruned layers (head, tail) see the same loss: their gradients match as well."""
    torch.manual_seed(0)
    model: nn.Module = create_model("carn_small", scale=4)
    reference_net = copy.deepcopy(model)
    sparsify_(model, SLSConfig(m=M, input_size=LR_SIZE))
    x, y = torch.rand(1, 3, *LR_SIZE), torch.rand(1, 3, 48, 48)
    F.l1_loss(model(x), y).backward()
    F.l1_loss(reference_net(x), y).backward()  # all scores at 1: every rank kept, the mask is all ones
    ours = {n.replace(".parametrizations.weight.original", ".weight"): p.grad for n, p in model.named_parameters()}
    for name, param in reference_net.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-5, atol=1e-8, msg=name)
