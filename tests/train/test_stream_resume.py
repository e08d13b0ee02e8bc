"""Streamed training with two DataLoader workers whose shares end in short batches: the loop
trains whole batches of `data.batch_size` (the short ones joined), counts the steps it takes,
and a run stopped just before a joined batch and resumed equals the uninterrupted one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import tiny_config, tiny_npz

from oocid.bank.store import open_store
from oocid.config import Config
from oocid.data.batch import Batch
from oocid.data.stream import StreamData
from oocid.data.writer import write_shards
from oocid.train.loop import train

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def config() -> Config:
    cfg = tiny_config(kind="nce", nce_k=8, z="ema")
    cfg.data.in_memory, cfg.data.workers, cfg.data.shuffle_buffer = "no", 2, 16
    cfg.train.checkpoint_every = 0
    return cfg


def test_two_workers_train_whole_batches_and_resume_exactly(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """96 images in 6 shards of 16, batches of 32, 2 workers: each worker's share is 48 = 32 + 16,
    so an epoch is two whole worker batches and one joined from the two short ones (3 steps,
    not 4). Stopped after 5 steps (epoch 2, before its joined batch) and resumed: the same
    losses, bank and weights as the run that was not stopped."""
    tr = tmp_path / "tr"
    write_shards(tiny_npz(tmp_path / "tiny.npz"), tr, shard_size=16, seed=0, progress=False)
    sizes: list[int] = []
    make = StreamData._batch

    def recording(self: StreamData, parts: list[dict[str, Any]]) -> Batch:
        sizes.append(len(parts))
        b = make(self, parts)
        sizes.append(len(b.index))
        return b

    monkeypatch.setattr(StreamData, "_batch", recording)
    cfg = config()
    full = train(cfg, tr, tmp_path / "a.npy", tmp_path / "a", progress=False, log=lambda m: None)
    assert full.step == 3 * 3
    assert sizes == [1, 32, 1, 32, 2, 32] * 3  # (parts, samples) of each batch trained
    sizes.clear()
    part = train(cfg, tr, tmp_path / "b.npy", tmp_path / "b", progress=False, max_steps=5,
                 log=lambda m: None)
    assert part.step == 5
    rest = train(cfg, tr, tmp_path / "b.npy", tmp_path / "b", progress=False, resume=True,
                 log=lambda m: None)
    assert rest.step == 9
    stopped, resumed = [1, 32, 1, 32, 2, 32, 1, 32, 1, 32], [2, 32, 1, 32, 1, 32, 2, 32]
    assert sizes == [*stopped, *resumed]
    assert [m["loss"] for m in full.metrics] == [m["loss"] for p in (part, rest) for m in p.metrics]
    with open_store(tmp_path / "a.npy") as a, open_store(tmp_path / "b.npy") as b:
        assert np.array_equal(a.read_rows(0, a.n_rows), b.read_rows(0, b.n_rows))
    sa = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    sb = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_an_epoch_resumed_with_other_workers_keeps_the_order_it_started_with(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker count decides which samples each worker shuffles together. Stopped inside an
    epoch streamed by 2 workers and resumed with 3, the epoch finishes in the order it started
    with (every image once), says so, and the next epoch streams with 3."""
    tr = tmp_path / "tr"
    write_shards(tiny_npz(tmp_path / "tiny.npz"), tr, shard_size=16, seed=0, progress=False)
    seen: list[list[int]] = []
    workers: list[int | None] = []
    make, stream = StreamData._batch, StreamData.worker_batches

    def recording(self: StreamData, parts: list[dict[str, Any]]) -> Batch:
        b = make(self, parts)
        seen.append(b.index.tolist())
        return b

    def counting(self: StreamData, epoch: int, nw: int | None = None) -> Any:
        workers.append(self.workers if nw is None else nw)
        return stream(self, epoch, nw)

    monkeypatch.setattr(StreamData, "_batch", recording)
    monkeypatch.setattr(StreamData, "worker_batches", counting)
    cfg = config()
    train(cfg, tr, tmp_path / "b.npy", tmp_path / "b", progress=False, max_steps=2,
          log=lambda m: None)
    cfg.data.workers = 3
    said: list[str] = []
    rest = train(cfg, tr, tmp_path / "b.npy", tmp_path / "b", progress=False, resume=True,
                 log=said.append)
    assert rest.step == 9
    first = [i for b in seen[:3] for i in b]
    assert sorted(first) == list(range(96))  # the stopped epoch: every image exactly once
    assert workers == [2, 2, 3, 3]  # stopped run; resumed epoch 1, then epochs 2 and 3
    assert any("started with 2 data workers" in m for m in said)
