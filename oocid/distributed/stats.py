"""Counts of what a multi-process run sends, for `tools/bench_ddp.py`.

With OOCID_COMM_STATS=FILE in the environment, the gradient all-reduce goes through a counting
DDP communication hook (the same division and all-reduce as DDP's default hook) and rank 0
writes every rank's counts to FILE as JSON when training ends. Without it nothing is hooked."""

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ENV = "OOCID_COMM_STATS"


@dataclass
class CommStats:
    grad_calls: int = 0  # bucket all-reduces
    grad_bytes: int = 0  # their payload (each rank sends about 2 (N-1)/N of it on a ring)
    grad_seconds: float = 0.0  # from issue to completion (overlaps the backward)
    small_calls: int = 0  # the step's agreements and the end-of-epoch sums
    small_bytes: int = 0
    small_seconds: float = 0.0
    steps: int = 0


STATS = CommStats()


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def count_small(nbytes: int, t0: float) -> None:
    STATS.small_calls += 1
    STATS.small_bytes += nbytes
    STATS.small_seconds += time.perf_counter() - t0


def counting_hook(state: Any, bucket: dist.GradBucket  # type: ignore[name-defined]
                  ) -> torch.futures.Future[torch.Tensor]:
    """DDP's default all-reduce (divide by the world size, sum), counted. (Annotations are
    evaluated here: DDP checks the hook's signature against the real types.)"""
    t0 = time.perf_counter()
    buf = bucket.buffer()
    STATS.grad_calls += 1
    STATS.grad_bytes += buf.numel() * buf.element_size()
    buf.div_(dist.get_world_size())
    fut = dist.all_reduce(buf, async_op=True).get_future()

    def done(f: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        STATS.grad_seconds += time.perf_counter() - t0
        return f.value()[0]

    return fut.then(done)


def write_stats(every: list[dict[str, Any]]) -> None:
    path = os.environ.get(ENV)
    if path:
        Path(path).write_text(json.dumps({"ranks": every}) + "\n")


def mine() -> dict[str, Any]:
    return asdict(STATS)
