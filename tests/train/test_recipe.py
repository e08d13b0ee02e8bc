"""`oocid train` without a config: the recipe follows the data (oocid/train/recipe.py)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import ENV, run_process, tiny_npz
from PIL import Image

from oocid.config import AUTO_WORKERS, SMALL_MIN_SIDE, Config, eval_period, load_config
from oocid.data.manifest import Manifest, ShardInfo, read_manifest
from oocid.data.writer import write_shards
from oocid.train.recipe import HINT, MAX_EPOCHS, MIN_EPOCHS, SMALL_SIDE, STEPS, recipe_for


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
    assert cfg.loss.kind == "auto" and cfg.optim.schedule == "cosine"
    assert cfg.loss.nce_k == 48  # half the 96 rows: InfoNCE, if auto picks it, runs
    assert "exact softmax (t 0.1) while the bank fits the device cache, else InfoNCE K 48" in note
    assert cfg.optim.epochs == MAX_EPOCHS  # 1 step an epoch: STEPS would be 3000 epochs
    assert "16 px grayscale" in note and "flip off" in note
    assert f"{MAX_EPOCHS} epochs ({MAX_EPOCHS} steps)" in note and note.endswith(f"; {HINT}")


def test_epochs_give_about_the_step_target(tmp_path: Path) -> None:
    write_shards(_colour_npz(tmp_path / "c.npz", 2560, 8), tmp_path / "c", shard_size=512,
                 progress=False)
    cfg, note = recipe_for(read_manifest(tmp_path / "c"))
    assert cfg.data.augment == "cifar" and cfg.data.flip is True and cfg.data.image_size == 8
    assert cfg.optim.epochs == STEPS // 10 and MIN_EPOCHS <= cfg.optim.epochs  # 10 steps/epoch
    assert cfg.data.mean == Config().data.mean and "colour" in note
    assert f"{cfg.optim.epochs} epochs ({cfg.optim.epochs * 10} steps)" in note


def _mixed_folder(root: Path, sizes: list[tuple[int, int]], per_size: int = 2) -> Path:
    """An ImageFolder of colour images of the given (width, height) sizes, two classes."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes * per_size):
            px = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(px).save(root / c / f"{i}.png")
    return root


USERS_SIZES = [(80, 60), (64, 96), (100, 50), (72, 72), (60, 80)]  # a new user's set


def test_large_images_on_a_gpu_get_the_papers_imagenet_recipe(tmp_path: Path) -> None:
    write_shards(_colour_npz(tmp_path / "l.npz", 12, 80), tmp_path / "l", shard_size=6,
                 progress=False)
    cfg, note = recipe_for(read_manifest(tmp_path / "l"), device="cuda")
    paper = Config()
    paper.loss.nce_k = 6  # half the 12 rows, so that sampled negatives run on them
    assert cfg.to_dict() == paper.to_dict()
    assert "80 px colour images" in note and "ImageNet" in note
    assert "200 epochs, 200 steps, K 6" in note and note.endswith(f"; {HINT}")  # 1 step an epoch
    big = dataclasses.replace(read_manifest(tmp_path / "l"), n=10_000)
    assert recipe_for(big, device="cuda")[0].to_dict() == Config().to_dict()  # K 4096 < 5000
    assert "K 4096" not in recipe_for(big, device="cuda")[1]


def test_larger_mixed_size_images_on_a_cpu_get_the_small_net_at_64_px(tmp_path: Path) -> None:
    write_shards(_mixed_folder(tmp_path / "img", USERS_SIZES), tmp_path / "s", progress=False)
    manifest = read_manifest(tmp_path / "s")
    cfg, note = recipe_for(manifest, device="cpu")
    assert cfg.model.arch == "small" and cfg.data.image_size == SMALL_SIDE == 64
    assert cfg.data.augment == "cifar" and cfg.data.flip and cfg.loss.kind == "auto"
    assert cfg.data.workers == AUTO_WORKERS  # mixed sizes stream: decoded in workers
    assert "colour images up to 100 px" in note and "small net at 64 px (on a CPU;" in note
    assert "is for a GPU" in note and note.endswith(f"; {HINT}")
    assert f"{MAX_EPOCHS} epochs ({MAX_EPOCHS} steps)" in note  # 20 images: 1 step an epoch
    gpu, gnote = recipe_for(manifest, device="cuda")
    assert gpu.model.arch == "resnet18" and "ImageNet" in gnote


