"""Node-local banks: two torchrun "machines" on this host (static rendezvous, one process
each, each with its own --bank), as a user launches a multi-node run; and the settle step that
brings a machine's bank to rank 0's committed step after a kill between the two records."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import kill_config, kill_shards, oocid_argv
from PIL import Image

from oocid.bank.create import create_store
from oocid.bank.parts import chunks_of
from oocid.bank.store import open_store
from oocid.checkpoint import load_checkpoint
from oocid.cli.knn import run_knn, run_search
from oocid.errors import DataError

ENV = {k: v for k, v in os.environ.items() if k != "OOCID_DEBUG"} | {"OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def two_machines(root: Path, *extra: str) -> list[subprocess.CompletedProcess[str]]:
    port = str(free_port())
    procs = []
    for node, bank in enumerate(("a.zarr", "b.zarr")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
               str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
               "--master-port", port, "-m", "oocid", "train", "--shards", str(root / "shards"),
               "--config", str(root / "cfg.toml"), "--no-progress", "--cache-mb", "0.03",
               "--out", str(root / f"run{node}"), "--bank", str(root / bank),
               "--node-local-bank", *extra]
        procs.append(subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        o, e = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nodes")
    kill_shards(root)
    (root / "cfg.toml").write_text(kill_config(2))
    for p in two_machines(root):
        assert p.returncode == 0, p.stderr
    return root


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(oocid_argv(*args), env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)


def test_the_parts_verify_and_assemble_into_the_shared_bank_run(root: Path) -> None:
    parts = [str(root / "a.zarr"), str(root / "b.zarr")]
    ok = cli("bank", "verify", *parts)
    assert ok.returncode == 0 and "2 parts: every chunk once" in ok.stdout, ok.stderr
    one = cli("bank", "verify", parts[0])
    assert one.returncode == 0 and "one part of a node-local bank" in one.stdout
    asm = cli("bank", "assemble", *parts, "--out", str(root / "full.zarr"), "--no-progress")
    assert asm.returncode == 0, asm.stderr
    # the same 2 ranks on one machine and one shared bank train the same rows
    shared = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "oocid", "train", "--shards", str(root / "shards"), "--config",
         str(root / "cfg.toml"), "--no-progress", "--cache-mb", "0.03", "--out",
         str(root / "shared"), "--bank", str(root / "shared.zarr")],
        env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert shared.returncode == 0, shared.stderr
    with open_store(root / "full.zarr", read_only=True) as a, \
            open_store(root / "shared.zarr", read_only=True) as b:
        assert a.meta.committed_step == b.meta.committed_step
        assert np.array_equal(a.read_rows(0, a.n_rows), b.read_rows(0, b.n_rows))


def test_the_parts_carry_rank_0s_bank_id_which_the_checkpoints_record(root: Path) -> None:
    """Each machine created its own bank; the other machine's took rank 0's id when it settled,
    so the run's checkpoints pair with every part (knn, search, --resume check it)."""
    ids = []
    for bank in ("a.zarr", "b.zarr"):
        with open_store(root / bank, read_only=True) as s:
            ids.append(s.meta.bank_id)
    assert ids[0] is not None and ids[0] == ids[1] == \
        load_checkpoint(root / "run0" / "last.pt")["bank_id"]


def test_a_missing_part_is_named(root: Path) -> None:
    with pytest.raises(DataError, match="lack chunk"):
        chunks_of([root / "a.zarr"])


def test_knn_over_the_parts_equals_knn_over_the_assembled_bank(root: Path) -> None:
    full = root / "full.zarr"
    if not full.exists():
        assert cli("bank", "assemble", str(root / "a.zarr"), str(root / "b.zarr"), "--out",
                   str(full), "--no-progress").returncode == 0
    ckpt, shards = root / "run0" / "last.pt", root / "shards"
    parts = [root / "a.zarr", root / "b.zarr"]
    acc_parts = run_knn(parts, ckpt, shards, None, [5], 0.07, "cpu")
    acc_full = run_knn(full, ckpt, shards, None, [5], 0.07, "cpu")
    assert acc_parts["top1"] == acc_full["top1"]
    queries = root / "queries"
    queries.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(queries / f"{i}.png")
    _, hits_parts = run_search(parts, ckpt, [queries], None, 7, "cpu")
    _, hits_full = run_search(full, ckpt, [queries], None, 7, "cpu")
    assert [[n["index"] for n in h.neighbours] for h in hits_parts] == \
        [[n["index"] for n in h.neighbours] for h in hits_full]


def test_settle_commits_the_parts_of_the_step_rank_0_committed(tmp_path: Path) -> None:
    s = create_store(tmp_path / "b.zarr", 64, 8, chunk_rows=16)
    first = s.read_rows(0, 64)
    new = np.eye(8, dtype=np.float32)[np.arange(16) % 8]
    s.writer = "r1"
    s.write_part({1: new})  # this machine's part of step 5; killed before its own record
    s.close()
    s = open_store(tmp_path / "b.zarr", recover=False)
    s.settle(5)  # rank 0 committed step 5
    assert s.meta.committed_step == 5
    assert np.array_equal(s.read_rows(16, 32), new)
    s.write_part({2: new})  # a part of step 6, which rank 0 never committed
    s.close()
    s = open_store(tmp_path / "b.zarr", recover=False)
    s.settle(5)
    assert np.array_equal(s.read_rows(32, 48), first[32:48])  # discarded
    with pytest.raises(DataError, match=r"holds step 5, ahead of the run's last commit \(step 4\): "
                                        "another run's bank"):
        s.settle(4)
    s.close()


def test_settle_refuses_a_bank_more_than_one_commit_behind(tmp_path: Path) -> None:
    """Rank 0's bank remembers the commit before its last: a node-local bank at neither is an
    older copy (or another run's), whose parts must not be committed as the run's step."""
    s = create_store(tmp_path / "b.zarr", 64, 8, chunk_rows=16)
    s.write_chunks({0: np.eye(8, dtype=np.float32)[np.arange(16) % 8]}, step=3)
    s.writer = "r1"
    s.write_part({1: np.full((16, 8), 0.5, np.float32)})  # of the commit after step 3
    s.close()
    s = open_store(tmp_path / "b.zarr", recover=False)
    with pytest.raises(DataError, match="holds step 3, but the run's last two commits are steps "
                                        "5 and 9: an older copy of this machine's bank"):
        s.settle(9, 5)
    assert s.meta.committed_step == 3 and len(s._part_files()) == 1  # untouched
    s.settle(9, 3)  # one commit behind: its parts are the step's
    assert (s.meta.committed_step, s.meta.previous_step) == (9, 3)
    assert np.array_equal(s.read_rows(16, 32), np.full((16, 8), 0.5, np.float32))
    s.settle(9, 3)  # at the run's step: nothing to do
    s.close()
