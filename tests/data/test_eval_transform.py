"""The test transform is one transform whichever path a set takes: the batched tensor version
(sets held in memory, query images) matches the per-sample torchvision reference, Resize(R) +
CenterCrop(S), up to the resampling's rounding; and `eval_batches` yields the same pixels held in
memory as streamed from the shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oocid.config import DataConfig
from oocid.data.augment import batch_eval_transform, eval_resize, sample_transform
from oocid.data.eval_data import eval_batches
from oocid.data.writer import write_shards

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
LEVEL = 1 / 255 / 0.25  # one grey level after normalisation


def waves(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: smooth colour waves, so that resampling the same grid twice agrees."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([128 + 100 * np.sin(x / rng.uniform(2.5, 4) + c) * np.cos(y / rng.uniform(3, 5) + 2 * c)
                  for c in range(3)], -1)
    return np.clip(a, 0, 255).astype(np.uint8)


def test_eval_resize_is_the_papers_256_for_224() -> None:
    assert eval_resize("imagenet", 224) == 256 and eval_resize("imagenet", 32) == 37
    assert eval_resize("cifar", 32) == 32 and eval_resize("gray", 28) == 28


@pytest.mark.parametrize("recipe", ["imagenet", "cifar"])
@pytest.mark.parametrize("hw", [(24, 24), (30, 40), (40, 30), (50, 50), (23, 61)])
def test_batched_eval_matches_the_torchvision_reference(recipe: str, hw: tuple[int, int]) -> None:
    """Same crop of the same resized image: within two grey levels everywhere (PIL's and torch's
    antialiased bilinear round differently). Squashing a non-square image to S x S, or leaving
    out the imagenet recipe's 8 % crop, is off by many levels."""
    a = waves(*hw)
    ref = sample_transform(recipe, 24, MEAN, STD, 0.2, train=False)(Image.fromarray(a))
    got = batch_eval_transform(recipe, 24, MEAN, STD)(torch.from_numpy(a.transpose(2, 0, 1).copy())[None])
    assert got.shape == (1, 3, 24, 24)
    assert (got[0] - ref).abs().max() <= 2 * LEVEL + 1e-6


def test_square_set_at_its_own_size_passes_unresized() -> None:
    x = torch.from_numpy(waves(24, 24).transpose(2, 0, 1).copy())[None]
    got = batch_eval_transform("cifar", 24, MEAN, STD)(x)
    assert torch.equal(got, (x.float() / 255 - 0.5) / 0.25)


@pytest.mark.parametrize("recipe", ["imagenet", "cifar"])
def test_eval_batches_in_memory_equal_streamed(tmp_path: Path, recipe: str) -> None:
    src = tmp_path / "src"
    for i in range(12):
        (src / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(waves(30, 40, seed=i)).save(src / f"c{i % 3}" / f"{i}.png")
    manifest = write_shards(src, tmp_path / "shards", shard_size=5, progress=False, short_side=0)
    cpu = torch.device("cpu")

    def images(in_memory: str) -> torch.Tensor:
        cfg = DataConfig(image_size=24, augment=recipe, mean=MEAN, std=STD, in_memory=in_memory,  # type: ignore[arg-type]
                         workers=0)
        batches = list(eval_batches(manifest, cfg, cpu, batch_size=5))
        index = torch.cat([b.index for b in batches])
        return torch.cat([b.images for b in batches])[index.argsort()]

    held, streamed = images("yes"), images("no")
    assert held.shape == streamed.shape == (12, 3, 24, 24)
    assert (held - streamed).abs().max() <= 2 * LEVEL + 1e-6
