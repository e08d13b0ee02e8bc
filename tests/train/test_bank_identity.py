"""A resume trains the bank its checkpoint trained, and stops at damage: another run's bank of
the same shards at the same step is refused (the checkpoint records the bank's id), a chunk
file missing or truncated is named, and so is the first row that is not a unit vector."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import ENV, oocid_argv, tiny_config, tiny_npz

from oocid.bank.store import open_store
from oocid.checkpoint import load_checkpoint
from oocid.config import Config
from oocid.data.writer import write_shards
from oocid.errors import DataError
from oocid.train.loop import train


def config() -> Config:
    cfg = tiny_config(kind="infonce", nce_k=16)
    cfg.data.workers = 0
    return cfg


@dataclass
class Runs:
    shards: Path
    bank: Path  # run one's bank, paired with run/last.pt
    run: Path
    other: Path  # run two's bank: same shards, same step, its own id


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    d = tmp_path_factory.mktemp("ident")
    tr = d / "train"
    write_shards(tiny_npz(d / "tiny.npz"), tr, shard_size=16, seed=0, progress=False)
    for name in ("one", "two"):
        train(config(), tr, d / f"{name}.zarr", d / name, progress=False, log=lambda m: None,
              max_epochs=1)
    return Runs(tr, d / "one.zarr", d / "one", d / "two.zarr")


def resume(runs: Runs, tmp_path: Path, bank: Path) -> None:
    """Resume a copy of run one with a copy of `bank`, one more step."""
    run, copy = tmp_path / "run", tmp_path / bank.name
    shutil.copytree(runs.run, run)
    if not copy.exists():
        shutil.copytree(bank, copy)
    train(config(), runs.shards, copy, run, resume=True, progress=False, log=lambda m: None,
          max_steps=1)


def test_the_checkpoint_records_its_banks_id_and_resume_refuses_another(runs: Runs,
                                                                        tmp_path: Path) -> None:
    with open_store(runs.bank, read_only=True) as a, open_store(runs.other, read_only=True) as b:
        assert a.meta.committed_step == b.meta.committed_step >= 0
        assert load_checkpoint(runs.run / "last.pt")["bank_id"] == a.meta.bank_id
        assert a.meta.bank_id != b.meta.bank_id
    resume(runs, tmp_path / "own", runs.bank)  # its own bank: resumes
    ckpt = f"ckpt-{load_checkpoint(runs.run / 'last.pt')['step']:09d}.pt"
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'two.zarr'}: is not the bank the "
                                                  f"checkpoint {tmp_path / 'run' / ckpt} "
                                                  "trained")):
        resume(runs, tmp_path, runs.other)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_resume_names_a_damaged_chunk_file(runs: Runs, tmp_path: Path, damage: str) -> None:
    bank = tmp_path / "one.zarr"
    shutil.copytree(runs.bank, bank)
    chunk = bank / "c.2.0"
    if damage == "missing":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[:1000])
    with pytest.raises(DataError, match=re.escape(str(chunk)) + f".*{damage}"):
        resume(runs, tmp_path, bank)


def test_resume_stops_at_a_row_that_is_not_a_unit_vector(runs: Runs, tmp_path: Path) -> None:
    import zarr

    bank = tmp_path / "one.zarr"
    shutil.copytree(runs.bank, bank)
    arr = zarr.open_array(bank, mode="r+")
    arr[50] = np.asarray(arr[50]) * 3
    with pytest.raises(DataError, match=re.escape(f"{bank}: row 50 has norm 3, not 1")):
        resume(runs, tmp_path, bank)


def test_bank_verify_and_info_name_a_truncated_chunk(runs: Runs, tmp_path: Path) -> None:
    """Was `oocid: internal error: ValueError: cannot reshape ...` (exit 70)."""
    bank = tmp_path / "one.zarr"
    shutil.copytree(runs.bank, bank)
    chunk = bank / "c.0.0"
    chunk.write_bytes(chunk.read_bytes()[:1000])
    for cmd, code in (("verify", 1), ("info", 3)):
        p = subprocess.run(oocid_argv("bank", cmd, str(bank)), env=ENV, capture_output=True,
                           text=True, timeout=120, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == code and len(lines) == 1, p
        assert f"{chunk}: the bank's chunk file is truncated or damaged (1000 bytes" in lines[0]
