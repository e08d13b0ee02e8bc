"""Shards -> batches of (images, index, label) for training and evaluation.

Two paths with one interface (`epoch_batches`):
- `InMemoryData`: small sets (the demo, CIFAR, Fashion-MNIST) are decoded from the shards once
  into a uint8 tensor (N, C, H, W) on the device and augmented in batches there (`BatchAugment`).
- `StreamData`: large sets stream from the tar shards through DataLoader workers: shard order
  shuffled per epoch, a sample shuffle buffer, per-sample augmentation to uint8 in the workers
  (`stream_aug`: the torchvision recipes, faster), normalised once per batch on the device; or,
  for same-size small images (`data.stream_augment`), decoded per sample and augmented a whole
  batch at a time in the workers with the in-memory path's `BatchAugment` (at 32 px the
  per-sample recipe costs ~10x the decode; tools/bench_train.py).
Bad samples (an image that does not decode) are reported with shard and key, skipped and
counted; a shard that cannot be read at all stops the run with its name.
Randomness is derived from (seed, epoch, step) so that a run resumed at an epoch boundary sees
exactly the same batches.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from oocid.data.augment import BatchAugment, batch_eval_transform, normalize_batch
from oocid.data.decode import decode_image, open_image
from oocid.data.shards import Manifest, iter_samples
from oocid.data.stream_aug import stream_transform
from oocid.errors import DataError, OocidError

SHUFFLE_START = 128  # samples in a worker's shuffle buffer before it starts yielding


@dataclass
class Batch:
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
    st = manifest.image_stats or {}
    try:
        h, w = st["height"], st["width"]
        if h["min"] == h["max"] and w["min"] == w["max"]:
            return int(h["min"]), int(w["min"])
    except (KeyError, TypeError):
        return None
    return None


def fits_in_memory(manifest: Manifest, channels: int, max_mb: int) -> bool:
    hw = same_size(manifest)
    return hw is not None and manifest.n * channels * hw[0] * hw[1] <= max_mb * 2**20


def decode_all(manifest: Manifest, channels: int, progress: bool = False, skips: SkipLog | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode every sample into (images (N, C, H, W) uint8, labels (N,) int64 (-1 unlabeled),
    valid (N,) bool). Needs all images of one size."""
    hw = same_size(manifest)
    if hw is None:
        raise DataError(f"{manifest.root}: images differ in size; cannot hold them in memory "
                        "(set data.in_memory = \"no\")")
    h, w = hw
    images = np.zeros((manifest.n, channels, h, w), dtype=np.uint8)
    labels = np.full(manifest.n, -1, dtype=np.int64)
    valid = np.zeros(manifest.n, dtype=bool)
    skips = skips if skips is not None else SkipLog()
    from tqdm import tqdm

    bar = tqdm(total=manifest.n, desc="decode", unit="img", disable=not progress, leave=False)
    for path in manifest.shard_paths():
        for s in iter_samples(path, manifest.spans[path.name]):
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


