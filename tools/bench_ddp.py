#!/usr/bin/env python3
"""One process against two (torchrun, gloo, one thread each) on the small net, on the CPU.

    python3 tools/bench_ddp.py                       # demo set, 10 epochs, seeds 0 and 1
    python3 tools/bench_ddp.py --epochs 2 --seeds 0  # quicker
    python3 tools/bench_ddp.py --toy                 # tiny (the test)

Each run is `oocid train` as a user starts it (world 1: plain; world 2: `torchrun --standalone
--nproc-per-node 2 -m oocid train`) on the bundled demo set (10,000 train / 2,000 held-out
Fashion-MNIST images), with configs/demo.toml's recipe but InfoNCE (K 2048, t 0.1): the exact
softmax needs the whole bank in one process. Two world-2 variants: the same global batch as
world 1 (128 per process: the same steps, so the kNN isolates what the split changes), and the
same per-process batch (256 each, 512 global, half the steps, lr unchanged). A control: one
process whose BatchNorm normalises each half of the batch apart (what per-process statistics
over 128 images do), everything else as the one-process run; and 2 processes of 128 with
model.sync_batchnorm (BatchNorm over the global batch), with loss.negatives_from = "whole"
(negatives from rows of the whole bank, exchanged each step), and with both.

Reported per run: images/s of the last epoch (all processes), weighted kNN top-1 of the held-out
images against the bank (k 200, t 0.07, the end-of-run --val check), and for world 2 the
collectives per optimiser step, counted inside the trainer (OOCID_COMM_STATS): the gradient
all-reduce payload (DDP buckets; each rank sends about 2 (N-1)/N of it on a ring) and its time in
flight (overlapping the backward), and the step's small agreements (loss weight, finite check,
Z) with their blocking time; and what the alternative to rank-local negatives would cost: an
all-gather of K rows a step, timed with gloo here. Prints a table, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from oocid.data.writer import write_shards
from oocid.demo import demo_data_path

CONFIG = """
[model]
arch = "small"
sync_batchnorm = {sync}
[data]
image_size = 28
augment = "gray"
crop_scale_min = 0.5
in_memory = "yes"
mean = [0.286]
std = [0.353]
workers = 0
batch_size = {batch}
[loss]
kind = "infonce"
nce_k = {k}
negatives_from = "{source}"
temperature = 0.1
[optim]
epochs = {epochs}
lr = 0.03
weight_decay = 5e-4
schedule = "cosine"
[train]
seed = {seed}
threads = 1
eval_every = 0
knn_temperature = 0.07
"""
GATHER_K = 4096  # the paper's K, for the all-gather alternative
VARIANTS = (("1 process", 1, 256), ("2 processes, same global batch", 2, 128),
            ("2 processes, same batch each", 2, 256),
            ("1 process, BatchNorm over halves", 0, 256),  # world 0: the control below
            ("2 processes of 128, global BatchNorm", -2, 128),  # -2: model.sync_batchnorm
            ("2 processes of 128, negatives from the whole bank", -3, 128),
            ("2 processes of 128, global BatchNorm, whole-bank negatives", -4, 128))

# The control: one process whose BatchNorm sees each half of the batch apart, as two processes
# of 128 do with their own statistics (everything else as "1 process").
HALVES = """
import json, sys
from pathlib import Path
import torch
import oocid.train.loop as loop
from oocid.config import load_config

real = loop.build_model


