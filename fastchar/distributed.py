"""Data-parallel training under ``torchrun``: process group, rank slices and collectives.

``python -m fastchar.train`` reads torchrun's ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` and joins the process group (gloo on CPU, nccl on CUDA) through
the usual ``env://`` rendezvous, so multi-node runs take torchrun's own
``--nnodes --node-rank --rdzv-*`` flags. Every collective here is a no-op in a
single process, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastchar.training.errors import first_line

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistError(ValueError):
    """torchrun's environment is unusable; the message says which variable."""


class PeerFailed(RuntimeError):
    """Another rank failed in a step that every rank takes together; says which and why."""


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

    @contextlib.contextmanager
    def together(self):
        """Runs a block that may fail on some ranks only (rank 0's file writes, one rank's
        copy of the data) and holds no collective: where it fails on any rank it raises on
        every rank (the rank's own error, else PeerFailed naming the first rank that
        failed), so that no rank is left waiting in a collective for one that has gone.
        A synchronisation point, like ``barrier``."""
        if not self.distributed:
            yield
            return
        error = None
        try:
            yield
        except Exception as e:
            error = e
        whys = self.gather(None if error is None else first_line(error))
        if error is not None:
            raise error
        for rank, why in enumerate(whys):
            if why is not None:
                raise PeerFailed(f"rank {rank} failed: {why}")

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


def launched() -> bool:
    """Whether torchrun (or another launcher) set WORLD_SIZE for several processes."""
    return os.environ.get("WORLD_SIZE", "1") not in ("", "1")


def world_from_env() -> World:
    """The torchrun world this process belongs to; ``World()`` without torchrun."""
    if os.environ.get("WORLD_SIZE", "") == "":
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
    try:
        dist.init_process_group(
            backend, rank=world.rank, world_size=world.size, timeout=datetime.timedelta(minutes=10)
        )
    except (ValueError, dist.DistError) as e:  # MASTER_ADDR/PORT unset, no rendezvous
        raise DistError(
            f"cannot join the process group: {first_line(e)}; start with torchrun"
        ) from None
    return device


def shutdown(wait: bool = True) -> None:
    """Leave the process group once every rank is done with it (``wait``), or at once:
    a rank that failed must not wait in a barrier that the others, still in their
    collectives, never reach (its exit ends theirs)."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
