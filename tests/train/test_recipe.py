"""`oocid train` without a config: the recipe follows the data (oocid/train/recipe.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import tiny_npz

from oocid.config import Config
from oocid.data.manifest import read_manifest
from oocid.data.writer import write_shards
from oocid.train.recipe import MAX_EPOCHS, MIN_EPOCHS, STEPS, recipe_for


def _colour_npz(path: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8),
             labels=np.arange(n) % 3)
    return path


def test_small_grayscale_gets_the_small_net_at_its_size_without_flips(tmp_path: Path) -> None:
    write_shards(tiny_npz(tmp_path / "g.npz", n=96, size=16), tmp_path / "g", shard_size=32,
                 progress=False)
    cfg, note = recipe_for(read_manifest(tmp_path / "g"))
    assert cfg.model.arch == "small" and cfg.data.image_size == 16
    assert cfg.data.augment == "gray" and cfg.data.flip is False
    assert cfg.loss.kind == "softmax" and cfg.optim.schedule == "cosine"
    assert cfg.optim.epochs == MAX_EPOCHS  # 1 step an epoch: STEPS would be 2400 epochs
    assert "16 px grayscale" in note and "flip off" in note


def test_epochs_give_about_the_step_target(tmp_path: Path) -> None:
    write_shards(_colour_npz(tmp_path / "c.npz", 2560, 8), tmp_path / "c", shard_size=512,
                 progress=False)
    cfg, note = recipe_for(read_manifest(tmp_path / "c"))
    assert cfg.data.augment == "cifar" and cfg.data.flip is True and cfg.data.image_size == 8
    assert cfg.optim.epochs == STEPS // 10 and MIN_EPOCHS <= cfg.optim.epochs  # 10 steps/epoch
    assert cfg.data.mean == Config().data.mean and "colour" in note


def test_large_images_get_the_papers_imagenet_recipe(tmp_path: Path) -> None:
    write_shards(_colour_npz(tmp_path / "l.npz", 12, 80), tmp_path / "l", shard_size=6,
                 progress=False)
    cfg, note = recipe_for(read_manifest(tmp_path / "l"))
    assert cfg.to_dict() == Config().to_dict()
    assert "80 px images" in note and "ImageNet" in note
