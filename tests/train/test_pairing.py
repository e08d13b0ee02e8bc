"""The bank on disk stays paired with the last checkpoint between checkpoints: the --val kNN
writes nothing to it, and a partial cache's evictions stay in journal parts until the commit
(docs/design.md, "Journal and crash safety")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_config, tiny_npz

import oocid.train.evaluator as evaluator_mod
from oocid.bank.store import open_store
from oocid.bank.verify import verify_store
from oocid.config import Config
from oocid.data.writer import write_shards
from oocid.train.loop import train


class Killed(Exception):
    """Stands for a kill during the evaluation."""


def config(cache_mb: float) -> Config:
    cfg = tiny_config(kind="infonce", nce_k=16)
    cfg.bank.cache_mb = cache_mb
    cfg.train.eval_every = 1
    cfg.data.in_memory = "no"
    cfg.data.workers = 0
    return cfg


@pytest.fixture()
def shards(tmp_path: Path) -> tuple[Path, Path]:
    tr, va = tmp_path / "train", tmp_path / "val"
    write_shards(tiny_npz(tmp_path / "tiny.npz"), tr, shard_size=16, seed=0, progress=False)
    write_shards(tiny_npz(tmp_path / "v.npz", n=40, seed=1), va, shard_size=16, progress=False)
    return tr, va


def bank_state(path: Path) -> tuple[np.ndarray, int]:
    assert verify_store(path).ok
    with open_store(path, read_only=True) as s:
        return s.read_rows(0, s.n_rows), s.meta.committed_step


@pytest.mark.parametrize("cache_mb", [0.035, 0.0])  # 4 of 6 chunks; the whole bank
def test_a_kill_during_the_evaluation_leaves_bank_and_checkpoint_paired(
        tmp_path: Path, shards: tuple[Path, Path], cache_mb: float,
        monkeypatch: pytest.MonkeyPatch) -> None:
    tr, va = shards
    one = train(config(cache_mb), tr, tmp_path / "one.npy", tmp_path / "one", val=va,
                progress=False, log=lambda m: None, max_epochs=1)
    real, calls = evaluator_mod.knn_streamed, [0]

    def dying(*a: object, **kw: object) -> dict[str, float]:
        calls[0] += 1
        if calls[0] == 2:
            raise Killed
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(evaluator_mod, "knn_streamed", dying)
    with pytest.raises(Killed):  # killed in epoch 2's kNN, before its checkpoint
        train(config(cache_mb), tr, tmp_path / "two.npy", tmp_path / "two", val=va,
              progress=False, log=lambda m: None)
    ckpts = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "two").glob("ckpt-*.pt"))
    rows, step = bank_state(tmp_path / "two.npy")
    want, want_step = bank_state(tmp_path / "one.npy")
    assert step == want_step == one.step == ckpts[-1]
    np.testing.assert_array_equal(rows, want)