def test_much_larger_same_size_images_stream_rather_than_crop_in_batches(tmp_path: Path) -> None:
    write_shards(_colour_npz(tmp_path / "l.npz", 12, 160), tmp_path / "l", shard_size=6,
                 progress=False)
    cfg, _ = recipe_for(read_manifest(tmp_path / "l"), device="cpu")
    assert cfg.data.image_size == 64 and cfg.data.in_memory == "no"  # 160 px: over 2x down
    write_shards(_colour_npz(tmp_path / "m.npz", 12, 96), tmp_path / "m", shard_size=6,
                 progress=False)
    cfg, _ = recipe_for(read_manifest(tmp_path / "m"), device="cpu")
    assert cfg.data.image_size == 64 and cfg.data.in_memory == "auto"


def test_the_shorter_side_decides_small_even_on_a_gpu(tmp_path: Path) -> None:
    """A set sharded with --short-side 48 (its longer sides larger) is small, as is one whose
    every image is 40 px high."""
    write_shards(_mixed_folder(tmp_path / "img", [(120, 90), (90, 120)]), tmp_path / "s",
                 short_side=48, progress=False)
    cfg, note = recipe_for(read_manifest(tmp_path / "s"), device="cuda")
    assert cfg.model.arch == "small" and cfg.data.image_size == 48 and "(on a CPU" not in note
    write_shards(_mixed_folder(tmp_path / "wide", [(90, 40), (120, 40)]), tmp_path / "w",
                 progress=False)
    cfg, note = recipe_for(read_manifest(tmp_path / "w"), device="cuda")
    assert cfg.data.image_size == 40 and "colour images up to 120 px" in note


def test_images_below_the_small_nets_smallest_input_are_scaled_up_to_it(tmp_path: Path) -> None:
    """3 px images: the small net at 3 px would pool to nothing (an internal error); the recipe
    takes 8 px crops, says why, and one epoch trains."""
    write_shards(_colour_npz(tmp_path / "t.npz", 30, 3), tmp_path / "t", progress=False)
    cfg, note = recipe_for(read_manifest(tmp_path / "t"))
    assert cfg.data.image_size == SMALL_MIN_SIDE == 8
    assert "3 px colour images" in note and "small net at 8 px (scaled up" in note
    assert "on a CPU" not in note
    cfg.optim.epochs = 1
    from oocid.train.loop import train

    res = train(cfg, tmp_path / "t", tmp_path / "b.zarr", tmp_path / "run", progress=False)
    assert res.step == 1 and np.isfinite(res.metrics[-1]["loss"])


def test_a_recipe_checks_val_ten_times_a_run(tmp_path: Path) -> None:
    write_shards(tiny_npz(tmp_path / "g.npz", n=96, size=16), tmp_path / "g", shard_size=32,
                 progress=False)
    base, _ = recipe_for(read_manifest(tmp_path / "g"))
    assert eval_period(base) == base.optim.epochs // 10 == MAX_EPOCHS // 10
    for epochs, every in ((5, 1), (50, 5)):  # --epochs given: a tenth of those
        assert eval_period(load_config(None, [f"optim.epochs={epochs}"], base=base)) == every
    assert eval_period(load_config(None, ["train.eval_every=3"], base=base)) == 3


def test_portrait_and_landscape_images_of_one_size_are_not_called_square(tmp_path: Path
                                                                          ) -> None:
    """32x48 and 48x32 images: the largest height and width are both 48, the images are not
    48 px; the line says "up to 48 px", and the recipe works at the bound, 48."""
    write_shards(_mixed_folder(tmp_path / "img", [(32, 48), (48, 32)]), tmp_path / "s",
                 progress=False)
    cfg, note = recipe_for(read_manifest(tmp_path / "s"))
    assert "colour images up to 48 px" in note and "48 px colour" not in note
    assert cfg.data.image_size == 48


def test_several_processes_count_the_busiest_and_keep_k_below_the_smallest(tmp_path: Path
                                                                            ) -> None:
    """Shards go to processes whole: 4100 samples in shards of 4096 and 4 leave one process 4
    rows (K must stay below them) and the other 16 steps an epoch."""
    write_shards(tiny_npz(tmp_path / "g.npz", n=8, size=8), tmp_path / "g", shard_size=4,
                 progress=False)
    m = read_manifest(tmp_path / "g")
    m = dataclasses.replace(m, n=4100, shards=(ShardInfo("a.tar", 0, 4096, "", 0),
                                               ShardInfo("b.tar", 4096, 4100, "", 0)))
    cfg, note = recipe_for(m, processes=2)
    assert cfg.loss.kind == "infonce" and cfg.loss.nce_k == 2 and "K 2 per process" in note
    assert cfg.optim.epochs == round(STEPS / 16)
    assert f"{cfg.optim.epochs} epochs ({cfg.optim.epochs * 16} steps)" in note


