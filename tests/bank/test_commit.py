"""One atomic commit for any size (oocid.bank.store): a commit split into many journal parts,
killed between any two parts, before or after its record, or while it is applied, reopens as
exactly the old or the new committed bank; evicted chunks stay in parts until the next commit."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import oocid.bank.store as store_mod
from oocid.bank.cache import ChunkCache
from oocid.bank.create import create_store
from oocid.bank.journal import write_journal
from oocid.bank.meta import BANK_VERSION
from oocid.bank.store import open_store
from oocid.bank.verify import verify_store

KINDS = ["zarr", "npy"]
N, D, R = 48, 2, 4  # 12 chunks of 4 rows; 32 bytes a chunk


class Killed(Exception):
    """Stands for a kill at the injected point."""


def dies_after(k: int, real: Callable[..., Any]) -> Callable[..., Any]:
    """`real`, but the call after its k-th raises Killed."""
    calls = [0]

    def dying(*a: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] > k:
            raise Killed
        return real(*a, **kw)
    return dying


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    monkeypatch.setattr(store_mod, "MAX_WRITE_BYTES", 2 * R * D * 4)  # 2 chunks a part


def new_rows(seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return {c: x[c * R:(c + 1) * R] for c in range(N // R)}


def state(path: Path) -> tuple[np.ndarray, int]:
    with open_store(path) as s:
        assert not s._part_files() and not s._journal.exists()
        got = s.read_rows(0, N), s.meta.committed_step
    assert verify_store(path).ok
    return got


def make(tmp_path: Path, kind: str) -> tuple[Path, np.ndarray]:
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / f"b.{kind}"
    with create_store(path, N, D, chunk_rows=R) as s:
        s.write_chunks(new_rows(0), step=3)
        return path, s.read_rows(0, N)


def n_journals(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many journal files (parts + record) a commit of the whole bank writes."""
    path, _ = make(tmp_path, kind)
    for k in range(100):
        with monkeypatch.context() as m, open_store(path) as s:
            m.setattr(store_mod, "write_journal", dies_after(k, store_mod.write_journal))
            try:
                s.write_chunks(new_rows(1), step=4)
            except Killed:
                continue
        return k
    raise AssertionError("no end")


