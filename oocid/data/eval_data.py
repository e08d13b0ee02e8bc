"""The evaluation data path: every sample once with the test transform, and its features.

`eval_batches` takes the same path as training would (decoded in memory where the set fits,
else streamed from the shards) with the deterministic test transform; `extract_features` runs
a model over such batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from oocid.config import DataConfig, data_workers
from oocid.data.augment import batch_eval_transform
from oocid.data.batch import Batch, fits_in_memory, image_channels, normalization_stats
from oocid.data.manifest import Manifest
from oocid.data.memory import decode_all
from oocid.data.stream import StreamData
from oocid.data.stream_aug import stream_transform
from oocid.errors import DataError


def eval_batches(manifest: Manifest, data_cfg: DataConfig, device: torch.device, batch_size: int = 512,
                 progress: bool = False, channels: int | None = None) -> Iterator[Batch]:
    """Every sample once, in index order where held in memory, with the test transform.
    `channels`: decode to this many (1: grayscale, 3: RGB) instead of the set's own: the
    model's, for a set whose images differ from the training set's (as `knn --query` does)."""
    channels = image_channels(manifest) if channels is None else channels
    mean, std = normalization_stats(data_cfg, channels)
    use_mem = data_cfg.in_memory != "no" and fits_in_memory(manifest, channels,
                                                            data_cfg.in_memory_max_mb)
    if use_mem:
        imgs, labels, valid = decode_all(manifest, channels, progress)
        tf = batch_eval_transform(data_cfg.augment, data_cfg.image_size, mean, std)
        keep = torch.from_numpy(np.flatnonzero(valid))
        images = torch.from_numpy(imgs)
        lab = torch.from_numpy(labels)
        for part in keep.split(batch_size):  # type: ignore[no-untyped-call]
            yield Batch(tf(images[part].to(device)), part.to(device), lab[part].to(device))
        return
    eval_tf = stream_transform(data_cfg.augment, data_cfg.image_size, data_cfg.crop_scale_min,
                               channels, train=False)
    sd = StreamData(manifest, channels, batch_size, eval_tf, 0, device, data_workers(data_cfg.workers),
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
