"""What the data paths hand the trainer and the evaluators, and helpers they share.

`Batch` (images, index, label on the device), `TrainData` (the interface of the in-memory and
the streamed training paths), `SkipLog` (bad samples reported and counted), `mix_seed` (the
seeds derived from (seed, epoch, step, ...) that make a resumed run see the same batches), and
what a manifest and the data config say about the images: channels, one common size, whether
the decoded set fits in memory, the normalisation statistics.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from torch import Tensor

from oocid.config import DataConfig
from oocid.data.manifest import Manifest


@dataclass
class Batch:
    """One batch as the trainer and the evaluators take it."""

    images: Tensor  # (B, C, S, S) float, augmented and normalised, on the device
    index: Tensor  # (B,) int64 global instance ids, on the device
    label: Tensor  # (B,) int64, -1 where unlabeled, on the device


@dataclass
class SkipLog:
    """Bad samples seen: reported once each to stderr, counted per epoch."""

    count: int = 0
    keys: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        if len(self.keys) < 1000:
            self.keys.append(where)
        print(f"oocid: warning: skipped bad sample {where}: {reason}", file=sys.stderr)


class TrainData(Protocol):
    """A training set as the loop sees it: `InMemoryData` (decoded once, batched augmentation)
    or `StreamData` (shards streamed through DataLoader workers)."""

    skips: SkipLog

    def steps_per_epoch(self) -> int:
        """Batches an epoch yields."""
        ...

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches of `epoch` from batch `start_step` on (a resumed epoch skips the rest)."""
        ...


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and runs)."""
    ss = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])
    return int(ss.generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def image_channels(manifest: Manifest) -> int:
    """1 if every image of the set is single-channel, else 3."""
    chans = manifest.image_stats.get("channels", {}) if manifest.image_stats else {}
    keys = {str(k) for k, v in chans.items() if v}
    return 1 if keys == {"1"} else 3


def same_size(manifest: Manifest) -> tuple[int, int] | None:
    """(height, width) if every image of the set has that size, else None."""
    st = manifest.image_stats or {}
    try:
        h, w = st["height"], st["width"]
        if h["min"] == h["max"] and w["min"] == w["max"]:
            return int(h["min"]), int(w["min"])
    except (KeyError, TypeError):
        return None
    return None


def fits_in_memory(manifest: Manifest, channels: int, max_mb: int) -> bool:
    """True if the set, decoded to uint8 (N, channels, H, W), takes at most `max_mb` MiB."""
    hw = same_size(manifest)
    return hw is not None and manifest.n * channels * hw[0] * hw[1] <= max_mb * 2**20


def normalization_stats(data_cfg: DataConfig, channels: int) -> tuple[list[float], list[float]]:
    """The (mean, std) to normalise `channels`-channel images with: `data.mean` and `data.std`,
    or their averages repeated where the config gives another number of channels."""
    mean, std = list(data_cfg.mean), list(data_cfg.std)
    if len(mean) != channels:
        mean = [float(np.mean(mean))] * channels
        std = [float(np.mean(std))] * channels
    return mean, std
