"""PNG: per-task N:M masks grown and pruned task after task over one shared weight tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn
from torch.nn import functional as F

from nmrestore.cli.evaluation import evaluate_checkpoint, infer_images
from nmrestore.cost import count_cost
from nmrestore.data.io import read_image, write_image
from nmrestore.engine.checkpoint import save_checkpoint
from nmrestore.engine.runner import model_from_checkpoint, train
from nmrestore.errors import RecipeError, SparsityError
from nmrestore.methods.png import PNGConfig
from nmrestore.methods.png.controller import PNGController
from nmrestore.methods.png.packing import pack_png, unpack_png_
from nmrestore.methods.png.storage import png_storage, storage_bound
from nmrestore.methods.png.tasks import png_masks, use_png_task
from nmrestore.models import count_params, create_model
from nmrestore.recipes import load_recipe, recipe_from_dict
from nmrestore.sparsity import NMConfig, check_nm, nm, sparsify_
from tests.conftest import tiny_recipe_dict

TINY = {"n_feats": 8, "n_blocks": 1}


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs on one thread (see ``one_thread`` in tests/conftest.py)."""


def _png_model(config: PNGConfig, name: str = "edsr_small_multiscale") -> tuple[nn.Module, PNGController]:
    torch.manual_seed(0)
    model = create_model(name, scale=2, **TINY)
    controller = sparsify_(model, config).controller
    assert isinstance(controller, PNGController)
    return model, controller


def _train_phase(model: nn.Module, controller: PNGController, task: int, phase: str, steps: int = 3) -> None:
    """A few Adam steps with momentum and weight decay: the updates that could move frozen weights."""
    controller.begin(task, phase)  # type: ignore[arg-type]
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    scale = model.scale
    generator = torch.Generator().manual_seed(100 * task + len(phase))
    for step in range(steps):
        x = torch.rand(2, 3, 6, 6, generator=generator)
        y = torch.rand(2, 3, 6 * scale, 6 * scale, generator=generator)
        optimizer.zero_grad()
        F.l1_loss(model(x), y).backward()
        optimizer.step()
        controller.step(step + 1)
    controller.end()


def _outputs(model: nn.Module, task: int, x: Tensor) -> Tensor:
    with torch.no_grad(), use_png_task(model, task):
        return model(x)


def _run_schedule(model: nn.Module, controller: PNGController) -> dict[int, Tensor]:
    """Every task trained in turn; checks after each phase that earlier tasks compute the same."""
    x = torch.rand(1, 3, 7, 5, generator=torch.Generator().manual_seed(1))
    done: dict[int, Tensor] = {}
    for task in range(len(controller.tasks)):
        before = _outputs(model, task, x)
        for phase in ("train", "finetune"):
            _train_phase(model, controller, task, phase)
            for earlier, reference in done.items():
                assert torch.equal(_outputs(model, earlier, x), reference), (earlier, task, phase)
        assert not torch.equal(_outputs(model, task, x), before)  # the task itself did train
        done[task] = _outputs(model, task, x)
    return done


@pytest.mark.parametrize(
    "name", ["edsr_small_multiscale", "rcan_small_multiscale", "msrresnet_small_multiscale"]
)
def test_training_a_task_never_changes_what_earlier_tasks_compute(name: str) -> None:
    model, controller = _png_model(PNGConfig(m=4, ns=(2, 1, 2), max_grow=1), name)
    _run_schedule(model, controller)
    check_nm(model)


def test_every_task_keeps_exactly_n_per_group_and_growth_respects_the_cap() -> None:
    config = PNGConfig(m=8, ns=(4, 3, 4), max_grow=(None, 1, 2))
    model, controller = _png_model(config)
    _run_schedule(model, controller)
    for name, _, mask in png_masks(model):
        tasks = range(3) if mask.shared else [mask.owner]
        for t in tasks:
            keep = nm.to_groups(mask.task_mask(t), 8, mask.in_axis)
            assert bool((keep.sum(-1) == config.ns[t]).all()), (name, t)
        if mask.shared:
            union = nm.to_groups(mask.union_mask(), 8, mask.in_axis).sum(-1)
            assert int(union.max()) <= config.union_bound() == 7
            assert int(union.min()) >= config.ns[0]
    assert [r.ok for r in check_nm(model)] == [True] * len(check_nm(model))


