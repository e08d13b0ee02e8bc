"""A run's state between steps (`RunState`), an epoch's running totals, and the checkpoint that
pairs them with the bank's commit."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from oocid.bank.cache import ChunkCache
from oocid.checkpoint import finish_checkpoint, save_checkpoint
from oocid.config import Config
from oocid.data.batch import TrainData
from oocid.data.manifest import Manifest
from oocid.data.stream import StreamData
from oocid.distributed.world import World
from oocid.method.zest import ZEstimator
from oocid.models import Embedder
from oocid.train.ddp import gathered
from oocid.train.setup import Say
from oocid.train.tblog import TensorBoardLog
from oocid.version import __version__


@dataclass
class EpochTotals:
    """Running sums of an epoch; saved in mid-epoch checkpoints so a resumed epoch reports the
    same metrics as an uninterrupted one."""

    steps_done: int = 0
    loss_sum: float = 0.0
    images: int = 0
    images_at_start: int = 0
    skipped_steps: int = 0
    bad_samples: int = 0
    scaler_skips: int = 0
    z: Tensor | float | None = None  # the last step's Z: left on the device until saved
    workers: int | None = None  # streamed: the data workers the epoch started with (its order)

    def __post_init__(self) -> None:
        self.images_at_start = self.images

    def saved(self) -> dict[str, Any]:
        """The totals as plain numbers, for a checkpoint (Z read back: a host sync on a GPU)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["z"] = None if self.z is None else float(self.z)
        return out


def resume_workers(data: TrainData, started: int | None, say: Say) -> int | None:
    """The data workers an epoch streams with, to save with its totals (None in memory): the
    worker count decides which samples each worker shuffles together, so an epoch resumed
    inside keeps the count it started with (`data.workers` may have changed with the resume)."""
    if not isinstance(data, StreamData):
        return None
    data.resume_workers = started
    if started is not None and started != data.workers:
        say(f"oocid: this epoch started with {started} data workers and finishes with them (they "
            f"decide its order); the next epochs use {data.workers}")
        return started
    return data.workers


@dataclass
class RunState:
    """Everything the loop reads and advances: what was built for the run, where it stands
    (`epoch`, `step`, a resumed epoch's `partial` totals) and where its limits are."""

    cfg: Config
    manifest: Manifest
    val_manifest: Manifest | None
    run_dir: Path
    device: torch.device
    say: Say
    model: Embedder
    optimizer: torch.optim.Optimizer
    zest: ZEstimator | None
    bank: ChunkCache
    data: TrainData
    epoch: int = 0
    step: int = 0
    partial: dict[str, Any] | None = None
    tb: TensorBoardLog | None = None
    progress: bool = True
    max_epochs: int | None = None  # of this call (the schedule still spans cfg.optim.epochs)
    max_steps: int | None = None
    scaler: Any = None  # fp16's GradScaler (NPIDStep.scaler), saved with the checkpoint
    scaler_state: dict[str, Any] | None = None  # a resumed checkpoint's, for the loop to load
    world: World = field(default_factory=World)  # several processes: oocid.train.ddp
    local: Manifest | None = None  # this process's share of `manifest` (None: all of it)
    batches: int = 0  # batches per epoch, the same for every process (0: the data's count)

    def __post_init__(self) -> None:
        self.local = self.local or self.manifest
        self.batches = self.batches or self.data.steps_per_epoch()

    def checkpoint(self, totals: EpochTotals | None, record: dict[str, Any] | None = None) -> None:
        """Checkpoint after `epoch` whole epochs and `step` optimiser steps; `totals` when it is
        written inside an epoch, `record` the epoch's metrics line at its end (restored by
        `repair_metrics` if a kill lands before the line is appended). The bank's commit comes
        between writing the checkpoint and pointing `last.pt` at it (oocid.checkpoint)."""
        state = {
            "format": "oocid-checkpoint",
            "version": __version__,
            "config": self.cfg.to_dict(),
            "arch": self.cfg.model.arch,
            "in_channels": self.model.in_channels,
            "dim": self.model.out_dim,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "z": self.zest.state_dict() if self.zest is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "manifest_id": self.manifest.identity,
            "bank_id": self.bank.store.meta.bank_id,  # the bank it pairs with (check_bank_id)
            "shards": str(self.manifest.root.resolve()),
            "val": str(self.val_manifest.root.resolve()) if self.val_manifest else None,
            "n_data": self.manifest.n,
            "rng": {"torch": torch.get_rng_state()},
            "bank_cache": self.bank.state_dict(),
            "partial_epoch": totals.saved() if totals is not None else None,
            "epoch_metrics": record,
        }
        if self.world.distributed:  # every rank's window, RNG and totals; rank 0 writes
            state.update(gathered(self.world, state))
        if self.world.main:
            save_checkpoint(self.run_dir, self.step, state)
        self.bank.commit(self.step)  # several processes: the two-phase commit of every part
        if self.world.main:
            finish_checkpoint(self.run_dir, self.step)
