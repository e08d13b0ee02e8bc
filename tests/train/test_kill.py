"""A training process killed with SIGKILL at a random moment leaves a bank that verifies, and
`--resume` then completes the run (docs/design.md: crash safety)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import kill_config, kill_shards, oocid_argv

from oocid.bank.store import open_store
from oocid.bank.verify import verify_store

CONFIG = kill_config(8)


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_then_verify_and_resume(tmp_path: Path, seed: int) -> None:
    shards = kill_shards(tmp_path)
    (tmp_path / "cfg.toml").write_text(CONFIG)
    bank, run = tmp_path / "bank.npy", tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "OOCID_DEBUG"}
    args = oocid_argv("train", "--shards", str(shards), "--bank", str(bank), "--out", str(run),
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

    res = subprocess.run(oocid_argv("train", "--shards", str(shards), "--bank", str(bank), "--out",
                               str(run), "--resume", "--no-progress"),
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 9))  # each once: a line lost to the kill comes from the checkpoint
    assert verify_store(bank).ok