@pytest.mark.parametrize("kind", KINDS)
def test_a_commit_of_many_parts_is_all_or_none(tmp_path: Path, kind: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    n = n_journals(tmp_path / "count", kind, monkeypatch)
    assert n == 6  # 5 parts of 2 chunks, then the record with the last 2
    want_new = np.concatenate(list(new_rows(1).values()))
    points = [("journal", k) for k in range(n)] + [("apply", k) for k in range(0, 12, 3)] \
        + [("unlink", 0)]
    for where, k in points:
        path, old = make(tmp_path / f"{where}{k}", kind)
        s = open_store(path)
        with monkeypatch.context() as m:
            if where == "journal":  # killed before the k-th journal file is committed
                m.setattr(store_mod, "write_journal", dies_after(k, store_mod.write_journal))
            elif where == "apply":  # killed after the record, k chunks into the rows
                m.setattr(s._rows, "write", dies_after(k, s._rows.write))
            else:  # killed after committed_step was set, before the files were deleted
                m.setattr(Path, "unlink", lambda self, missing_ok=False: (_ for _ in ()).throw(Killed))
            with pytest.raises(Killed):
                s.write_chunks(new_rows(1), step=4)
        s.close()
        rows, step = state(path)
        if where == "journal":
            assert step == 3
            np.testing.assert_array_equal(rows, old)
        else:
            assert step == 4
            np.testing.assert_array_equal(rows, want_new)


@pytest.mark.parametrize("kind", KINDS)
def test_written_parts_stay_out_of_the_rows_until_the_commit(tmp_path: Path, kind: str) -> None:
    path, old = make(tmp_path, kind)
    new = new_rows(1)
    s = open_store(path)
    for round_ in range(3):  # chunk 0 written three times: superseded parts are deleted
        s.write_part({0: new[0] * (1 if round_ == 2 else -1), 5: new[5]})
    s.write_part({7: new[7]})
    np.testing.assert_array_equal(s.read_chunk(0), new[0])
    np.testing.assert_array_equal(s.read_index(np.array([29, 1, 21])),
                                  np.stack([new[7][1], new[0][1], new[5][1]]))
    assert len(s._part_files()) == 2
    with open_store(path, read_only=True) as r:  # another reader sees only the committed bank
        np.testing.assert_array_equal(r.read_rows(0, N), old)
    s.close()  # "killed": the parts were never committed
    rows, step = state(path)
    assert step == 3
    np.testing.assert_array_equal(rows, old)
    with open_store(path) as s:  # committed with the next commit, whose record lists them
        s.write_part({0: new[0], 5: new[5]})
        s.write_chunks({9: new[9]}, step=4)
    rows, step = state(path)
    want = old.copy()
    for c in (0, 5, 9):
        want[c * R:(c + 1) * R] = new[c]
    assert step == 4
    np.testing.assert_array_equal(rows, want)


@pytest.mark.parametrize("kind", KINDS)
def test_a_partial_cache_commit_killed_anywhere_is_old_or_new(
        tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Evictions between commits write parts; a kill before the record keeps the last commit."""
    def run(path: Path, kill_at: int) -> None:
        s = open_store(path)
        cache = ChunkCache(s, 4 * R, torch.device("cpu"), steps_per_epoch=6, prefetch=False)
        g = torch.Generator().manual_seed(0)
        try:
            with monkeypatch.context() as m:
                m.setattr(store_mod, "write_journal", dies_after(kill_at, store_mod.write_journal))
                for _ in range(12):
                    idx = torch.unique(torch.randint(0, N, (3,), generator=g))
                    cache.update(idx, torch.nn.functional.normalize(
                        torch.randn(len(idx), D, generator=g)))
                    cache.end_step()
                cache.commit(4)
        finally:
            cache.close()
            s.close()

    base, old = make(tmp_path / "base", kind)
    run(base, 10**6)
    new, step = state(base)
    assert step == 4 and not np.array_equal(new, old)
    for k in range(100):
        path, _ = make(tmp_path / f"k{k}", kind)
        try:
            run(path, k)
        except Killed:
            rows, step = state(path)
            assert step == 3, k
            np.testing.assert_array_equal(rows, old)
        else:
            break
    assert k > 5  # evictions wrote parts before the commit's own
    np.testing.assert_array_equal(state(path)[0], new)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("version", [1, 2])
def test_an_older_bank_and_its_journal_are_still_read(tmp_path: Path, kind: str, version: int
                                                      ) -> None:
    """Versions 1 and 2 (no previous_step) are replayed and upgraded."""
    path, old = make(tmp_path, kind)
    s = open_store(path)
    meta_path = s._meta_path
    write_journal(s._journal_tmp, s._journal, [(1, new_rows(1)[1])], "float32", D, 7, path)
    s.close()
    meta = json.loads(meta_path.read_text())
    meta["version"] = version
    del meta["previous_step"]
    meta_path.write_text(json.dumps(meta))
    rows, step = state(path)
    want = old.copy()
    want[R:2 * R] = new_rows(1)[1]
    meta = json.loads(meta_path.read_text())
    assert step == 7 and meta["version"] == BANK_VERSION == 3 and meta["previous_step"] == 3
    np.testing.assert_array_equal(rows, want)


def test_a_commit_remembers_the_step_before(tmp_path: Path) -> None:
    path, _ = make(tmp_path, "npy")
    with open_store(path) as s:
        assert (s.meta.committed_step, s.meta.previous_step) == (3, -1)
        s.write_chunks({0: new_rows(1)[0]}, step=5)
        s.write_chunks({0: new_rows(2)[0]}, step=9)
        s.write_chunks({0: new_rows(3)[0]}, step=9)  # the same step again (a final checkpoint)
        assert (s.meta.committed_step, s.meta.previous_step) == (9, 5)
    with open_store(path) as s:
        assert (s.meta.committed_step, s.meta.previous_step) == (9, 5)

