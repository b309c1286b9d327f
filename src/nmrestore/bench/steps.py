"""Training-step time of every benchmarked model, interleaved (:mod:`nmrestore.runtime.timing`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmrestore.bench.config import BenchConfig, dense_recipe
from nmrestore.engine.runner import (
    build_train_dataset,
)
from nmrestore.runtime.timing import Timings, interleaved
from nmrestore.sparsity.api import Controller


@dataclass
class Timed:
    """A trained model kept for the step-time measurement (with its controller, if any)."""

    model: nn.Module
    controller: Controller | None = None


def training_batch(config: BenchConfig) -> dict[str, Tensor]:
    recipe = dense_recipe(config)
    dataset = build_train_dataset(recipe)
    samples = [dataset[i] for i in range(config.batch_size)]
    return {key: torch.stack([s[key] for s in samples]) for key in ("lq", "gt")}


def measure_step_times(
    models: dict[str, Timed],
    batch: dict[str, Tensor],
    rounds: int,
    warmup: int = 1,
    lr: float = 1e-6,
    first_step: int = 1,
) -> Timings:
    """Seconds per training step of each model on the same batch, interleaved (:mod:`~nmrestore.runtime.timing`).

    A step is what the Trainer does: forward, L1 loss (+ the controller's regularizer), backward,
    Adam step, ``controller.step`` (SR-STE's rank refresh happens here).
    """
    optimizers = {
        key: torch.optim.Adam([p for p in t.model.parameters() if p.requires_grad], lr=lr)
        for key, t in models.items()
    }
    steps = dict.fromkeys(models, first_step)  # each model steps once per round

    def train_step(key: str) -> None:
        timed = models[key]
        model = timed.model
        device = next(model.parameters()).device
        lq, gt = batch["lq"].to(device), batch["gt"].to(device)
        model.train()
        loss = F.l1_loss(model(lq), gt)
        if timed.controller is not None:
            for extra in timed.controller.regularizer().values():
                loss = loss + extra
        optimizers[key].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[key].step()
        if timed.controller is not None:
            timed.controller.step(steps[key])
        steps[key] += 1

    cuda = any(next(t.model.parameters()).device.type == "cuda" for t in models.values())
    return interleaved(
        {key: partial(train_step, key) for key in models},
        rounds,
        warmup,
        sync=torch.cuda.synchronize if cuda else None,
    )
