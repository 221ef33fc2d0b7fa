"""torch.distributed support for extraction: ``torchrun`` / ``accelerate launch`` with no extra flags.

Launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; when ``WORLD_SIZE`` > 1
we join the process group (gloo on CPU, NCCL with one GPU per rank). Ranks split the cache shards round-robin,
write their own shard files, and rank 0 assembles the entry after a barrier.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

BARRIER_TIMEOUT = timedelta(hours=6)  # a rank may wait a long time for slower ranks on a big split


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we created the process group, so we tear it down

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.active:
            return [value]
        values = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def total(self, value: int) -> int:
        """Sum of ``value`` over all ranks."""
        return sum(self.gather(value))

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def joined() -> Dist:
    """The process group the caller's job already runs in (a training script's), which lowshot never tears down;
    one process when there is none."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Dist()


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched): for printing from rank 0 only."""
    return int(os.environ.get("RANK", "0") or 0)


def setup(device: str = "auto") -> tuple[Dist, str]:
    """Join the launcher's process group if there is one; returns it and the device this rank should use."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist(), device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    owns = False
    if not torch.distributed.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        torch.distributed.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)
        owns = True
    return Dist(rank, world, local_rank, owns), device