class ShardStream(IterableDataset):
    """Per-sample stream over the shards: shard shuffle per epoch, shuffle buffer, transform.

    The transform takes the decoded PIL image, or, if it has `decodes = True` (`stream_aug`),
    the image from `decode.open_image` (header read, pixels not yet decoded).
    Yields (image (C,S,S), index, label, bad, fatal) where bad is "" or "shard:key: reason";
    a fatal shard error is yielded in the 5th element so the main process can stop with it."""

    def __init__(self, manifest: Manifest, channels: int, transform: Callable, seed: int,
                 shuffle: bool, shuffle_buffer: int, size: int) -> None:
        super().__init__()
        self.paths = manifest.shard_paths()
        self.spans = manifest.spans
        self.channels = channels
        self.transform = transform
        self.lazy = bool(getattr(transform, "decodes", False))
        self.decoder = isinstance(transform, DecodeFixed)  # takes the image's bytes
        self.random = bool(getattr(transform, "random", True))
        self.seed = seed
        self.shuffle = shuffle
        self.buffer = shuffle_buffer if shuffle else 1
        self.size = size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _samples(self, parts: list[tuple[Path, int, int]]) -> Iterator[tuple]:
        """The samples of each (shard, offset, stride): the k-th sample when k % stride == offset."""
        blank = torch.zeros(self.channels, self.size, self.size)
        for path, offset, stride in parts:
            try:
                for k, s in enumerate(iter_samples(path, self.spans[path.name])):
                    if k % stride != offset:
                        continue
                    label = -1 if s.label is None else int(s.label)
                    try:
                        if self.random:  # the CPU generator only: torch.manual_seed also
                            # reseeds CUDA (~100x slower)
                            torch.default_generator.manual_seed(mix_seed(self.seed, 3, self.epoch, s.index))
                        if self.decoder:
                            x = self.transform(s.image)
                        elif self.lazy:
                            x = self.transform(open_image(s.image))
                        else:
                            x = self.transform(decode_image(s.image, self.channels))
                    except Exception as e:
                        yield (blank, s.index, label, f"{path.name}:{s.key}: {e}", "")
                        continue
                    yield (x, s.index, label, "", "")
            except OocidError as e:
                yield (blank, -1, -1, "", str(e))
                return

    def worker_parts(self, wid: int, nw: int) -> list[tuple[Path, int, int]]:
        """Worker `wid`'s share of the epoch as (shard, offset, stride): whole full-size shards
        dealt round-robin (in the epoch's shuffled order) while every worker gets one, then the
        remaining shards (the odd ones out and a short last shard) split sample by sample, so
        that the workers finish together even with fewer shards than workers."""
        rng = np.random.default_rng(mix_seed(self.seed, 4, self.epoch))
        order = rng.permutation(len(self.paths)) if self.shuffle else np.arange(len(self.paths))
        paths = [self.paths[i] for i in order]
        sizes = [self.spans[p.name][1] - self.spans[p.name][0] for p in paths]
        full = [p for p, n in zip(paths, sizes, strict=True) if n == max(sizes)]
        whole = full[:len(full) // nw * nw]
        dealt = set(whole)
        split = [p for p in paths if p not in dealt]
        return [(p, 0, 1) for p in whole[wid::nw]] + [(p, wid, nw) for p in split]

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.worker_parts(wid, nw)
        brng = np.random.default_rng(mix_seed(self.seed, 5, self.epoch, wid))
        # The buffer fills while it is already yielding (as webdataset's shuffle does): from
        # SHUFFLE_START samples on, one out for every two in until it is full, then one for one;
        # so the first batches leave a worker after a few hundred samples, not a whole buffer.
        start = min(self.buffer, SHUFFLE_START)
        buf: list[tuple] = []
        for n_in, item in enumerate(self._samples(mine), 1):
            if item[4]:
                yield item
                return
            buf.append(item)
            if len(buf) < start or (len(buf) < self.buffer and n_in % 2 == 1):
                continue
            j = int(brng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
        brng.shuffle(buf)  # type: ignore[arg-type]
        yield from buf


BATCH_AUGMENT_MAX_SIDE = 64  # data.stream_augment "auto": batched for same-size images this small


class DecodeFixed:
    """The per-sample step of batched streaming: decode to uint8 (C, H, W), nothing random;
    an image of another size than the set's is a bad sample."""

    random = False  # ShardStream need not seed torch's generator for it

    def __init__(self, channels: int, height: int, width: int) -> None:
        self.channels, self.height, self.width = channels, height, width

    def __call__(self, data: bytes) -> Tensor:
        a = np.asarray(decode_image(data, self.channels))
        if a.shape[:2] != (self.height, self.width):
            raise ValueError(f"size {a.shape[1]}x{a.shape[0]}, expected {self.width}x{self.height}")
        t = torch.from_numpy(a.reshape(self.height, self.width, self.channels).copy())
        return t.permute(2, 0, 1)


class Collate:
    """Batch the good samples of a DataLoader batch, list the bad and fatal ones; with
    `augment`, apply it to the uint8 batch there (in the worker), with a generator seeded by
    (seed, epoch, the batch's first index): the same batches, the same pixels, whether a run is
    resumed or not. The batch reaches the main process through shared memory either way."""

    def __init__(self, augment: BatchAugment | None = None, seed: int = 0, epoch: int = 0) -> None:
        self.augment, self.seed, self.epoch = augment, seed, epoch

    def __call__(self, items: list[tuple]) -> dict[str, Any]:
        fatal = [it[4] for it in items if it[4]]
        bad = [it[3] for it in items if it[3]]
        good = [it for it in items if not it[3] and not it[4]]
        if good:
            x = default_collate([it[0] for it in good])
            idx = torch.tensor([it[1] for it in good], dtype=torch.int64)
            lab = torch.tensor([it[2] for it in good], dtype=torch.int64)
            if self.augment is not None:
                g = torch.Generator().manual_seed(mix_seed(self.seed, 7, self.epoch, int(idx[0])))
                x = self.augment(x, g)
        else:
            x, idx, lab = torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        return {"x": x, "index": idx, "label": lab, "bad": bad, "fatal": fatal}


class StreamData:
    """Batches streamed from the shards by DataLoader workers.

    A transform that returns uint8 is normalised here, per batch on the device, with
    `normalize` = (mean, std); a float transform's output is used as it is. With
    `batch_augment`, each batch of the transform's uint8 images is augmented in its worker
    (`Collate`)."""

    def __init__(self, manifest: Manifest, channels: int, batch_size: int, transform: Callable,
                 seed: int, device: torch.device, workers: int, shuffle: bool = True,
                 shuffle_buffer: int = 2048, size: int = 224,
                 normalize: tuple[Sequence[float], Sequence[float]] | None = None,
                 batch_augment: BatchAugment | None = None) -> None:
        self.n = manifest.n
        self.seed = seed
        self.batch_augment = batch_augment
        self.batch_size = batch_size
        self.device = device
        self.normalize = normalize
        self.transform = transform
        self.skips = SkipLog()
        self.dataset = ShardStream(manifest, channels, transform, seed, shuffle, shuffle_buffer, size)
        self.workers = workers

    def steps_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        self.dataset.set_epoch(epoch)
        if getattr(self.transform, "needs_hue_tables", False):
            from oocid.data.stream_aug import hue_tables

            hue_tables()  # built once here; forked workers share the pages
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.workers,
                            collate_fn=Collate(self.batch_augment, self.seed, epoch),
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for step, b in enumerate(loader):
            if b["fatal"]:
                raise DataError(b["fatal"][0], exit_code=3)
            if step < start_step:  # seen before a mid-epoch resume (and counted then)
                continue
            for where in b["bad"]:
                self.skips.add(where.split(": ")[0], where.split(": ", 1)[-1])
            if b["index"].numel() == 0:
                continue
            x = b["x"].to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:
                if self.normalize is None:
                    raise ValueError("StreamData: a uint8 transform needs normalize=(mean, std)")
                x = normalize_batch(x, *self.normalize)
            yield Batch(x, b["index"].to(self.device), b["label"].to(self.device))


def make_train_data(manifest: Manifest, data_cfg: Any, seed: int, device: torch.device,
                    progress: bool = False, chunk_rows: int = 0) -> InMemoryData | StreamData:
    """The training data path chosen by `data.in_memory` (auto: in memory when it fits).

    `chunk_rows` > 0 when the bank cache is partial: in-memory batches then go chunk-locally
    (the stream is chunk-local by construction: shard order, a bounded shuffle buffer)."""
    channels = image_channels(manifest)
    mean, std = _stats_for(data_cfg, channels)
    use_mem = data_cfg.in_memory == "yes" or (
        data_cfg.in_memory == "auto" and fits_in_memory(manifest, channels, data_cfg.in_memory_max_mb))
    if use_mem:
        from oocid.data.augment import batch_augment_for

        aug = batch_augment_for(data_cfg.augment, data_cfg.image_size, mean, std,
                                data_cfg.crop_scale_min)
        group = -(-data_cfg.batch_size // chunk_rows) if chunk_rows > 0 else 1
        return InMemoryData(manifest, channels, data_cfg.batch_size, aug, seed, device, progress,
                            chunk_rows, group)
    hw = same_size(manifest)
    batched = data_cfg.stream_augment == "batch" or (
        data_cfg.stream_augment == "auto" and hw is not None and max(hw) <= BATCH_AUGMENT_MAX_SIDE)
    if batched:
        if hw is None:
            raise DataError(f"{manifest.root}: images differ in size; data.stream_augment = "
                            '"batch" needs one size (use "sample")')
        from oocid.data.augment import batch_augment_for

        aug = batch_augment_for(data_cfg.augment, data_cfg.image_size, mean, std,
                                data_cfg.crop_scale_min)
        return StreamData(manifest, channels, data_cfg.batch_size, DecodeFixed(channels, *hw), seed,
                          device, data_cfg.workers, True, data_cfg.shuffle_buffer,
                          data_cfg.image_size, batch_augment=aug)
    tf = stream_transform(data_cfg.augment, data_cfg.image_size, data_cfg.crop_scale_min, channels,
                          train=True)
    return StreamData(manifest, channels, data_cfg.batch_size, tf, seed, device, data_cfg.workers,
                      True, data_cfg.shuffle_buffer, data_cfg.image_size, normalize=(mean, std))


def _stats_for(data_cfg: Any, channels: int) -> tuple[list[float], list[float]]:
    mean, std = list(data_cfg.mean), list(data_cfg.std)
    if len(mean) != channels:
        mean = [float(np.mean(mean))] * channels
        std = [float(np.mean(std))] * channels
    return mean, std


def eval_batches(manifest: Manifest, data_cfg: Any, device: torch.device, batch_size: int = 512,
                 progress: bool = False) -> Iterator[Batch]:
    """Every sample once, in index order where held in memory, with the test transform."""
    channels = image_channels(manifest)
    mean, std = _stats_for(data_cfg, channels)
    use_mem = data_cfg.in_memory != "no" and fits_in_memory(manifest, channels,
                                                            data_cfg.in_memory_max_mb)
    if use_mem:
        imgs, labels, valid = decode_all(manifest, channels, progress)
        tf = batch_eval_transform(data_cfg.image_size, mean, std)
        keep = torch.from_numpy(np.flatnonzero(valid))
        images = torch.from_numpy(imgs)
        lab = torch.from_numpy(labels)
        for part in keep.split(batch_size):
            yield Batch(tf(images[part].to(device)), part.to(device), lab[part].to(device))
        return
    eval_tf = stream_transform(data_cfg.augment, data_cfg.image_size, data_cfg.crop_scale_min,
                               channels, train=False)
    sd = StreamData(manifest, channels, batch_size, eval_tf, 0, device, data_cfg.workers,
                    shuffle=False, size=data_cfg.image_size, normalize=(mean, std))
    yield from sd.epoch_batches(0)


@torch.no_grad()
def extract_features(model: torch.nn.Module, batches: Iterator[Batch], channels_last: bool = False
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """(features (M, D) float32, index (M,), label (M,)) of every batch, on the batches' device."""
    was_training = model.training
    model.eval()
    feats, idx, lab = [], [], []
    for b in batches:
        x = b.images.contiguous(memory_format=torch.channels_last) if channels_last else b.images
        feats.append(model(x).float())
        idx.append(b.index)
        lab.append(b.label)
    model.train(was_training)
    if not feats:
        raise DataError("no samples to extract features from")
    return torch.cat(feats), torch.cat(idx), torch.cat(lab)
