"""`oocid train` without a config: the recipe follows the data (oocid/train/recipe.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from helpers import ENV, run_process, tiny_npz

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
    assert cfg.optim.epochs == MAX_EPOCHS  # 1 step an epoch: STEPS would be 3000 epochs
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


def test_train_without_a_config_says_and_saves_its_recipe(tmp_path: Path) -> None:
    """As a user runs it, output piped: one line names the recipe and the overrides after it;
    config.json holds the recipe with the override applied."""
    write_shards(tiny_npz(tmp_path / "g.npz", n=64, size=16), tmp_path / "s", shard_size=32,
                 progress=False)
    argv = ["train", "--shards", tmp_path / "s", "--bank", tmp_path / "b.npy", "--out",
            tmp_path / "run", "--epochs", "1"]
    run = run_process([sys.executable, "-m", "oocid", *map(str, argv)], list(map(str, argv)),
                      {**ENV, "OMP_NUM_THREADS": "1"})
    assert run.rc == 0, run
    said = [ln for ln in run.err.splitlines() if "recipe for" in ln]
    assert len(said) == 1 and said[0].endswith("; then optim.epochs=1"), run
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["arch"] == "small" and saved["data"]["image_size"] == 16
    assert saved["data"]["flip"] is False and saved["optim"]["epochs"] == 1
