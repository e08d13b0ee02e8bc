"""Which process this is, from torchrun's environment, and the collectives the trainer uses.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT) for each worker
it starts. With WORLD_SIZE > 1 the process group is initialised here: NCCL on CUDA, gloo on
the CPU. Every collective is a method of `World`, so a world of one runs none of them.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from oocid.distributed.stats import count_small
from oocid.errors import InputError

TIMEOUT_ENV = "OOCID_DIST_TIMEOUT"  # seconds a collective waits for the other ranks
DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    node: int = 0  # torchrun's GROUP_RANK: which machine
    local_size: int = 1  # processes on this machine (LOCAL_WORLD_SIZE)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (pickled: small objects only)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_tensor(self, t: Tensor) -> Tensor:
        """Rank 0's tensor (every rank passes one of the same shape and dtype)."""
        if self.distributed:
            t = t.contiguous()
            dist.broadcast(t, src=0)
        return t

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        """The element-wise sum over ranks of a few numbers (float64)."""
        if not self.distributed:
            return list(values)
        t0 = time.perf_counter()
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        out = [float(v) for v in t.tolist()]
        count_small(t.numel() * 8, t0)
        return out

    def all_sum_tensor(self, t: Tensor) -> Tensor:
        """The element-wise sum over ranks of a small tensor, left on its device (a new tensor:
        `t` is not changed). On a GPU nothing waits for the result here (the counted time is
        the call's, not the reduction's)."""
        if not self.distributed:
            return t
        t0 = time.perf_counter()
        t = t.clone()
        dist.all_reduce(t)
        count_small(t.numel() * t.element_size(), t0)
        return t

    def all_max(self, value: int, device: torch.device) -> int:
        if not self.distributed:
            return value
        t0 = time.perf_counter()
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out = int(t.item())
        count_small(8, t0)
        return out

    def all_gather_tensor(self, t: Tensor) -> list[Tensor]:
        """Every rank's tensor of the same shape, in rank order."""
        if not self.distributed:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(out, t.contiguous())
        return out


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """The world torchrun describes in `env` (os.environ); a world of one without it."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return World()
    try:
        size, rank = int(env["WORLD_SIZE"]), int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
        node = int(env.get("GROUP_RANK", "0"))
        local_size = int(env.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError as e:
        raise InputError(f"torchrun's environment is malformed ({e})") from e
    if size < 1 or not 0 <= rank < size or local < 0:
        raise InputError(f"torchrun's environment is inconsistent: RANK={rank}, "
                         f"WORLD_SIZE={size}, LOCAL_RANK={local}")
    return World(rank, size, local, node, max(1, local_size))


def start_world(world: World, device: torch.device) -> None:
    """Join the process group of `world` (nothing for a world of one)."""
    if not world.distributed or dist.is_initialized():
        return
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError as e:
        raise InputError(f"{TIMEOUT_ENV} must be a number of seconds ({e})") from e
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), **kw)


def stop_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(world: World, device: torch.device) -> torch.device:
    """One GPU per local rank under torchrun (cuda:LOCAL_RANK); the CPU is shared."""
    if world.distributed and str(device) == "cuda":  # "cuda" without an index
        return torch.device("cuda", world.local_rank)
    return device
