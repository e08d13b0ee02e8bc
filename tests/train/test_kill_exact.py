"""Kill-exactness: a partial-cache run killed with SIGKILL at random moments and resumed each
time equals the uninterrupted run bit for bit, bank and weights (CPU). The bank on disk only ever
holds the last checkpoint's rows (evictions wait in journal parts), so a resume starts from
exactly the state the uninterrupted run had at that checkpoint (docs/design.md)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import kill_config, kill_shards, oocid_argv

from oocid.bank.store import open_store
from oocid.bank.verify import verify_store

CONFIG = kill_config(25)

ENV = {k: v for k, v in os.environ.items() if k != "OOCID_DEBUG"} | {"OMP_NUM_THREADS": "1"}


def run_args(shards: Path, bank: Path, run: Path, cfg: Path, every: int) -> list[str]:
    return oocid_argv("train", "--shards", str(shards), "--bank", str(bank), "--out", str(run),
                 "--config", str(cfg), "--no-progress", "--checkpoint-every", str(every))


def inode(path: Path) -> int:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return -1


def final(bank: Path, run: Path) -> tuple[np.ndarray, dict[str, torch.Tensor], int]:
    assert verify_store(bank).ok
    with open_store(bank, read_only=True) as s:
        rows, step = s.read_rows(0, s.n_rows), s.meta.committed_step
    model = torch.load(run / "last.pt", map_location="cpu", weights_only=False)["model"]
    return rows, model, step


@pytest.mark.parametrize("every", [5, 40])
def test_killed_and_resumed_partial_cache_run_is_bit_identical(tmp_path: Path, every: int) -> None:
    shards = kill_shards(tmp_path)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG)
    ref = subprocess.run(run_args(shards, tmp_path / "ref.npy", tmp_path / "ref", cfg, every),
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    assert "window of negatives holds" in ref.stderr  # a partial cache (0.05 MB: 4 of 12 chunks)
    bank, run = tmp_path / "bank.npy", tmp_path / "run"
    rng = random.Random(every)
    kills = 0
    for attempt in range(6):
        args = run_args(shards, bank, run, cfg, every) + (["--resume"] if attempt else [])
        proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline, before = time.time() + 120, inode(run / "last.pt")
        while inode(run / "last.pt") == before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)  # until this attempt has written a checkpoint: training under way
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        assert verify_store(bank).ok
    else:
        res = subprocess.run([*run_args(shards, bank, run, cfg, every), "--resume"], env=ENV,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
    assert kills >= 2
    want_rows, want_model, want_step = final(tmp_path / "ref.npy", tmp_path / "ref")
    rows, model, step = final(bank, run)
    assert step == want_step
    np.testing.assert_array_equal(rows, want_rows)
    for k, v in want_model.items():
        assert torch.equal(model[k], v), k