def _largest_first(weight: Tensor, kept: Tensor, candidates: Tensor, m: int) -> bool:
    """Every kept weight is at least as large as every candidate left out, group by group."""
    groups = nm.to_groups(weight.abs(), m)
    kept, candidates = nm.to_groups(kept, m), nm.to_groups(candidates, m)
    worst_kept = torch.where(kept, groups, torch.inf).amin(-1)
    best_left = torch.where(candidates & ~kept, groups, -torch.inf).amax(-1)
    return bool((worst_kept >= best_left).all())


def test_prune_keeps_the_largest_of_earlier_plus_at_most_max_grow_new_positions() -> None:
    torch.manual_seed(0)
    model = create_model("edsr_small_multiscale", scale=2, tasks=(2, 3), **TINY)
    controller = sparsify_(model, PNGConfig(m=8, ns=(4, 4), max_grow=2)).controller
    assert isinstance(controller, PNGController)
    _train_phase(model, controller, 0, "train")
    controller.begin(0, "finetune")  # the prune of task 1: top 4 of all 8 by magnitude
    for _, module, mask in png_masks(model):
        weight = module.parametrizations.weight.original.detach()
        if mask.shared or mask.owner == 0:
            assert _largest_first(weight, mask.task_mask(0), torch.ones_like(weight, dtype=torch.bool), 8)
    controller.end()
    _train_phase(model, controller, 0, "finetune")
    _train_phase(model, controller, 1, "train")
    controller.begin(1, "finetune")  # the prune of task 2: top 4 of (task 1's + the 2 largest free)
    for _, module, mask in png_masks(model):
        if not mask.shared:
            continue
        weight = module.parametrizations.weight.original.detach()
        earlier, kept = mask.task_mask(0), mask.task_mask(1)
        free_scores = torch.where(earlier, -1.0, weight.abs())
        top_free = (nm.ranks_from_scores(free_scores, 8) < 2) & ~earlier
        assert not bool((kept & ~(earlier | top_free)).any())
        assert int(nm.to_groups(kept & ~earlier, 8).sum(-1).max()) <= 2
        assert _largest_first(weight, kept, earlier | top_free, 8)
    controller.end()


