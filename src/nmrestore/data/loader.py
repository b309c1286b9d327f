"""DataLoaders for training (shuffled, sharded, exactly reproducible) and evaluation (one image at a time).

Reproducibility rests on :class:`~nmrestore.data.datasets.SRTrainDataset`: sample ``i`` of epoch
``e`` is a pure function of ``(seed, e, i)``. The loader only has to decide *which* indices go in
which batch, and it does so in the main process from a seeded permutation, so the stream of batches
is the same whatever the number of workers (0, 2, 8), with or without persistent workers, and after
a restart from a checkpoint (``epoch_start``, and ``set_epoch(e, skip_batches=k)`` mid-epoch).

The sampler yields ``(epoch, index)`` pairs rather than bare indices: persistent workers keep their
own copy of the dataset, so an epoch set on the dataset in the main process would never reach them,
while the indices they receive always carry it.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Iterator, Sized
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from nmrestore.errors import DatasetError

__all__ = ["EpochSampler", "build_eval_loader", "build_train_loader"]


class EpochSampler(Sampler[tuple[int, int]]):
    """Seeded shuffling (and DDP sharding) that yields ``(epoch, index)`` pairs.

    Wraps a ``DistributedSampler`` (``num_replicas=1`` when not distributed), which permutes with a
    generator seeded from ``seed + epoch`` and pads/drops so every rank gets the same count.
    Each ``iter()`` uses the current epoch and then advances it by one, so a loop that never calls
    :meth:`set_epoch` still gets a new order every epoch; calling ``set_epoch(e)`` before iterating
    (the DistributedSampler habit) selects ``e`` explicitly.
    """

    def __init__(
        self,
        dataset: Sized,
        seed: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        epoch_start: int = 0,
    ) -> None:
        self.inner = DistributedSampler(
            dataset,  # type: ignore[arg-type]  # only len() is used
            num_replicas=num_replicas,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.batch_size = batch_size
        self.epoch = operator.index(epoch_start)
        self._skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Make the next iteration epoch ``epoch``, starting after its first ``skip_batches`` batches.

        ``skip_batches`` is for resuming mid-epoch: the batches that follow are exactly those an
        uninterrupted run would have produced.
        """
        epoch, skip_batches = operator.index(epoch), operator.index(skip_batches)
        if epoch < 0 or skip_batches < 0:
            raise ValueError(f"epoch and skip_batches must be non-negative, got {epoch}, {skip_batches}")
        self.epoch = epoch
        self._skip = skip_batches * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.epoch, self._skip
        self.inner.set_epoch(epoch)
        indices = list(self.inner)[skip:]
        self.epoch, self._skip = epoch + 1, 0
        return iter([(epoch, i) for i in indices])

    def __len__(self) -> int:
        return max(0, len(self.inner) - self._skip)


def _seed_worker(worker_id: int, seed: int, rank: int) -> None:
    """Seed Python's and numpy's global RNGs in each worker (torch's is seeded by the DataLoader).

    The SR datasets do not use global RNGs, but any user transform that does would otherwise get
    the same numpy state in every forked worker (and on every rank).
    """
    worker_seed = int(np.random.SeedSequence([seed, rank, worker_id]).generate_state(1)[0])
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    distributed: bool,
    epoch_start: int = 0,
) -> DataLoader:
    """Training DataLoader: seeded shuffle, DDP sharding when ``distributed``, incomplete batches dropped.

    ``loader.sampler`` is an :class:`EpochSampler`; each pass over the loader is the next epoch,
    starting at ``epoch_start`` (or call ``loader.sampler.set_epoch(e)``). The dataset must accept
    ``(epoch, index)`` indices, as :class:`~nmrestore.data.datasets.SRTrainDataset` does. Batches are
    reproducible whatever ``num_workers``: workers only compute samples whose content is fixed by
    (seed, epoch, index). Workers are persistent (no re-fork every epoch); memory is pinned only
    when CUDA is available.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DatasetError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise DatasetError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
        num_replicas, rank = dist.get_world_size(), dist.get_rank()
    else:
        num_replicas, rank = 1, 0
    sampler = EpochSampler(
        dataset,  # type: ignore[arg-type]
        seed=seed,
        batch_size=batch_size,
        num_replicas=num_replicas,
        rank=rank,
        epoch_start=epoch_start,
    )
    if len(sampler) < batch_size:
        raise DatasetError(
            f"{len(dataset)} samples per epoch over {num_replicas} process(es) give {len(sampler)} per"  # type: ignore[arg-type]
            f" process, fewer than one batch of {batch_size}"
        )
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        persistent_workers=num_workers > 0,
        worker_init_fn=partial(_seed_worker, seed=seed, rank=rank) if num_workers > 0 else None,
        generator=generator,
    )


def build_eval_loader(dataset: Dataset) -> DataLoader:
    """Evaluation DataLoader: one whole image per batch (sizes differ), in order, no workers."""
    return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)