class Halves(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.in_channels, self.out_dim = inner, inner.in_channels, inner.out_dim

    def forward(self, x):
        if not self.training or x.shape[0] < 4:
            return self.inner(x)
        h = x.shape[0] // 2
        return torch.cat([self.inner(x[:h]), self.inner(x[h:])])


loop.build_model = lambda *a, **k: Halves(real(*a, **k))
cfg, shards, val, bank, out = sys.argv[1:6]
res = loop.train(load_config(Path(cfg)), Path(shards), Path(bank), Path(out), val=Path(val),
                 progress=False)
print(json.dumps({"step": res.step, **res.metrics[-1]}))
"""


def shards(work: Path, toy: bool) -> tuple[Path, Path]:
    src = demo_data_path()
    if toy:
        with np.load(src) as z:
            arrays = {k: z[k] for k in z.files}
        for split, n in (("train", 400), ("test", 200)):
            arrays[f"{split}_images"] = arrays[f"{split}_images"][:n]
            arrays[f"{split}_labels"] = arrays[f"{split}_labels"][:n]
        src = work / "toy.npz"
        np.savez(src, **arrays)
    size = 50 if toy else 1000
    write_shards(src, work / "train", shard_size=size, seed=0, split="train", progress=False)
    write_shards(src, work / "val", shard_size=size, seed=0, split="test", progress=False)
    return work / "train", work / "val"


def run(work: Path, name: str, world: int, batch: int, epochs: int, seed: int, k: int,
        train: Path, val: Path) -> dict[str, Any]:
    cfg = work / f"{name}.toml"
    cfg.write_text(CONFIG.format(batch=batch, epochs=epochs, seed=seed, k=k,
                                 sync="true" if world in (-2, -4) else "false",
                                 source="whole" if world in (-3, -4) else "own"))
    world = 2 if world < 0 else world
    args = ["train", "--shards", str(train), "--val", str(val), "--bank",
            str(work / f"{name}.zarr"), "--out", str(work / name), "--config", str(cfg),
            "--no-progress"]
    launch = [sys.executable, "-m", "oocid"] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(world), "-m", "oocid"]
    if world == 0:  # the control: BatchNorm over halves of each batch, one process
        (work / "halves.py").write_text(HALVES)
        launch = [sys.executable, str(work / "halves.py"), str(cfg), str(train), str(val),
                  str(work / f"{name}.zarr"), str(work / name)]
        args = []
    stats = work / f"{name}.comm.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OOCID_COMM_STATS": str(stats)}
    t0 = time.perf_counter()
    p = subprocess.run(launch + args, env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"bench_ddp: {name} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    last = json.loads(p.stdout.strip().splitlines()[-1])
    out: dict[str, Any] = {"world": max(world, 1), "batch_per_process": batch,
                           "global_batch": max(world, 1) * batch,
                           "seed": seed, "epochs": epochs, "steps": last["step"],
                           "images_per_s": last["images_per_s"], "knn_top1": last["knn_top1"],
                           "wall_s": time.perf_counter() - t0}
    if stats.is_file():
        ranks = json.loads(stats.read_text())["ranks"]
        r0, steps = ranks[0], max(1, ranks[0]["steps"])
        out.update(grad_bytes_per_step=r0["grad_bytes"] / steps,
                   grad_ms_per_step=1e3 * max(r["grad_seconds"] for r in ranks) / steps,
                   small_bytes_per_step=r0["small_bytes"] / steps,
                   small_calls_per_step=r0["small_calls"] / steps,
                   small_ms_per_step=1e3 * max(r["small_seconds"] for r in ranks) / steps)
    return out


def _gather_worker(rank: int, world: int, port: int, k: int, dim: int, reps: int,
                   out: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    rows = torch.randn(k // world, dim)
    bufs = [torch.empty_like(rows) for _ in range(world)]
    for _ in range(3):
        dist.all_gather(bufs, rows)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        dist.all_gather(bufs, rows)
    if rank == 0:
        out.put((time.perf_counter() - t0) / reps)
    dist.destroy_process_group()


def allgather_negatives_ms(k: int = 4096, dim: int = 128, reps: int = 50) -> float:
    """The alternative to rank-local negatives: all-gather K / N rows from each of 2 ranks each
    step (K x D float32 in all). Measured with gloo on this machine, one thread per rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_gather_worker, args=(2, port, k, dim, reps, q), nprocs=2, join=True,
                       start_method="spawn")
    return 1e3 * float(q.get())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--k", type=int, default=2048, help="loss.nce_k (negatives per sample).")
    ap.add_argument("--toy", action="store_true",
                    help="400 / 200 images, 1 epoch, 1 seed, the first two variants")
    ap.add_argument("--work", type=Path, default=None, help="Keep the runs here.")
    ap.add_argument("--variants", type=int, nargs="+", default=None,
                    help="Run only these rows of the table (1 to 7).")
    a = ap.parse_args()
    epochs, seeds, k = (1, a.seeds[:1], 64) if a.toy else (a.epochs, a.seeds, a.k)
    variants = VARIANTS[:2] if a.toy else VARIANTS
    if a.variants:
        variants = tuple(VARIANTS[i - 1] for i in a.variants)
    with tempfile.TemporaryDirectory(prefix="bench_ddp-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        train, val = shards(work, a.toy)
        rows = []
        for seed in seeds:
            for label, world, batch in variants:
                name = f"w{world}-b{batch}-s{seed}"
                r = run(work, name, world, batch, epochs, seed, k, train, val)
                rows.append({"variant": label, **r})
                print(f"# {name}: {r['wall_s']:.0f} s", file=sys.stderr, flush=True)
    print(f"{'variant':34} {'seed':>4} {'steps':>6} {'img/s':>7} {'kNN top-1':>9} "
          f"{'grad MB/step':>12} {'grad ms/step':>12} {'small B/step':>12} {'small ms/step':>13}")
    for r in rows:
        extra = (f"{r['grad_bytes_per_step'] / 2**20:12.2f} {r['grad_ms_per_step']:12.1f} "
                 f"{r['small_bytes_per_step']:12.0f} {r['small_ms_per_step']:13.2f}") \
            if "grad_bytes_per_step" in r else f"{'-':>12} {'-':>12} {'-':>12} {'-':>13}"
        print(f"{r['variant']:34} {r['seed']:>4} {r['steps']:>6} {r['images_per_s']:7.0f} "
              f"{r['knn_top1']:9.4f} {extra}")
    gather_ms = allgather_negatives_ms(k=GATHER_K)
    print(f"all-gather of K = {GATHER_K} negatives (x 128 float32) from 2 ranks instead of "
          f"rank-local draws: {gather_ms:.2f} ms a step (gloo, this machine)")
    print(json.dumps({"runs": rows, "allgather_negatives_ms": gather_ms, "gather_k": GATHER_K}))


if __name__ == "__main__":
    main()
