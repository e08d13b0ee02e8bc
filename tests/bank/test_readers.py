"""Readers during training: a trainer commits every few steps while read-only opens verify the
bank, and `oocid bank verify` / `bank info` run as processes; every read sees committed rows
only, so every verify passes and nothing fails (docs/design.md, "Readers")."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from helpers import ENV, kill_config, kill_shards, oocid_argv

from oocid.bank.store import open_store
from oocid.bank.verify import verify_store

CONFIG = kill_config(30) + "checkpoint_every = 2\n"


@pytest.mark.parametrize("kind", ["zarr", "npy"])
def test_readers_during_training(tmp_path: Path, kind: str) -> None:
    shards = kill_shards(tmp_path)
    (tmp_path / "cfg.toml").write_text(CONFIG)
    bank, run = tmp_path / f"bank.{kind}", tmp_path / "run"
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    trainer = subprocess.Popen(
        oocid_argv("train", "--shards", str(shards), "--bank", str(bank), "--out", str(run),
                   "--config", str(tmp_path / "cfg.toml"), "--no-progress"),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not list(run.glob("ckpt-*.pt")) and trainer.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert trainer.poll() is None, trainer.stderr.read().decode() if trainer.stderr else ""
        opens = pending = procs = 0
        stop = time.time() + 25
        while trainer.poll() is None and time.time() < stop:
            rep = verify_store(bank)
            assert rep.ok, rep.problems
            with open_store(bank, read_only=True) as store:
                pending += store.pending_journal
                for _, x in store.iter_chunks():
                    assert x.shape[1] == store.dim
            opens += 2
            if opens % 10 == 0:
                for cmd in ("verify", "info"):
                    p = subprocess.run(oocid_argv("bank", cmd, str(bank)), env=env,
                                       capture_output=True, text=True, timeout=120)
                    assert p.returncode == 0, (cmd, p.stdout, p.stderr)
                    assert "Traceback" not in p.stderr
                    procs += 1
        assert opens >= 10, opens
    finally:
        if trainer.poll() is None:
            trainer.kill()
        trainer.wait()
    assert verify_store(bank).ok
