"""`torchrun ... -m oocid train` as a user launches it: gloo, 2 processes on the CPU.

A world of one equals plain `oocid train` bit for bit; two processes train the whole bank (every
row written each epoch, `bank verify` passes, one result line); SIGKILL of one rank stops the
run with the bank at its last commit, and `--resume` (2 processes, or 1) completes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import kill_config, kill_shards, oocid_argv

from oocid.bank.create import create_store
from oocid.bank.store import open_store
from oocid.bank.verify import verify_store
from oocid.cli.knn import run_knn
from oocid.config import Config

ENV = {k: v for k, v in os.environ.items() if k != "OOCID_DEBUG"} | {"OMP_NUM_THREADS": "1"}
EPOCHS = 3


def torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(n), "-m", "oocid", *args]


def train_args(root: Path, name: str, *extra: str) -> list[str]:
    return ["train", "--shards", str(root / "shards"), "--bank", str(root / f"{name}.zarr"),
            "--out", str(root / name), "--config", str(root / "cfg.toml"), "--no-progress",
            "--cache-mb", "0.03", "--val", str(root / "shards"), *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, check=False)


def result(root: Path, name: str) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    bank = root / f"{name}.zarr"
    assert verify_store(bank).ok
    with open_store(bank, read_only=True) as s:
        rows = s.read_rows(0, s.n_rows)
    model = torch.load(root / name / "last.pt", map_location="cpu", weights_only=False)["model"]
    return rows, model


def same(a: tuple[np.ndarray, dict[str, torch.Tensor]],
         b: tuple[np.ndarray, dict[str, torch.Tensor]]) -> bool:
    return bool(np.array_equal(a[0], b[0])) and a[1].keys() == b[1].keys() and all(
        torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    kill_shards(root)  # 192 noise images in 12 shards of 16, labels 0..2
    (root / "cfg.toml").write_text(kill_config(EPOCHS))
    return root


@pytest.fixture(scope="module")
def two(root: Path) -> tuple[subprocess.CompletedProcess[str], tuple[np.ndarray, dict]]:
    p = run(torchrun(2, *train_args(root, "two", "--checkpoint-every", "2")))
    assert p.returncode == 0, p.stderr
    return p, result(root, "two")


def test_a_world_of_one_is_plain_oocid_train(root: Path) -> None:
    plain = run(oocid_argv(*train_args(root, "plain")))
    one = run(torchrun(1, *train_args(root, "one")))
    assert plain.returncode == 0 and one.returncode == 0, plain.stderr + one.stderr
    assert same(result(root, "plain"), result(root, "one"))


def test_two_processes_train_every_row_of_the_bank(root: Path, two: tuple) -> None:
    p, (rows, _) = two
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 reports; rank 1 is quiet
    cfg = Config()
    init = create_store(root / "init.zarr", 192, cfg.model.dim, chunk_rows=16, seed=cfg.bank.seed)
    first = init.read_rows(0, 192)
    init.close()
    assert (np.abs(rows - first).max(axis=1) > 0).all()  # every row written
    metrics = (root / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == EPOCHS
    last = json.loads(metrics[-1])
    assert last["images"] == 192  # both ranks' samples, each once
    # the end-of-run kNN, scored in parts and merged, is what `oocid knn` finds on the bank
    one = run_knn(root / "two.zarr", root / "two" / "last.pt", root / "shards", None,
                  [Config().train.knn_k], Config().train.knn_temperature, "cpu")
    assert last["knn_top1"] == one["top1"]


def workers(parent: int) -> list[int]:
    """The pids whose parent is `parent` (torchrun's worker processes)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                out.append(int(d.name))
    return out


@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_rank_stops_the_run_and_resume_completes_it(root: Path, two: tuple,
                                                            victim: int) -> None:
    name = f"kill{victim}"
    args = train_args(root, name, "--checkpoint-every", "2")
    p = subprocess.Popen(torchrun(2, *args), env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((root / name).glob("ckpt-*")) and time.monotonic() < deadline \
            and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3 * victim)
    ranks = sorted(workers(p.pid))
    assert p.poll() is None and len(ranks) == 2, "the run ended before the kill"
    os.kill(ranks[victim], signal.SIGKILL)
    p.communicate(timeout=240)
    assert p.returncode != 0  # torchrun's agent stops the other rank and fails the run
    assert verify_store(root / f"{name}.zarr").ok
    again = run(torchrun(2, *args, "--resume"))
    assert again.returncode == 0, again.stderr
    assert same(result(root, name), two[1])  # as if never killed


def test_a_sigtermed_rank_says_it_was_interrupted_in_torchruns_summary(root: Path) -> None:
    """SIGTERM to one process (as a scheduler or a user's `kill` sends): it stops as on Ctrl-C
    and torchrun's summary shows it as the root cause, exit 143 with the line, not "Signal 15
    (SIGTERM) received by PID"; the bank verifies."""
    name = "term"
    p = subprocess.Popen(torchrun(2, *train_args(root, name, "--checkpoint-every", "2")),
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((root / name).glob("ckpt-*")) and time.monotonic() < deadline \
            and p.poll() is None:
        time.sleep(0.05)
    ranks = sorted(workers(p.pid))
    assert p.poll() is None and len(ranks) == 2, "the run ended before the signal"
    os.kill(ranks[1], signal.SIGTERM)
    _, err = p.communicate(timeout=240)
    assert p.returncode != 0
    cause = err.split("Root Cause")[-1]
    assert "exitcode  : 143" in cause, err
    assert ("traceback : oocid: stopped by SIGTERM (torchrun's summary names the process that "
            "failed first, if one did); interrupted; the bank and the last checkpoint are intact "
            "(a run continues with --resume)") in cause, err
    assert verify_store(root / f"{name}.zarr").ok


def test_a_two_process_run_resumes_as_one(root: Path) -> None:
    args = train_args(root, "shrink", "--checkpoint-every", "2")
    first = run(torchrun(2, *args, "--max-steps", "5"))
    assert first.returncode == 0, first.stderr
    again = run(oocid_argv(*args, "--resume"))
    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stderr
    rows, _ = result(root, "shrink")
    assert np.isfinite(rows).all()
    assert len((root / "shrink" / "metrics.jsonl").read_text().splitlines()) == EPOCHS


def test_uneven_shards_idle_steps_stop_and_resume(tmp_path: Path) -> None:
    """13 shards of 16: rank 0 has 7 batches an epoch, rank 1 has 6 and joins the 7th step
    idle. With --val (k = 200 > either rank's rows), --max-steps then --resume equals the
    uninterrupted run bit for bit, with model.sync_batchnorm and negatives exchanged across
    processes (the idle step joins DDP's, the BatchNorm's and the exchange's collectives in the
    real steps' order)."""
    kill_shards(tmp_path, n=208)
    (tmp_path / "cfg.toml").write_text(kill_config(2))
    extra = ["--set", "model.sync_batchnorm=true", "--set", 'loss.negatives_from="whole"']
    full = run(torchrun(2, *train_args(tmp_path, "full", *extra)))
    assert full.returncode == 0, full.stderr
    part = train_args(tmp_path, "part", *extra)
    first = run(torchrun(2, *part, "--max-steps", "5"))
    assert first.returncode == 0, first.stderr
    again = run(torchrun(2, *part, "--resume"))
    assert again.returncode == 0, again.stderr
    assert same(result(tmp_path, "part"), result(tmp_path, "full"))
    last = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["images"] == 208 and last["step"] == 14 and "knn_top1" in last


def test_a_bad_argument_is_said_once_and_named_in_torchruns_summary(root: Path) -> None:
    """Both processes fail on the same missing folder: at most one of them prints the line (the
    first may be stopped by torchrun before it does), and torchrun's failure summary names it
    instead of its "To enable traceback see ..." (for the first process to fail at least)."""
    args = train_args(root, "bad")
    args[args.index("--shards") + 1] = str(root / "no-such-shards")
    p = run(torchrun(2, *args))
    assert p.returncode != 0
    line = f"oocid: error: {root / 'no-such-shards'}: no such shard folder"
    assert sum(s == line for s in p.stderr.splitlines()) <= 1, p.stderr
    assert f"traceback : {line}" in p.stderr, p.stderr
