"""Data-parallel calibration on torch.distributed.

Launched by torchrun (`torchrun --nproc-per-node K -m ghostlayers prune …`, or with torchrun's --nnodes and
rendezvous flags across machines), every rank loads the model and draws the same windows; each `capture` then runs
only its share of them (every K-th window) and all-reduces the float64 sums, so every rank ends with the sums of
all windows and makes the same selection and fit; rank 0 writes the output. gloo carries the sums between CPU
processes, nccl between GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import GhostlayersError


def launched() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def device_for(device: str) -> str:
    """Under torchrun on GPUs, each rank takes the GPU of its LOCAL_RANK (also for an explicit cuda:N, which would
    put every rank on one GPU); on CPU the device is kept."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if (device == "auto" and torch.cuda.is_available()) or device.startswith("cuda"):
        return f"cuda:{local}"
    return device


@contextmanager
def process_group(device: str) -> Iterator[None]:
    """Join the group torchrun describes for the duration (nccl for a CUDA device, gloo otherwise); a no-op when
    not launched by torchrun or when a group already exists."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    if not dist.is_available():
        raise GhostlayersError("this torch build has no torch.distributed: run without torchrun")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class Sharding:
    """Which share of the windows this process captures, and how the shares' sums are added: passed explicitly to
    the capture driver (`capture.collect`); `current()` is this process's group (one rank when not launched)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, windows: Tensor, masks: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """This rank's windows: every world-th one, starting at its rank (all of them for one rank)."""
        if self.world == 1:
            return windows, masks
        return windows[self.rank :: self.world], None if masks is None else masks[self.rank :: self.world]

    def all_reduce(self, tensors: list[Tensor], counts: list[int]) -> list[int]:
        """Sum `tensors` in place and `counts` over every rank; returns the summed counts. A no-op for one rank."""
        if self.world == 1:
            return counts
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        ref = tensors[0] if tensors else torch.zeros(1)
        total = torch.tensor(counts, dtype=torch.float64, device=ref.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return [int(v) for v in total.tolist()]


def current() -> Sharding:
    """The sharding of this process: its rank in the torch.distributed group, or one rank alone."""
    return Sharding(rank(), world_size())


def shard(windows: Tensor, masks: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """This rank's windows under the current group (see `Sharding.shard`)."""
    return current().shard(windows, masks)
