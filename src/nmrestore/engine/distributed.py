"""One process or ``torchrun --nproc_per_node=N``: rank, device and process-group set-up."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import distributed_c10d


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from nmrestore.errors import NMRestoreError

            raise NMRestoreError("train.device is 'cuda' but CUDA is not available on this machine")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank, device)


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()


def shutdown(info: DistInfo, together: bool = True) -> None:
    """Leave the process group; ``together`` waits for every rank first.

    A rank that tears gloo down while rank 0 still works (final validation, report) can abort in
    gloo's destructor ("terminate called without an active exception"), failing a finished run; so can
    one that tears it down while another is still inside the barrier (seen once in three test-suite runs
    with the barrier alone), hence a second barrier through the rendezvous store, outside gloo. After
    an error the other ranks may never arrive, so that path leaves at once.
    """
    if info.distributed and dist.is_initialized():
        if together:
            dist.barrier()
            _store_barrier(info, "nmrestore/shutdown/" + os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        dist.destroy_process_group()


def _store_barrier(info: DistInfo, key: str, timeout_s: float = 300.0) -> None:
    """Wait until every rank has reached this point, counting on the process group's store (TCP)."""
    store = distributed_c10d._get_default_store()
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < info.world_size and time.monotonic() < deadline:
        time.sleep(0.005)


@contextmanager
def distributed_run(device_preference: str = "auto") -> Iterator[DistInfo]:
    """One training run's process group: joined on entry (under torchrun), left on exit, even on error."""
    info = init_distributed(device_preference)
    try:
        yield info
    except BaseException:
        shutdown(info, together=False)
        raise
    shutdown(info)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every tensor in the state dict (to compare replicas)."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return h.hexdigest()


def replicas_identical(model: nn.Module, info: DistInfo) -> bool:
    """True when every rank holds bit-identical weights (always True in one process)."""
    if not info.distributed:
        return True
    digests: list[str | None] = [None] * info.world_size
    dist.all_gather_object(digests, weights_digest(model))
    return len(set(digests)) == 1


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size
