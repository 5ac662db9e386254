"""Data-parallel training under ``torchrun``: process group, rank slices and collectives.

``python -m fastchar.train`` reads torchrun's ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` and joins the process group (gloo on CPU, nccl on CUDA) through
the usual ``env://`` rendezvous, so multi-node runs take torchrun's own
``--nnodes --node-rank --rdzv-*`` flags. Every collective here is a no-op in a
single process, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistError(ValueError):
    """torchrun's environment is unusable; the message says which variable."""


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks (rank 0 of 1 when alone)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def rows(self, n: int) -> slice:
        """This rank's share of ``n`` rows of a global batch (n divisible by size)."""
        share = n // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def mean(self, values: list[float]) -> list[float]:
        """Element-wise mean of ``values`` over ranks (NaN on any rank makes it NaN)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return (t / self.size).tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on at least one."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj: object) -> list[object]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[object] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def cat_rows(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The ranks' slices of a batch-sharded tensor joined along ``dim`` in rank order."""
        if not self.distributed:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise DistError(f"environment variable {name}={value!r} is not an integer") from None


def world_from_env() -> World:
    """The torchrun world this process belongs to; ``World()`` without torchrun."""
    if "WORLD_SIZE" not in os.environ:
        return World()
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise DistError(f"WORLD_SIZE is set but {', '.join(missing)} is not; start with torchrun")
    world = World(_env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK"))
    if world.size < 1 or not 0 <= world.rank < world.size:
        raise DistError(f"RANK={world.rank} does not fit WORLD_SIZE={world.size}")
    return world


def init(world: World, device: torch.device) -> torch.device:
    """Join the process group for ``world``; returns this rank's device.

    CUDA ranks get ``cuda:LOCAL_RANK`` and nccl; every other device uses gloo.
    """
    if world.size == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(
        backend, rank=world.rank, world_size=world.size, timeout=datetime.timedelta(minutes=10)
    )
    return device


def shutdown() -> None:
    """Leave the process group once every rank is done with it."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
