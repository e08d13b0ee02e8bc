"""A training process killed with SIGKILL at a random moment leaves a bank that verifies, and
`--resume` then completes the run (docs/design.md: crash safety)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from oocid.bank.store import open_store
from oocid.bank.verify import verify_store
from oocid.data.writer import write_shards

CONFIG = """
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
epochs = 8
schedule = "cosine"
lr = 0.03
[bank]
cache_mb = 0.05
[train]
eval_every = 0
"""


def make_shards(root: Path, n: int = 192) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, 16, 16), dtype=np.uint8)
    np.savez(root / "data.npz", images=images, labels=np.arange(n) % 3)
    write_shards(root / "data.npz", root / "shards", shard_size=16, progress=False)
    return root / "shards"


def oocid(*args: str) -> list[str]:
    return [sys.executable, "-m", "oocid", *args]


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_then_verify_and_resume(tmp_path: Path, seed: int) -> None:
    shards = make_shards(tmp_path)
    (tmp_path / "cfg.toml").write_text(CONFIG)
    bank, run = tmp_path / "bank.npy", tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "OOCID_DEBUG"}
    args = oocid("train", "--shards", str(shards), "--bank", str(bank), "--out", str(run),
                 "--config", str(tmp_path / "cfg.toml"), "--no-progress")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # wait for training to be under way (one epoch committed)
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    time.sleep(random.Random(seed).uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    rep = verify_store(bank)
    assert rep.ok, rep.problems
    with open_store(bank, read_only=True) as st:
        step = st.meta.committed_step
    assert step > 0
    assert (run / f"ckpt-{step:09d}.pt").is_file()

    res = subprocess.run(oocid("train", "--shards", str(shards), "--bank", str(bank), "--out",
                               str(run), "--resume", "--no-progress"),
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 9))  # each once: a line lost to the kill comes from the checkpoint
    assert verify_store(bank).ok
