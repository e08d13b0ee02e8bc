"""Small synthetic data and configs shared by the tests, and a runner for `oocid` processes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from oocid.config import Config, demo_config


def tiny_npz(path: Path, n: int = 96, size: int = 16, classes: int = 4, seed: int = 0,
             keep: list[int] | None = None, names: list[str] | None = None) -> Path:
    """Synthetic labeled grayscale images: each class a different bar orientation plus noise.
    `keep`: only the images of these classes (the same images as without it), relabeled
    0, 1, ... in this order, as a folder of only those classes numbers them; `names`: the class
    names (default c0, c1, ...: each class's name before `keep`)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.zeros((n, size, size), dtype=np.uint8)
    for i, c in enumerate(labels):
        pattern = [(xx // 3) % 2, (yy // 3) % 2, ((xx + yy) // 3) % 2, ((xx - yy) // 3) % 2][c % 4]
        img = pattern * 180 + rng.integers(0, 60, (size, size))
        images[i] = np.clip(img, 0, 255)
    class_names = [f"c{i}" for i in range(classes)]
    if keep is not None:
        rows = np.isin(labels, keep)
        images, labels = images[rows], np.array([keep.index(c) for c in labels[rows]])
        class_names = [class_names[c] for c in keep]
    np.savez(path, images=images, labels=labels.astype(np.int64),
             class_names=np.array(names if names is not None else class_names))
    return path


def tiny_config(**loss: object) -> Config:
    cfg = demo_config()
    cfg.data.image_size = 16
    cfg.data.batch_size = 32
    cfg.optim.epochs = 3
    cfg.optim.lr = 0.05
    cfg.train.knn_k = 10
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    return cfg


@dataclass
class TinyRun:
    d: Path
    train: Path  # shards
    bank: Path
    run: Path  # the run folder (last.pt in it)


def tiny_run(d: Path, val: Path | None = None) -> TinyRun:
    """The tiny set (`tiny_npz`: 96 images of 16 px, 4 classes) sharded at D/train and trained
    for one epoch of `tiny_config` into D/bank.zarr and D/run (`val`: with that --val)."""
    from oocid.data.writer import write_shards
    from oocid.train.loop import train

    write_shards(tiny_npz(d / "t.npz"), d / "train", shard_size=32, progress=False)
    cfg = tiny_config()
    cfg.optim.epochs = 1
    train(cfg, d / "train", d / "bank.zarr", d / "run", val=val, progress=False,
          log=lambda m: None)
    return TinyRun(d, d / "train", d / "bank.zarr", d / "run")


ENV = {k: v for k, v in os.environ.items() if k != "OOCID_DEBUG"}
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
SLOTS = threading.BoundedSemaphore(max(2, CPUS))  # `oocid` processes running at once


@dataclass(repr=False)
class Run:
    """One finished `oocid` process."""

    args: list[str]
    rc: int
    out: str
    err: str

    def __repr__(self) -> str:
        return (f"oocid {' '.join(self.args)}\n-> exit {self.rc}\n"
                f"--- stdout\n{self.out}\n--- stderr\n{self.err}")

    def last_json(self) -> dict[str, Any]:
        return dict(json.loads(self.out.strip().splitlines()[-1]))


def in_process(monkeypatch: Any, capsys: Any, *args: object) -> Run:
    """`oocid ARGS` run in this process through the real entry point (oocid.cli.entry.main),
    which always exits: its exit status (0 for none), stdout and stderr."""
    from oocid.cli.entry import main

    argv = [str(a) for a in args]
    monkeypatch.setattr(sys, "argv", ["oocid", *argv])
    try:
        main()
        code: object = 0  # pragma: no cover - main always exits
    except SystemExit as e:
        code = e.code
    got = capsys.readouterr()
    return Run(argv, int(code) if isinstance(code, int) else (0 if code is None else 1),
               got.out, got.err)


def run_process(cmd: list[str], argv: list[str], env: dict[str, str]) -> Run:
    """Run `cmd` (an `oocid` invocation whose arguments are `argv`), at most SLOTS at once."""
    with SLOTS:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    return Run(argv, p.returncode, p.stdout, p.stderr)


# A partial-cache NCE run on 16 px noise images, for the kill tests (SIGKILL at any moment).
KILL_CONFIG = """
[model]
arch = "small"
[data]
image_size = 16
augment = "gray"
in_memory = "no"
workers = 0
batch_size = 16
shuffle_buffer = 16
mean = [0.5]
std = [0.25]
[loss]
kind = "nce"
nce_k = 32
z = "ema"
temperature = 0.1
[optim]
epochs = {epochs}
schedule = "cosine"
lr = 0.03
[bank]
cache_mb = 0.05
[train]
eval_every = 0
"""


def kill_config(epochs: int) -> str:
    return KILL_CONFIG.format(epochs=epochs)


def kill_shards(root: Path, n: int = 192) -> Path:
    """n 16 x 16 noise images in shards of 16 (one bank chunk each) under root/shards."""
    from oocid.data.writer import write_shards

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, 16, 16), dtype=np.uint8)
    np.savez(root / "data.npz", images=images, labels=np.arange(n) % 3)
    write_shards(root / "data.npz", root / "shards", shard_size=16, progress=False)
    return root / "shards"


def oocid_argv(*args: str) -> list[str]:
    """The command line of `python -m oocid ARGS` with this interpreter."""
    return [sys.executable, "-m", "oocid", *args]


TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str) -> ModuleType:
    """tools/NAME.py imported as the module NAME, as running the script would load it."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def tiny_nce_step(path: Path, z: str = "ema", n: int = 512) -> tuple[Any, Any, Any]:
    """(NPIDStep, its ZEstimator, the store): the small net, NCE with K 32, over an in-memory
    bank of `n` rows created at `path` (one process, CPU); close the store when done."""
    import torch

    from oocid.bank.create import create_store
    from oocid.bank.incore import InCoreBank
    from oocid.method.npid import NPIDStep
    from oocid.method.zest import ZEstimator
    from oocid.models import build_model
    from oocid.train.setup import build_optimizer

    cfg = tiny_config(kind="nce", nce_k=32, z=z)
    store = create_store(path, n, 128, chunk_rows=128)
    model = build_model("small", 1, 128)
    zest = ZEstimator(cfg.loss.z)
    step = NPIDStep(cfg, model, build_optimizer(cfg, model), InCoreBank(store, torch.device("cpu")),
                    n, zest, 0)
    return step, zest, store


def assert_device_reads_on_check_steps(watch: Any, step: Any) -> None:
    """`watch` (a CollapseWatch) reads what `step` holds on a meta tensor (a GPU's: reading it
    back raises) at the first step and at CHECK_EVERY, and at no step between."""
    import pytest

    from oocid.method.npid import StepOut

    n = watch.CHECK_EVERY
    with pytest.raises((RuntimeError, NotImplementedError)):
        watch.check(1, StepOut(5.0, False), step)
    for i in range(2, n):
        watch.check(i, StepOut(5.0, False), step)
    with pytest.raises((RuntimeError, NotImplementedError)):
        watch.check(n, StepOut(5.0, False), step)
