"""Optional TensorBoard logging: the per-epoch metrics reach a SummaryWriter in RUN/tb; asking for
it without the package is an input error before training starts."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from oocid.config import Config, demo_config
from oocid.data.writer import write_shards
from oocid.errors import InputError
from oocid.train.loop import train


def tiny_npz(path: Path, n: int = 96, seed: int = 0) -> Path:
    """Labeled 16x16 grayscale noise images, 4 classes."""
    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.integers(0, 256, (n, 16, 16), dtype=np.uint8),
             labels=np.arange(n) % 4)
    return path


def tiny_config() -> Config:
    cfg = demo_config()
    cfg.data.image_size = 16
    cfg.data.batch_size = 32
    cfg.train.knn_k = 10
    return cfg


class FakeWriter:
    instances: ClassVar[list[FakeWriter]] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        self.flushes = 0
        FakeWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.append((tag, value, global_step))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


@pytest.fixture()
def small_shards(tmp_path: Path) -> tuple[Path, Path]:
    tr, va = tmp_path / "train", tmp_path / "val"
    write_shards(tiny_npz(tmp_path / "t.npz"), tr, shard_size=32, progress=False)
    write_shards(tiny_npz(tmp_path / "v.npz", n=40, seed=1), va, shard_size=32, progress=False)
    return tr, va


def test_metrics_reach_the_summary_writer(tmp_path: Path, small_shards: tuple[Path, Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeWriter.instances.clear()
    cfg = tiny_config()
    cfg.optim.epochs = 2
    cfg.train.tensorboard = True
    tr, va = small_shards
    run = tmp_path / "run"
    train(cfg, tr, tmp_path / "bank.npy", run, val=va, progress=False, log=lambda m: None)
    (w,) = FakeWriter.instances
    assert w.log_dir == str(run / "tb") and w.closed and w.flushes == 2
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    want = [(k, float(v), r["epoch"]) for r in recs for k, v in r.items()
            if k not in ("epoch", "step") and isinstance(v, (int, float))]
    assert w.scalars == want
    tags = {t for t, _, _ in w.scalars}
    assert {"loss", "lr", "images_per_s", "knn_top1", "skipped_steps", "bad_samples"} <= tags


def test_off_by_default_and_refused_without_the_package(
        tmp_path: Path, small_shards: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    cfg = tiny_config()
    cfg.optim.epochs = 1
    tr, _ = small_shards
    train(cfg, tr, tmp_path / "b1.npy", tmp_path / "r1", progress=False, log=lambda m: None)
    assert not (tmp_path / "r1" / "tb").exists()
    cfg.train.tensorboard = True
    with pytest.raises(InputError, match="pip install tensorboard"):
        train(cfg, tr, tmp_path / "b2.npy", tmp_path / "r2", progress=False, log=lambda m: None)
    assert not (tmp_path / "b2.npy").exists() and not (tmp_path / "r2").exists()


def test_cli_flag_sets_the_config_key(tmp_path: Path, small_shards: tuple[Path, Path],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from oocid.cli.app import app

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    tr, _ = small_shards
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\narch = "small"\n[data]\nimage_size = 16\naugment = "gray"\n'
                   'in_memory = "yes"\nworkers = 0\n[loss]\nkind = "softmax"\n[optim]\nepochs = 1\n')
    res = CliRunner().invoke(app, ["train", "--shards", str(tr), "--bank", str(tmp_path / "b.npy"),
                                   "--config", str(cfg), "--out", str(tmp_path / "r"),
                                   "--tensorboard", "--no-progress"])
    assert isinstance(res.exception, InputError) and "tensorboard" in str(res.exception)
    assert not (tmp_path / "b.npy").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_real_event_files(tmp_path: Path, small_shards: tuple[Path, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config()
    cfg.optim.epochs = 2
    cfg.train.tensorboard = True
    tr, va = small_shards
    train(cfg, tr, tmp_path / "bank.npy", tmp_path / "run", val=va, progress=False,
          log=lambda m: None)
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    acc: Any = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2]
    assert {"lr", "knn_top1", "images_per_s"} <= set(acc.Tags()["scalars"])
