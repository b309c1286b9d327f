"""Coarse N:M: masks shared by blocks of output channels (``out_block``), from the scores to training."""

from __future__ import annotations

from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from pydantic import ValidationError
from torch import nn

from nmrestore.engine.runner import model_from_checkpoint, train
from nmrestore.errors import SparsityError
from nmrestore.methods.classpruning.config import ClassPruningConfig
from nmrestore.methods.filter.config import FilterConfig
from nmrestore.methods.png.config import PNGConfig
from nmrestore.methods.sls.config import SLSConfig
from nmrestore.recipes import recipe_from_dict
from nmrestore.sparsity import NMConfig, NMMask, check_nm, nm, nm_layers, refresh_, sparsify_, use_route
from tests.conftest import tiny_recipe_dict


def test_block_scores_sum_each_block_and_give_it_to_every_channel() -> None:
    scores = torch.tensor([[1.0, 4.0], [2.0, 0.0], [5.0, 1.0], [0.0, 1.0]])
    assert torch.equal(nm.block_scores(scores, 2), torch.tensor([[3.0, 4.0], [3.0, 4.0], [5.0, 2.0], [5.0, 2.0]]))
    assert torch.equal(nm.block_scores(scores, 1), scores)
    # ConvTranspose weights hold output channels on axis 1
    assert torch.equal(nm.block_scores(scores.t(), 2, out_axis=1), nm.block_scores(scores, 2).t())
    with pytest.raises(SparsityError, match="4 output channels are not a multiple of out_block=3"):
        nm.block_scores(scores, 3)


def test_a_block_keeps_the_inputs_with_the_largest_summed_magnitude() -> None:
    # 2:4, two output channels in one block: channel 0 alone would keep inputs 0, 1; channel 1
    # alone 2, 3; the block's sums |w| are 3, 2.5, 2, 4.5, so both keep inputs 0 and 3
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 2.0, 0.0, 0.5], [1.0, 0.5, 2.0, -4.0]]))
    mask = NMMask(layer.weight, 4, 2, out_block=2)
    assert torch.equal(mask.mask(), torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]]))
    assert "out_block=2" in mask.extra_repr()
    with pytest.raises(SparsityError, match="2 output channels are not a multiple of out_block=4"):
        NMMask(layer.weight, 4, 2, out_block=4)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    block=st.sampled_from([1, 2, 4]),
    nm_pair=st.sampled_from([(1, 4), (2, 4), (2, 8), (3, 8)]),
)
def test_block_masks_are_shared_n_of_m_and_keep_the_best_block_sums(
    seed: int, block: int, nm_pair: tuple[int, int]
) -> None:
    n, m = nm_pair
    weight = torch.randn(8, 16, 3, 3, generator=torch.Generator().manual_seed(seed))
    mask = NMMask(weight, m, n, out_block=block).mask()
    blocks = mask.view(8 // block, block, 16, 3, 3)
    assert torch.equal(blocks, blocks[:, :1].expand_as(blocks))  # one mask per block
    assert torch.equal(nm.to_groups(mask, m).sum(-1), torch.full((8, 3, 3, 16 // m), float(n)))
    # every kept input's block sum is at least every dropped one's in the same group of M
    sums = nm.to_groups(nm.block_scores(weight.abs(), block), m)
    kept = nm.to_groups(mask, m).bool()
    lowest_kept = torch.where(kept, sums, torch.inf).amin(-1)
    highest_dropped = torch.where(kept, -torch.inf, sums).amax(-1)
    assert bool((lowest_kept >= highest_dropped).all())


def test_refresh_keeps_the_masks_block_shared() -> None:
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    sparsify_(model, NMConfig(n=2, m=8, out_block=4, grad_mode="srste"))
    (name, module, mask), = list(nm_layers(model))
    with torch.no_grad():
        module.parametrizations.weight.original.normal_()
    refresh_(model)
    blocks = mask.mask().view(2, 4, 8, 3, 3)
    assert name == "1" and torch.equal(blocks, blocks[:, :1].expand_as(blocks))


def test_layers_whose_output_channels_do_not_split_into_blocks_stay_dense_with_the_reason() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 12, 3), nn.Conv2d(12, 8, 3), nn.Conv2d(8, 3, 3))
    report = sparsify_(model, NMConfig(n=1, m=4, out_block=8))
    assert [p.name for p in report.pruned] == ["2"]
    reasons = {d.name: d.reason for d in report.dense}
    assert reasons["1"] == "12 output channels, not a multiple of out_block=8"


def test_methods_without_shared_masks_refuse_out_block() -> None:
    with pytest.raises(ValidationError, match="png grows each task's positions per output channel"):
        PNGConfig(out_block=2)
    with pytest.raises(ValidationError, match="filter pruning removes whole channels"):
        FilterConfig(target_macs_fraction=0.5, out_block=2)
    with pytest.raises(ValidationError):
        NMConfig(out_block=0)


def test_sls_learns_n_over_block_shared_masks() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 3, 3))
    sparsify_(model, SLSConfig(m=8, budget=0.5, out_block=4))
    for _, _, mask in nm_layers(model):
        blocks = mask.mask().view(2, 4, 8, 3, 3)
        assert mask.out_block == 4 and torch.equal(blocks, blocks[:, :1].expand_as(blocks))


def test_srste_trains_block_masks_and_the_checkpoint_reloads_them(tmp_path: Path) -> None:
    recipe = recipe_from_dict(
        tiny_recipe_dict(
            model={"name": "edsr_small", "scale": 2, "kwargs": {"n_feats": 8, "n_blocks": 2}},
            sparsity={"method": "srste", "n": 1, "m": 4, "out_block": 4},
        )
    )
    result = train(recipe, tmp_path / "run", show_progress=False)
    reloaded, saved = model_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert saved.sparsity is not None and saved.sparsity.out_block == 4
    masks = list(nm_layers(reloaded))
    assert masks
    for _, module, mask in masks:
        o = module.parametrizations.weight.original.shape[0]
        blocks = mask.mask().view(o // 4, 4, *mask.ranks.shape[1:])
        assert torch.equal(blocks, blocks[:, :1].expand_as(blocks))
    x = torch.rand(1, 3, 9, 9)
    result.model.eval()
    assert torch.equal(reloaded(x), result.model(x))
    check_nm(reloaded)


def test_the_default_out_block_leaves_a_recipe_dump_as_it_was() -> None:
    # cached benchmark runs and saved checkpoints compare recipe dumps: a new default must not show
    assert "out_block" not in NMConfig(n=2, m=4).model_dump()
    assert "out_block" not in SLSConfig(m=8, budget=0.5).model_dump(mode="json")
    dumped = NMConfig(n=2, m=4, out_block=16).model_dump(mode="json")
    assert dumped["out_block"] == 16 and NMConfig.model_validate(dumped) == NMConfig(n=2, m=4, out_block=16)


def test_every_classpruning_route_keeps_its_blocks_shared() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 3, 3))
    sparsify_(model, ClassPruningConfig(m=8, routes=(2, 4, 8), out_block=4, classifier_channels=4))
    for route in range(3):
        with use_route(model, route):
            for _, _, mask in nm_layers(model):
                blocks = mask.mask().view(2, 4, 8, 3, 3)
                assert torch.equal(blocks, blocks[:, :1].expand_as(blocks))
