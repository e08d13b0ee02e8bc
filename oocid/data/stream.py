"""Training batches streamed from the tar shards, and the choice of the training data path.

`make_train_data` follows `data.in_memory` (auto: in memory when the decoded set fits): small
sets (the demo, CIFAR, Fashion-MNIST) go to `InMemoryData` (`oocid.data.memory`); large sets
to `StreamData`, which streams the tar shards through DataLoader workers: shard order shuffled
per epoch, a sample shuffle buffer, per-sample augmentation to uint8 in the workers
(`stream_aug`: the torchvision recipes, faster), normalised once per batch on the device; or,
for same-size small images (`data.stream_augment`), decoded per sample and augmented a whole
batch at a time in the workers with the in-memory path's `BatchAugment` (at small sizes the
per-sample recipe costs many times the decode: docs/benchmarks.md, "Training step").
Bad samples (an image that does not decode) are reported with shard and key, skipped and
counted; a shard that cannot be read at all stops the run with its name.
Each worker batches its own share of an epoch; the short batches that leaves (one per worker,
and those with bad samples) are joined in the main process into batches of the configured size,
so every batch but an epoch's last is whole, whatever the number of workers.
Randomness is derived from (seed, epoch, sample or batch) so that a resumed run, at an epoch
boundary or inside one, sees exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from oocid.config import DataConfig, data_workers
from oocid.data.augment import BatchAugment, normalize_batch
from oocid.data.batch import (
    Batch,
    SkipLog,
    fits_in_memory,
    image_channels,
    mix_seed,
    normalization_stats,
    same_size,
)
from oocid.data.decode import decode_image, open_image
from oocid.data.manifest import Manifest
from oocid.data.memory import InMemoryData
from oocid.data.reader import iter_samples
from oocid.data.stream_aug import stream_transform
from oocid.errors import DataError, OocidError

SHUFFLE_START = 128  # samples in a worker's shuffle buffer before it starts yielding


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
        self.spans, self.shifts = manifest.spans, manifest.shifts
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
                span, shift = self.spans[path.name], self.shifts[path.name]
                for k, s in enumerate(iter_samples(path, span, shift)):
                    if k % stride != offset:
                        continue
                    label = -1 if s.label is None else int(s.label)
                    try:
                        if self.random:  # the CPU generator only: torch.manual_seed also
                            # reseeds CUDA (much slower)
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

    def samples(self) -> int:
        """How many samples an epoch streams (every shard's, whatever the worker count)."""
        return sum(stop - start for start, stop in self.spans.values())

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
        brng.shuffle(buf)
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
        self.resume_workers: int | None = None  # the workers a resumed epoch was started with

    def steps_per_epoch(self) -> int:
        """The batches `epoch_batches` yields: whole batches of `batch_size` and one short last
        one, whatever the number of workers; fewer where bad samples leave fewer samples to
        batch (which cannot be known ahead)."""
        return -(-self.dataset.samples() // self.batch_size)

    def worker_batches(self, epoch: int, workers: int | None = None) -> Iterator[dict[str, Any]]:
        """The DataLoader's batches of `epoch` as `Collate` makes them, in the order they come
        (the same every time: the loader takes the workers' batches in turn); `workers`, if
        given, instead of `self.workers`."""
        self.dataset.set_epoch(epoch)
        if getattr(self.transform, "needs_hue_tables", False):
            from oocid.data.stream_aug import hue_tables

            hue_tables()  # built once here; forked workers share the pages
        nw = self.workers if workers is None else workers
        yield from DataLoader(self.dataset, batch_size=self.batch_size, num_workers=nw,
                              collate_fn=Collate(self.batch_augment, self.seed, epoch),
                              pin_memory=self.device.type == "cuda", persistent_workers=False)

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches of `epoch` from the `start_step`-th yielded one on (a resumed epoch skips
        those it yielded before).

        Each DataLoader worker batches its own share of the samples, so each ends its share with
        a short batch (and a bad sample shortens the batch it falls in). A worker batch of
        `batch_size` passes straight through; the short ones are joined, in the loader's order
        (the same every time), into batches of `batch_size`, the rest at the end of the epoch
        into its one short batch. A joined batch's pixels are its parts' (each augmented in its
        worker), so a resumed epoch still sees the same batches. The worker count decides
        which samples each worker shuffles together: a resumed epoch (`start_step` > 0) is
        streamed with `resume_workers`, the count it started with, when that is set."""
        workers = self.resume_workers if start_step > 0 else None
        done = 0  # batches yielded, or skipped as yielded before a mid-epoch resume
        short: list[dict[str, Any]] = []  # short worker batches (or what is left of them) held
        for b in self.worker_batches(epoch, workers):
            if b["fatal"]:
                raise DataError(b["fatal"][0], exit_code=3)
            if done >= start_step:  # else reported (and counted) before a mid-epoch resume
                for where in b["bad"]:
                    self.skips.add(where.split(": ")[0], where.split(": ", 1)[-1])
            k = int(b["index"].numel())
            if k == self.batch_size:
                whole = [b]
            elif k > 0:
                short.append(b)
                if sum(int(p["index"].numel()) for p in short) < self.batch_size:
                    continue
                whole, short = split_off(short, self.batch_size)
            else:
                continue  # bad samples only
            done += 1
            if done > start_step:
                yield self._batch(whole)
        if short and done >= start_step:
            yield self._batch(short)

    def _batch(self, parts: list[dict[str, Any]]) -> Batch:
        """The batch of these (collated) parts on the device, normalised if uint8."""
        if len(parts) == 1:
            x, index, label = parts[0]["x"], parts[0]["index"], parts[0]["label"]
        else:
            x, index, label = (torch.cat([p[key] for p in parts]) for key in ("x", "index", "label"))
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            if self.normalize is None:
                raise ValueError("StreamData: a uint8 transform needs normalize=(mean, std)")
            x = normalize_batch(x, *self.normalize)
        return Batch(x, index.to(self.device, non_blocking=True),
                     label.to(self.device, non_blocking=True))


def split_off(parts: list[dict[str, Any]], n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the parts holding the first `n` samples of `parts`, the parts holding the rest): a part
    that straddles the cut is split in two (views, no copy)."""
    head: list[dict[str, Any]] = []
    got = 0
    for i, p in enumerate(parts):
        k = int(p["index"].numel())
        if got + k <= n:
            head.append(p)
            got += k
            continue
        cut = n - got
        cols = ("x", "index", "label")
        if cut > 0:
            head.append({c: p[c][:cut] for c in cols})
        return head, [{c: p[c][cut:] for c in cols}, *parts[i + 1:]]
    return head, []


def make_train_data(manifest: Manifest, data_cfg: DataConfig, seed: int, device: torch.device,
                    progress: bool = False, chunk_rows: int = 0) -> InMemoryData | StreamData:
    """The training data path chosen by `data.in_memory` (auto: in memory when it fits).

    `chunk_rows` > 0 when the bank cache is partial: in-memory batches then go chunk-locally
    (the stream is chunk-local by construction: shard order, a bounded shuffle buffer)."""
    channels = image_channels(manifest)
    mean, std = normalization_stats(data_cfg, channels)
    use_mem = data_cfg.in_memory == "yes" or (
        data_cfg.in_memory == "auto" and fits_in_memory(manifest, channels, data_cfg.in_memory_max_mb))
    if use_mem:
        from oocid.data.augment import batch_augment_for

        aug = batch_augment_for(data_cfg.augment, data_cfg.image_size, mean, std,
                                data_cfg.crop_scale_min, data_cfg.flip)
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
                                data_cfg.crop_scale_min, data_cfg.flip)
        return StreamData(manifest, channels, data_cfg.batch_size, DecodeFixed(channels, *hw), seed,
                          device, data_workers(data_cfg.workers), True, data_cfg.shuffle_buffer,
                          data_cfg.image_size, batch_augment=aug)
    tf = stream_transform(data_cfg.augment, data_cfg.image_size, data_cfg.crop_scale_min, channels,
                          train=True, flip=data_cfg.flip)
    return StreamData(manifest, channels, data_cfg.batch_size, tf, seed, device,
                      data_workers(data_cfg.workers), True, data_cfg.shuffle_buffer, data_cfg.image_size,
                      normalize=(mean, std))
