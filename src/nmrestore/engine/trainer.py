"""The generic Trainer: a task's loss dict + a method's controller, one process or DDP.

What it guarantees:

* every RNG is seeded and the data stream is a pure function of (seed, epoch, index), so a run
  killed at any point and resumed from its last checkpoint ends with the same weights;
* checkpoints (``last`` and ``best``) are written atomically by rank 0 only;
* a NaN/Inf loss stops training with :class:`TrainingError` before it can reach the weights, and the
  last good checkpoint stays on disk.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from nmrestore.engine.checkpoint import Checkpoint, save_checkpoint
from nmrestore.engine.distributed import DistInfo, all_reduce_mean, barrier, replicas_identical
from nmrestore.engine.evaluate import EvalResult
from nmrestore.engine.task import RestorationTask
from nmrestore.errors import TrainingError
from nmrestore.recipes.schema import Schedule, TrainSpec
from nmrestore.sparsity.api import Controller

log = logging.getLogger("nmrestore.train")


def lr_factor(schedule: Schedule, step: int, total: int) -> float:
    """Learning-rate multiplier at ``step`` (a pure function, so resuming needs no scheduler state)."""
    if schedule.kind == "constant":
        return 1.0
    if schedule.kind == "cosine":
        progress = min(step / max(total, 1), 1.0)
        floor = schedule.min_lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    milestones = [m * total if m <= 1 else m for m in schedule.milestones]
    return schedule.gamma ** sum(step >= m for m in milestones)


@dataclass
class TrainState:
    step: int = 0
    best_psnr: float = -math.inf
    best_step: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)


Validator = Callable[[nn.Module], EvalResult]


class Trainer:
    """Runs ``spec.steps`` optimizer steps of ``task`` on ``model``.

    Args:
        model: the (possibly sparsified) network, already on ``dist.device``.
        task: turns a batch into a dict of losses.
        loader: the training DataLoader (its sampler is an ``EpochSampler``).
        spec: the recipe's ``train`` section.
        run_dir: where checkpoints, ``metrics.jsonl`` and TensorBoard logs go.
        meta: recipe and model description stored in every checkpoint.
        controller: the sparsity method's training-time state, if any.
        validate: scores the model on the validation set (rank 0 only).
        dist: process/device information.
        show_progress: draw a progress bar (rank 0).
    """

    def __init__(
        self,
        model: nn.Module,
        task: RestorationTask,
        loader: DataLoader,
        spec: TrainSpec,
        run_dir: Path,
        meta: dict[str, Any],
        controller: Controller | None = None,
        validate: Validator | None = None,
        dist: DistInfo | None = None,
        show_progress: bool = True,
    ) -> None:
        self.model = model
        self.task = task
        self.loader = loader
        self.spec = spec
        self.run_dir = Path(run_dir)
        self.meta = meta
        self.controller = controller
        self.validate = validate
        self.dist = dist or DistInfo()
        self.show_progress = show_progress and self.dist.is_main
        self.state = TrainState()
        self.optimizer = self._build_optimizer()
        self.net: nn.Module = model
        if self.dist.distributed:
            self.net = DistributedDataParallel(
                model,
                device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None,
                # e.g. SLS scores leave the graph once N is frozen
                find_unused_parameters=controller is not None and controller.find_unused_parameters,
            )
        self._writer = self._tensorboard() if spec.tensorboard and self.dist.is_main else None

    # -- set-up ---------------------------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        groups: list[dict[str, Any]] = []
        special: set[int] = set()
        if self.controller is not None:
            for group in self.controller.param_groups(self.model):
                groups.append(group)
                special.update(id(p) for p in group["params"])
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in special]
        groups.insert(0, {"params": rest})
        for group in groups:
            group.setdefault("lr", self.spec.lr)
            group["initial_lr"] = group["lr"]
        return torch.optim.Adam(groups, lr=self.spec.lr, betas=self.spec.betas, weight_decay=self.spec.weight_decay)

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional dependency
            log.warning("tensorboard is not installed; pip install 'nmrestore[tensorboard]' to log there")
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    # -- checkpoints ----------------------------------------------------------------------------
    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from a checkpoint written by this Trainer (``--resume``)."""
        if ckpt.optimizer_state is not None:
            self.optimizer.load_state_dict(ckpt.optimizer_state)
        if ckpt.rng_state is not None:
            torch.set_rng_state(ckpt.rng_state)
        train_state = ckpt.meta.get("train_state", {})
        self.state = TrainState(
            step=ckpt.step,
            best_psnr=float(train_state.get("best_psnr", -math.inf)),
            best_step=int(train_state.get("best_step", -1)),
        )
        if self.controller is not None and "controller" in ckpt.meta:
            self.controller.load_state_dict(ckpt.meta["controller"])

    def _save(self, name: str, metrics: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        meta = {
            **self.meta,
            "step": self.state.step,
            "metrics": metrics,
            "train_state": {"best_psnr": self.state.best_psnr, "best_step": self.state.best_step},
        }
        if self.controller is not None:
            meta["controller"] = self.controller.state_dict()
        save_checkpoint(self.run_dir / "checkpoints" / f"{name}.safetensors", self.model, meta, self.optimizer)

    # -- loop -----------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict[str, Tensor]]:
        per_epoch = len(self.loader)
        epoch, skip = divmod(self.state.step, per_epoch)
        sampler = self.loader.sampler
        while True:
            sampler.set_epoch(epoch, skip_batches=skip)  # type: ignore[attr-defined]
            yield from self.loader
            epoch, skip = epoch + 1, 0

    def _log(self, record: dict[str, Any]) -> None:
        self.state.history.append(record)
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self._writer.add_scalar(key, value, record["step"])

    def _run_validation(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if self.validate is not None and self.dist.is_main:
            result = self.validate(self.model)
            metrics = {"val_psnr": result.psnr, "val_ssim": result.ssim}
            if result.psnr > self.state.best_psnr:
                self.state.best_psnr, self.state.best_step = result.psnr, self.state.step
                self._save("best", metrics)
        barrier(self.dist)
        return metrics

    def fit(self) -> TrainState:
        """Train until ``spec.steps``; returns the final state (history, best PSNR)."""
        spec = self.spec
        device = self.dist.device
        amp = spec.amp and device.type == "cuda"
        batches = self._batches()
        progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not self.show_progress,
            transient=False,
        )
        self.net.train()
        window: list[float] = []
        started = time.perf_counter()
        with progress:
            bar = progress.add_task("train", total=spec.steps, completed=self.state.step, info="")
            while self.state.step < spec.steps:
                batch = next(batches)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, Tensor)}
                factor = lr_factor(spec.schedule, self.state.step, spec.steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * factor
                with torch.autocast("cuda", dtype=torch.float16) if amp else nullcontext():
                    losses = self.task.losses(self.net, batch)
                if self.controller is not None:
                    losses.update(self.controller.regularizer())
                total = sum(losses.values())
                assert isinstance(total, Tensor)
                if not torch.isfinite(total):
                    raise TrainingError(
                        f"loss became {total.item()} at step {self.state.step} "
                        f"({', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())}); "
                        f"the last good checkpoint is kept in {self.run_dir / 'checkpoints'}"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                total.backward()
                if spec.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), spec.grad_clip)
                self.optimizer.step()
                self.state.step += 1
                if self.controller is not None:
                    self.controller.step(self.state.step)
                    if self.state.step == spec.steps:
                        self.controller.finalize()  # e.g. SLS: a run never ends above its budget
                window.append(float(total.item()))
                step = self.state.step
                if step % spec.log_every == 0 or step == spec.steps:
                    record: dict[str, Any] = {
                        "step": step,
                        "loss": all_reduce_mean(sum(window) / len(window), self.dist),
                        "lr": spec.lr * factor,
                        "time": time.perf_counter() - started,
                    }
                    record.update({k: float(v.item()) for k, v in losses.items()})
                    window.clear()
                    self._log(record)
                    progress.update(bar, info=f"loss {record['loss']:.4f}")
                metrics: dict[str, Any] = {}
                if step % spec.val_every == 0 or step == spec.steps:
                    metrics = self._run_validation()
                    if metrics:
                        self._log({"step": step, **metrics})
                        progress.update(bar, info=f"val PSNR {metrics['val_psnr']:.2f} dB")
                if step % spec.ckpt_every == 0 or step == spec.steps:
                    self._save("last", metrics)
                    barrier(self.dist)
                progress.update(bar, completed=step)
        identical = replicas_identical(self.model, self.dist)
        self._log({"step": self.state.step, "replicas_identical": identical, "world_size": self.dist.world_size})
        if self._writer is not None:
            self._writer.close()
        return self.state