def test_unknown_sizes_on_a_cpu_get_the_small_net(tmp_path: Path) -> None:
    write_shards(tiny_npz(tmp_path / "g.npz", n=8, size=8), tmp_path / "g", shard_size=4,
                 progress=False)
    m: Manifest = dataclasses.replace(read_manifest(tmp_path / "g"), image_stats={})
    cfg, note = recipe_for(m, device="cpu")
    assert cfg.data.image_size == 64 and cfg.data.in_memory == "no"
    assert "images of unknown size" in note and "(on a CPU;" in note
    assert recipe_for(m, device="cuda")[0].model.arch == "resnet18"


@pytest.mark.parametrize("cuda", [False, True])
def test_the_cli_picks_by_the_device_it_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 cuda: bool) -> None:
    """`oocid train` with train.device auto: the recipe follows what auto resolves to (CUDA
    mocked); the run itself is stubbed out."""
    from typer.testing import CliRunner

    import oocid.train.loop
    from oocid.cli.app import app

    write_shards(_mixed_folder(tmp_path / "img", USERS_SIZES), tmp_path / "s", progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    seen: dict[str, Any] = {}

    def fake_train(cfg: Config, *args: Any, **kw: Any) -> Any:
        seen.update(cfg=cfg, announce=kw["announce"])
        raise SystemExit(0)

    monkeypatch.setattr(oocid.train.loop, "train", fake_train)
    res = CliRunner().invoke(app, ["train", "--shards", str(tmp_path / "s"), "--bank",
                                   str(tmp_path / "b.npy"), "--out", str(tmp_path / "r"),
                                   "--no-progress", "--lr", "0.01"])
    assert res.exit_code == 0, res.output
    assert seen["cfg"].model.arch == ("resnet18" if cuda else "small")
    assert seen["cfg"].data.image_size == (224 if cuda else 64) and seen["cfg"].optim.lr == 0.01
    assert ("the paper's ImageNet recipe" in seen["announce"]) is cuda
    assert seen["announce"].endswith(f"; then optim.lr=0.01; {HINT}")


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
    assert len(said) == 1 and said[0].endswith(f"; then optim.epochs=1 (1 step); {HINT}"), run
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["arch"] == "small" and saved["data"]["image_size"] == 16
    assert saved["data"]["flip"] is False and saved["optim"]["epochs"] == 1


@pytest.mark.parametrize("same", [False, True])
def test_the_cpu_recipe_trains_and_evaluates_larger_images(tmp_path: Path, same: bool) -> None:
    """Mixed sizes cannot be held in memory: the recipe's run streams them (random resized
    crops to 64 px in a DataLoader worker) and the kNN on mixed-size validation shards resizes
    and centre-crops each; 96 px images of one size are held in memory and cropped to 64 px in
    batches. Both paths end to end, one epoch."""
    from oocid.data.memory import InMemoryData
    from oocid.data.stream import make_train_data
    from oocid.train.loop import train

    if same:
        for name, n in (("s", 40), ("v", 10)):
            write_shards(_colour_npz(tmp_path / f"{name}.npz", n, 96), tmp_path / name,
                         progress=False)
    else:
        write_shards(_mixed_folder(tmp_path / "img", USERS_SIZES, 4), tmp_path / "s",
                     progress=False)
        write_shards(_mixed_folder(tmp_path / "vimg", USERS_SIZES), tmp_path / "v",
                     progress=False)
    cfg, _ = recipe_for(read_manifest(tmp_path / "s"), device="cpu")
    assert cfg.data.image_size == 64 and cfg.data.in_memory == "auto"
    data = make_train_data(read_manifest(tmp_path / "s"), cfg.data, 0, torch.device("cpu"))
    assert isinstance(data, InMemoryData) is same
    cfg.optim.epochs, cfg.train.eval_every, cfg.train.device = 1, 1, "cpu"
    said: list[str] = []
    res = train(cfg, tmp_path / "s", tmp_path / "b.npy", tmp_path / "r", val=tmp_path / "v",
                progress=False, log=said.append)
    assert res.step == 1 and res.metrics[-1]["images"] == 40
    assert 0.0 <= res.metrics[-1]["knn_top1"] <= 1.0 and res.metrics[-1]["bad_samples"] == 0