def test_storage_adds_up_and_the_packed_form_restores_every_task_exactly() -> None:
    config = PNGConfig(m=4, ns=(2, 2, 2), max_grow=1)
    model, controller = _png_model(config)
    outputs = _run_schedule(model, controller)
    storage = png_storage(model)
    packed = pack_png(model)
    parts = (
        storage.shared_values_bytes
        + storage.shared_mask_bytes
        + storage.shared_dense_bytes
        + storage.task_bytes
    )
    assert storage.total_bytes == parts == packed.nbytes()
    assert storage.shared_values_bytes == 4 * storage.union_positions
    assert storage.separate_dense_bytes == pytest.approx(3 * storage.one_dense_bytes)
    assert (
        storage.total_bytes
        <= storage_bound(create_model("edsr_small_multiscale", scale=2, **TINY), config)["png_bytes_bound"]
    )
    for t, (task, scale) in enumerate((("x2", 2), ("x3", 3), ("x4", 4))):
        info = storage.tasks[t]
        assert info.task == task and info.prunable_macs_fraction == pytest.approx(0.5, abs=1e-12)
        # a separate dense model is the single-task edsr_small at that scale ...
        single = create_model("edsr_small", scale=scale, **TINY)
        assert info.dense_model_bytes == 4 * count_params(single)
        # ... and a separate 2:4 model packs like the cost module packs it (at 2:4 index = bitmap bits)
        sparsify_(single, NMConfig(n=2, m=4))
        assert info.nm_model_bytes == count_cost(single).packed_bytes()
    # the packed tensors hold everything: a fresh model restored from them computes every task exactly
    fresh, _ = _png_model(config)
    unpack_png_(fresh, packed)
    x = torch.rand(1, 3, 7, 5, generator=torch.Generator().manual_seed(1))
    for t, reference in outputs.items():
        assert torch.equal(_outputs(fresh, t, x), reference)


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ValidationError, match=r"N must be in 1\.\.M"):
        PNGConfig(m=4, ns=(2, 5))
    with pytest.raises(ValidationError, match="can reach only 3"):
        PNGConfig(m=8, ns=(2, 4), max_grow=1)
    with pytest.raises(ValidationError, match="grad_mode 'hard'"):
        PNGConfig(grad_mode="ste")
    with pytest.raises(ValidationError, match="tasks but"):
        PNGConfig(ns=(4, 4), tasks=("x2",))
    model = create_model("edsr_small_multiscale", **TINY)
    with pytest.raises(SparsityError, match="differ from the model's tasks"):
        sparsify_(model, PNGConfig(ns=(4, 4, 4), tasks=("x2", "x4", "x3")))
    with pytest.raises(SparsityError, match="ns has 2 values"):
        sparsify_(create_model("edsr_small_multiscale", **TINY), PNGConfig(ns=(4, 4)))
    with pytest.raises(SparsityError, match="needs tasks"):
        sparsify_(create_model("edsr_small", **TINY), PNGConfig(ns=(4, 4)))


def test_a_single_task_network_can_serve_several_compression_rates() -> None:
    """Without task layers every layer is shared: tasks are N:M budgets of one network."""
    torch.manual_seed(0)
    model = create_model("edsr_small", scale=2, n_feats=8, n_blocks=2)
    controller = sparsify_(model, PNGConfig(m=4, ns=(2, 1), tasks=("fast", "faster"), max_grow=0)).controller
    assert isinstance(controller, PNGController)
    _run_schedule(model, controller)
    storage = png_storage(model)
    assert [t.n for t in storage.tasks] == [2, 1]
    assert storage.union_fraction == pytest.approx(0.5)  # max_grow 0: the second task reuses the first's


# -- the runner ------------------------------------------------------------------------------------
def _png_recipe(**sparsity: Any) -> dict[str, Any]:
    recipe = tiny_recipe_dict(
        model={"name": "edsr_small_multiscale", "scale": 2, "kwargs": {**TINY, "tasks": [2, 3]}},
        sparsity={
            "method": "png",
            "m": 4,
            "ns": [2, 2],
            "steps": {"dense": 4, "grow": 3, "finetune": 2},
            **sparsity,
        },
    )
    recipe["data"]["train"]["patch_size"] = 8
    return recipe


