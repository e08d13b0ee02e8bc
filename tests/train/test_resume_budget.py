"""Resume under changed performance settings (issue 15, item 4): the cache budget (full <->
partial), workers, threads and the checkpoint interval may change; the window of negatives is
restored by position and refilled to the current size."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import tiny_config, tiny_npz

import oocid.train.loop as loop_mod
from oocid.bank.cache import ChunkCache
from oocid.bank.store import open_store
from oocid.bank.verify import verify_store
from oocid.config import Config
from oocid.data.writer import write_shards
from oocid.errors import InputError
from oocid.train.loop import train

FULL, PARTIAL = 0.0, 0.035  # the whole bank; 4 of 6 chunks of 16 rows x 128 float32


def config(cache_mb: float, **train: int) -> Config:
    cfg = tiny_config(kind="infonce", nce_k=16)
    cfg.bank.cache_mb = cache_mb
    cfg.data.in_memory = "no"
    cfg.data.workers = 0
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    tr = tmp_path / "train"
    write_shards(tiny_npz(tmp_path / "tiny.npz"), tr, shard_size=16, seed=0, progress=False)
    return tr


@pytest.mark.parametrize(("before", "after"), [(FULL, PARTIAL), (PARTIAL, FULL)])
def test_resume_under_another_cache_budget(tmp_path: Path, shards: Path, before: float,
                                           after: float, monkeypatch: pytest.MonkeyPatch) -> None:
    bank, run = tmp_path / "bank.zarr", tmp_path / "run"
    train(config(before), shards, bank, run, progress=False, log=lambda m: None, max_epochs=1)
    caches: list[ChunkCache] = []
    make = loop_mod.make_cache
    monkeypatch.setattr(loop_mod, "make_cache",
                        lambda *a, **k: caches.append(make(*a, **k)) or caches[-1])
    cfg = config(after, threads=1, checkpoint_every=2)
    cfg.data.workers = 1
    res = train(cfg, shards, bank, run, resume=True, progress=False, log=lambda m: None)
    assert res.epochs == 3 and res.step == 3 * 3
    cache = caches[0]
    assert cache.full == (after == FULL)
    if not cache.full:
        assert len(cache.window) == cache.w
    assert verify_store(bank).ok
    with open_store(bank, read_only=True) as s:
        assert s.meta.committed_step == res.step


def test_resume_still_refuses_a_change_of_the_method(tmp_path: Path, shards: Path) -> None:
    bank, run = tmp_path / "bank.zarr", tmp_path / "run"
    train(config(FULL), shards, bank, run, progress=False, log=lambda m: None, max_epochs=1)
    cfg = config(FULL)
    cfg.optim.lr = 0.5
    with pytest.raises(InputError, match="optim.lr"):
        train(cfg, shards, bank, run, resume=True, progress=False, log=lambda m: None)
