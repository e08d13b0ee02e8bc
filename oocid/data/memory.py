"""The in-memory training path: a small set decoded once and augmented in batches on the device.

`decode_all` decodes every sample of a same-size set into one uint8 array; `InMemoryData`
holds it as a tensor on the device and yields augmented batches (`BatchAugment`), in a random
order per epoch or, with a partial bank cache, a chunk-local one (`local_order`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from oocid.data.augment import BatchAugment
from oocid.data.batch import Batch, SkipLog, mix_seed, same_size
from oocid.data.decode import decode_image
from oocid.data.manifest import Manifest
from oocid.data.reader import iter_samples
from oocid.errors import DataError
from oocid.progress import progress_bar


def decode_all(manifest: Manifest, channels: int, progress: bool = False, skips: SkipLog | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode every sample into (images (N, C, H, W) uint8, labels (N,) int64 (-1 unlabeled),
    valid (N,) bool). Needs all images of one size."""
    hw = same_size(manifest)
    if hw is None:
        raise DataError(f"{manifest.root}: images differ in size; cannot hold them in memory "
                        "(use --set data.in_memory=no)")
    h, w = hw
    images = np.zeros((manifest.n, channels, h, w), dtype=np.uint8)
    labels = np.full(manifest.n, -1, dtype=np.int64)
    valid = np.zeros(manifest.n, dtype=bool)
    skips = skips if skips is not None else SkipLog()
    bar = progress_bar(manifest.n, "decode", "img", enabled=progress, leave=False)
    spans, shifts = manifest.spans, manifest.shifts
    for path in manifest.shard_paths():
        for s in iter_samples(path, spans[path.name], shifts[path.name]):
            try:
                img = decode_image(s.image, channels)
                arr = np.asarray(img)
                if arr.shape[:2] != (h, w):
                    raise ValueError(f"size {arr.shape[1]}x{arr.shape[0]}, expected {w}x{h}")
            except Exception as e:
                skips.add(f"{path.name}:{s.key}", str(e) or type(e).__name__)
                continue
            if not 0 <= s.index < manifest.n:
                raise DataError(f"{path}: sample {s.key} has index {s.index} outside [0, {manifest.n})")
            images[s.index] = arr.reshape(h, w, channels).transpose(2, 0, 1)
            labels[s.index] = -1 if s.label is None else s.label
            valid[s.index] = True
            bar.update(1)
    bar.close()
    return images, labels, valid


def local_order(valid_index: Tensor, chunk_rows: int, group_chunks: int, g: torch.Generator
                ) -> Tensor:
    """A permutation of `valid_index` that visits the bank chunk by chunk: chunks in random
    order, taken `group_chunks` at a time, samples shuffled within each group.

    With a partial bank cache, a batch then touches at most two groups' chunks, so the cache's
    pool of positives does not thrash (a global permutation touches every chunk every step).
    The shards were written in a seeded random order, so a group is still a random sample of the
    data set; the grouping changes every epoch."""
    chunk = valid_index // chunk_rows  # (M,) chunk of each valid row
    n_chunks = int(chunk.max().item()) + 1 if len(chunk) else 0
    rank = torch.empty(n_chunks, dtype=torch.int64)
    rank[torch.randperm(n_chunks, generator=g)] = torch.arange(n_chunks)
    group = rank[chunk] // group_chunks  # (M,) which group each row falls in
    key = group.double() + torch.rand(len(valid_index), generator=g, dtype=torch.float64) * 0.5
    return valid_index[torch.argsort(key)]


class InMemoryData:
    """The whole set as a uint8 tensor on the device, batched augmentation there.

    `chunk_rows` > 0 (a partial bank cache) orders each epoch chunk-locally (`local_order`);
    0 draws a global random permutation."""

    def __init__(self, manifest: Manifest, channels: int, batch_size: int, augment: BatchAugment,
                 seed: int, device: torch.device, progress: bool = False, chunk_rows: int = 0,
                 group_chunks: int = 1) -> None:
        self.skips = SkipLog()
        imgs, labels, valid = decode_all(manifest, channels, progress, self.skips)
        self.n = manifest.n
        self.images = torch.from_numpy(imgs).to(device)
        self.labels = torch.from_numpy(labels).to(device)
        self.valid_index = torch.from_numpy(np.flatnonzero(valid)).to(torch.int64)
        self.batch_size = batch_size
        self.augment = augment
        self.seed = seed
        self.device = device
        self.chunk_rows, self.group_chunks = chunk_rows, group_chunks

    def steps_per_epoch(self) -> int:
        return -(-len(self.valid_index) // self.batch_size)

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        if start_step == 0:  # the bad samples, decoded once, count in every epoch (as streamed)
            self.skips.count += self.n - len(self.valid_index)
        g = torch.Generator().manual_seed(mix_seed(self.seed, 1, epoch))
        if self.chunk_rows > 0:
            order = local_order(self.valid_index, self.chunk_rows, self.group_chunks, g)
        else:
            order = self.valid_index[torch.randperm(len(self.valid_index), generator=g)]
        for step in range(start_step, self.steps_per_epoch()):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size].to(self.device)
            ga = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, 2, epoch, step))
            x = self.augment(self.images[idx], ga)
            yield Batch(x, idx, self.labels[idx])
