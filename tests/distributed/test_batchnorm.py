"""GlobalBatchNorm2d on two gloo processes equals one process's BatchNorm2d over the two
batches together: outputs, parameter gradients (summed over the processes) and running
statistics; and a process with no batch (IDLE_FORWARD) joins with nothing of its own."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from oocid.distributed.batchnorm import global_batchnorm
from oocid.method.npid import IDLE_FORWARD


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 3, 3), torch.nn.BatchNorm2d(3))


def batch() -> torch.Tensor:
    return torch.randn(10, 2, 9, 9, generator=torch.Generator().manual_seed(1))


def weights(n: int, first: int) -> torch.Tensor:
    """A fixed, non-uniform weight per output entry of samples first..first+n-1."""
    return torch.arange(first * 75, (first + n) * 75).float().sin().view(n, 3, 5, 5)


def worker(rank: int, port: int, out: str, idle: bool) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    m = global_batchnorm(net())
    x = batch()
    if idle and rank == 1:  # no batch: an idle forward joins the statistics with nothing
        token = IDLE_FORWARD.set(True)
        m.eval()
        y = m(torch.zeros(2, 2, 9, 9))
        IDLE_FORWARD.reset(token)
        (y.sum() * 0).backward()
    else:
        part, first = (x[:6], 0) if rank == 0 else (x[6:], 6)
        if idle:
            part, first = x, 0
        y = m(part)
        (y * weights(len(part), first)).sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    for g in grads:
        dist.all_reduce(g)
    torch.save({"y": y.detach(), "grads": grads, "rm": m[1].running_mean,
                "rv": m[1].running_var}, Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


def run(tmp: Path, idle: bool) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(port, str(tmp), idle), nprocs=2, start_method="spawn")
    return [torch.load(tmp / f"{r}.pt") for r in (0, 1)]


def reference() -> tuple[torch.Tensor, list[torch.Tensor], torch.nn.Module]:
    m = net()
    y = m(batch())
    (y * weights(10, 0)).sum().backward()
    return y.detach(), [p.grad for p in m.parameters()], m


def test_global_batchnorm_equals_one_process_over_the_whole_batch(tmp_path: Path) -> None:
    res = run(tmp_path, idle=False)
    y, grads, m = reference()
    assert torch.allclose(torch.cat([res[0]["y"], res[1]["y"]]), y, atol=1e-5)
    for a, b in zip(res[0]["grads"], grads, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert torch.allclose(res[0]["rm"], m[1].running_mean, atol=1e-6)
    assert torch.allclose(res[1]["rv"], m[1].running_var, atol=1e-6)


def test_an_idle_process_adds_nothing(tmp_path: Path) -> None:
    res = run(tmp_path, idle=True)  # rank 0 has all 10 images, rank 1 none
    y, grads, m = reference()
    assert torch.allclose(res[0]["y"], y, atol=1e-5)
    for a, b in zip(res[0]["grads"], grads, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    for r in res:  # both processes keep the same running statistics
        assert torch.allclose(r["rm"], m[1].running_mean, atol=1e-6)