def _states_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One uninterrupted tiny PNG run (x2 then x3), shared by the runner tests."""
    torch.set_num_threads(1)
    return train(recipe_from_dict(_png_recipe()), tmp_path_factory.mktemp("png") / "run", show_progress=False)


@pytest.mark.parametrize("cut_at", [7, 9])  # 7: between tasks (x3's first step); 9: inside x3's grow phase
def test_png_run_resumes_anywhere_and_ends_with_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut_at: int, full_run: Any
) -> None:
    from nmrestore.engine import task as task_module

    recipe = recipe_from_dict(_png_recipe())
    calls = {"n": 0}
    real = task_module.RestorationTask.losses

    def interrupted(self: Any, model: Any, batch: Any) -> dict[str, Tensor]:
        calls["n"] += 1
        if calls["n"] == cut_at:
            raise KeyboardInterrupt
        return real(self, model, batch)

    monkeypatch.setattr(task_module.RestorationTask, "losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, tmp_path / "cut", show_progress=False)
    monkeypatch.setattr(task_module.RestorationTask, "losses", real)
    with pytest.raises(RecipeError, match="--resume"):
        train(recipe, tmp_path / "cut", show_progress=False)
    resumed = train(recipe, tmp_path / "cut", resume=True, show_progress=False)
    assert _states_equal(resumed.model.state_dict(), full_run.model.state_dict())
    assert resumed.tasks["x3"].psnr == pytest.approx(full_run.tasks["x3"].psnr)


def test_png_run_writes_a_checkpoint_that_reloads_with_every_task(tmp_path: Path, full_run: Any) -> None:
    run = full_run.run_dir
    assert sorted(p.name for p in (run / "phases").iterdir()) == [
        "00-x2-train",
        "01-x2-finetune",
        "02-x3-train",
        "03-x3-finetune",
    ]
    final = json.loads((run / "final.json").read_text())
    assert set(final["tasks"]) == {"x2", "x3"} and final["step"] == 4 + 2 + 3 + 2
    assert final["storage"]["png_bytes"] == full_run.storage.total_bytes
    # x2's outputs did not change while x3 trained: its phase checkpoint computes what the final one does
    after_x2, _ = model_from_checkpoint(
        run / "phases" / "01-x2-finetune" / "checkpoints" / "last.safetensors"
    )
    model, _ = model_from_checkpoint(run / "checkpoints" / "last.safetensors")
    check_nm(model)
    x = torch.rand(1, 3, 6, 6)
    assert torch.equal(_outputs(after_x2, 0, x), _outputs(model, 0, x))
    # eval/infer --task
    scored = evaluate_checkpoint(run / "checkpoints" / "last.safetensors", None, None, task="x3")
    assert scored["scale"] == 3 and scored["task"] == "x3"
    assert scored["cost"]["prunable_macs"] == pytest.approx(0.5 * scored["cost"]["prunable_dense_macs"])
    assert scored["png_storage"]["png_bytes"] == full_run.storage.total_bytes
    image = write_image(tmp_path / "lr.png", torch.rand(3, 10, 12))
    (out,) = infer_images(run, [image], tmp_path / "out", task="x3")
    assert read_image(out).shape == (30, 36, 3)
    with pytest.raises(SparsityError, match="unknown task 'x4'"):
        evaluate_checkpoint(run / "checkpoints" / "last.safetensors", None, None, task="x4")


def test_task_one_can_start_from_a_trained_single_task_model(tmp_path: Path) -> None:
    """steps.dense = 0 with train.init_from: the x2 upsampler and the trunk come from an edsr_small x2."""
    single_recipe = recipe_from_dict(tiny_recipe_dict())
    torch.manual_seed(5)
    single = create_model("edsr_small", scale=2, **TINY)
    meta = {"recipe": single_recipe.model_dump(mode="json"), "model": {"name": "edsr_small", "scale": 2}}
    path = save_checkpoint(tmp_path / "single.safetensors", single, meta)
    recipe = _png_recipe(steps={"dense": 0, "grow": 1, "finetune": 1})
    recipe["train"]["init_from"] = str(path)
    train(recipe_from_dict(recipe), tmp_path / "run", show_progress=False)
    start, _ = model_from_checkpoint(
        tmp_path / "run" / "phases" / "00-x2-train" / "checkpoints" / "last.safetensors"
    )
    x = torch.rand(1, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(_outputs(start, 0, x), single.eval()(x))
    bad = _png_recipe(steps={"dense": 0, "grow": 1, "finetune": 1})
    with pytest.raises(RecipeError, match="init_from"):
        train(recipe_from_dict(bad), tmp_path / "bad", show_progress=False)


def test_shipped_png_recipes_validate() -> None:
    for name in ("demo_png", "edsr_baseline_png_div2k"):
        recipe = load_recipe(name)
        assert isinstance(recipe.sparsity, PNGConfig)
        model = create_model(recipe.model.name, scale=recipe.model.scale, **recipe.model.kwargs)
        assert len(recipe.sparsity.ns) == len(model.tasks)  # type: ignore[attr-defined]
