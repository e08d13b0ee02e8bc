"""Tests for oocid.bank.store: both backends, read-back properties, crash recovery, errors, verify."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oocid.bank.create import _init_rows, create_store, write_rows
from oocid.bank.journal import write_journal
from oocid.bank.store import BankStore, open_store
from oocid.bank.verify import check_matches, store_info, verify_store
from oocid.errors import DataError, InputError, WriteError

KINDS = ["zarr", "npy"]
REPO = Path(__file__).resolve().parents[2]


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """(n, d) float32 random unit rows."""
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def expected_init(n: int, d: int, chunk_rows: int, seed: int) -> np.ndarray:
    """(n, d) the rows `create_store` must produce."""
    return np.concatenate([_init_rows(seed, c, min(chunk_rows, n - c * chunk_rows), d)
                           for c in range(-(-n // chunk_rows))])


@pytest.fixture
def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip fsync (only durability against power loss needs it) to keep many-write tests fast."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)


def journal_paths(store: BankStore) -> tuple[Path, Path]:
    return store._journal, store._journal_tmp


# ---- create / open ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("kind", KINDS)
def test_create_gives_seeded_unit_rows_and_reopens_equal(tmp_path: Path, kind: str,
                                                         dtype: str) -> None:
    path = tmp_path / f"bank.{kind}"
    with create_store(path, 100, 8, dtype=dtype, chunk_rows=32, seed=3) as s:
        assert (s.n_rows, s.dim, s.chunk_rows, s.n_chunks, s.kind) == (100, 8, 32, 4, kind)
        assert s.dtype == np.dtype(dtype) and s.chunk_range(3) == (96, 100)
        rows = s.read_rows(0, 100)
        chunk = s.read_chunk(3)
    assert rows.dtype == np.float32 and chunk.shape == (4, 8)
    want = expected_init(100, 8, 32, seed=3).astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(rows, want)
    tol = 1e-6 if dtype == "float32" else 2.0**-11
    assert np.abs(np.linalg.norm(rows.astype(np.float64), axis=1) - 1).max() <= tol
    with open_store(path, read_only=True) as s:
        np.testing.assert_array_equal(s.read_rows(0, 100), rows)
        assert s.meta.committed_step == -1 and s.meta.init == "unit-gaussian"
    assert verify_store(path).ok


@pytest.mark.parametrize("kind", KINDS)
def test_meta_round_trip_and_sidecar_format(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"bank.{kind}"
    with create_store(path, 10, 4, chunk_rows=3, manifest_id="m1", momentum=0.5, seed=7) as s:
        s._set_meta(manifest_id="m2", momentum=0.25, committed_step=12)
    sidecar = path / "oocid.json" if kind == "zarr" else Path(f"{path}.meta.json")
    meta = json.loads(sidecar.read_text())
    bank_id = meta.pop("bank_id")
    assert meta == {
        "format": "oocid-bank", "version": 3, "n_rows": 10, "dim": 4, "dtype": "float32",
        "chunk_rows": 3, "manifest_id": "m2", "momentum": 0.25, "committed_step": 12,
        "previous_step": None, "init": "unit-gaussian", "seed": 7}
    assert isinstance(bank_id, str) and len(bank_id) == 16  # random, made with the bank
    info = store_info(path)
    assert (info["kind"], info["n_chunks"], info["committed_step"]) == (kind, 4, 12)
    assert info["nbytes_on_disk"] >= 10 * 4 * 4
    assert abs(info["norm_min"] - 1) < 1e-6 and abs(info["norm_max"] - 1) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_read_index_unsorted_repeated_and_empty(tmp_path: Path, kind: str) -> None:
    with create_store(tmp_path / f"b.{kind}", 50, 3, chunk_rows=7) as s:
        full = s.read_rows(0, 50)
        idx = np.array([49, 0, 7, 7, 6, 49, 13, 0, 8])
        np.testing.assert_array_equal(s.read_index(idx), full[idx])
        assert s.read_index(np.array([], dtype=np.int64)).shape == (0, 3)
        with pytest.raises(IndexError):
            s.read_index(np.array([50]))


@pytest.mark.parametrize("kind", KINDS)
def test_read_only_and_non_finite_writes_are_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"b.{kind}"
    create_store(path, 8, 2, chunk_rows=4).close()
    with open_store(path, read_only=True) as s, pytest.raises(InputError, match="read-only"):
        s.write_chunks({0: np.ones((4, 2))})
    with open_store(path) as s:
        before = s.read_rows(0, 8)
        with pytest.raises(DataError, match="non-finite"):
            s.write_chunks({0: np.full((4, 2), np.nan)})
        with pytest.raises(DataError, match="non-finite"):
            write_rows(s, 1, np.array([[np.inf, 0.0]]))
        with pytest.raises(ValueError):
            s.write_chunks({1: np.ones((3, 2))})
        np.testing.assert_array_equal(s.read_rows(0, 8), before)


# ---- read-back property ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_reads_match_in_memory_model(no_fsync: None, kind: str, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 50), "n_rows")
    cr = data.draw(st.integers(1, 16), "chunk_rows")
    d = data.draw(st.integers(1, 8), "dim")
    dtype = data.draw(st.sampled_from(["float32", "float16"]), "dtype")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
    ops = st.sampled_from(["rows", "chunks", "index", "reopen", "meta"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"b.{kind}"
        s = create_store(path, n, d, dtype=dtype, chunk_rows=cr)
        s.check_rows = False  # rows of any norm: this is storage; damage is test_damage.py's
        model = expected_init(n, d, cr, seed=0).astype(dtype).astype(np.float32)
        step = -1
        for op in data.draw(st.lists(ops, max_size=10), "ops"):
            if op == "rows":
                start = data.draw(st.integers(0, n - 1))
                m = data.draw(st.integers(0, n - start))
                vals = rng.standard_normal((m, d)) * 3
                step = step + 1 if data.draw(st.booleans()) else step
                write_rows(s, start, vals, step=step)
                model[start:start + m] = vals.astype(dtype)
            elif op == "chunks":
                ids = data.draw(st.lists(st.integers(0, s.n_chunks - 1), max_size=4))
                new = {c: unit(rng, s.chunk_range(c)[1] - s.chunk_range(c)[0], d) for c in ids}
                s.write_chunks(new)
                for c, v in new.items():
                    model[slice(*s.chunk_range(c))] = v.astype(dtype)
            elif op == "index":
                idx = np.array(data.draw(st.lists(st.integers(0, n - 1), max_size=20)), int)
                np.testing.assert_array_equal(s.read_index(idx), model[idx])
            elif op == "meta":
                step += 1
                s._set_meta(committed_step=step)
            else:
                s.close()
                s = open_store(path, read_only=data.draw(st.booleans()))
                if s.read_only:
                    s.close()
                    s = open_store(path)
                s.check_rows = False
            assert s.meta.committed_step == step
            c = data.draw(st.integers(0, s.n_chunks - 1))
            np.testing.assert_array_equal(s.read_chunk(c), model[slice(*s.chunk_range(c))])
        s.close()
        with open_store(path, read_only=True) as s:
            np.testing.assert_array_equal(s.read_rows(0, n), model)
            assert not any(p.exists() for p in journal_paths(s))


@pytest.mark.parametrize("kind", KINDS)
def test_reads_of_other_chunks_while_writing(tmp_path: Path, kind: str, no_fsync: None) -> None:
    with create_store(tmp_path / f"b.{kind}", 64, 4, chunk_rows=4) as s:
        even = {c: s.read_chunk(c) for c in range(0, 16, 2)}
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                for _ in range(20):
                    for c, want in even.items():
                        np.testing.assert_array_equal(s.read_chunk(c), want)
            except BaseException as e:  # surfaced below
                errors.append(e)

        t = threading.Thread(target=reader)
        t.start()
        rng = np.random.default_rng(0)
        for _ in range(20):
            s.write_chunks({c: unit(rng, 4, 4) for c in range(1, 16, 2)})
        t.join()
        assert not errors


# ---- crash recovery --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_committed_journal_is_replayed(tmp_path: Path, kind: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / f"b.{kind}"
    new = {0: np.tile(np.array([0.6, 0.8], np.float32), (4, 1)),
           2: np.tile(np.array([0.8, 0.6], np.float32), (2, 1))}
    with create_store(path, 10, 2, chunk_rows=4) as s:
        old = s.read_rows(0, 10)
        with monkeypatch.context() as m:  # "killed" right after the commit rename
            m.setattr(BankStore, "_apply", lambda self, journal: None)
            s.write_chunks(new, step=5)
        assert s._journal.exists()
        s._rows.write(0, np.full((4, 2), np.nan, np.float32))  # and chunk 0 half-applied: torn
    with open_store(path, read_only=True) as s:  # read-only: served from the journal
        np.testing.assert_array_equal(s.read_chunk(0), new[0])
        assert s.pending_journal
    rep = verify_store(path)  # the torn NaN chunk is covered by the journal: checked from there
    assert rep.ok and "journal" in rep.notes[0] and rep.n_bad == 0
    with open_store(path) as s:
        assert s.meta.committed_step == 5 and not s._journal.exists()
        want = old.copy()
        want[0:4], want[8:10] = new[0], new[2]
        np.testing.assert_array_equal(s.read_rows(0, 10), want)
    assert verify_store(path).ok


@pytest.mark.parametrize("kind", KINDS)
def test_uncommitted_journal_is_discarded(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"b.{kind}"
    with create_store(path, 10, 2, chunk_rows=4) as s:
        old = s.read_rows(0, 10)
        journal, tmp = journal_paths(s)
        write_journal(tmp, journal, [(1, np.ones((4, 2), np.float32))], "float32", 2, 9, path)
        journal.rename(tmp)  # as if killed before the commit rename
    with open_store(path) as s:
        assert not tmp.exists() and s.meta.committed_step == -1
        np.testing.assert_array_equal(s.read_rows(0, 10), old)


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_committed_journal_is_a_data_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"b.{kind}"
    with create_store(path, 10, 2, chunk_rows=4) as s:
        journal, tmp = journal_paths(s)
        write_journal(tmp, journal, [(1, np.ones((4, 2), np.float32))], "float32", 2, 9, path)
    raw = bytearray(journal.read_bytes())
    raw[-20] ^= 0xFF
    journal.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="journal is corrupt"):
        open_store(path)


@pytest.mark.parametrize("kind", KINDS)
def test_failed_apply_keeps_new_content_visible_and_replays(
        tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / f"b.{kind}"
    new = np.full((4, 2), np.sqrt(0.5), np.float32)  # unit rows, as a trainer writes
    with create_store(path, 8, 2, chunk_rows=4) as s:
        with monkeypatch.context() as m:
            def broken_sync(chunk_ids: list[int]) -> None:
                raise OSError(errno.EIO, "Input/output error")
            m.setattr(s._rows, "sync", broken_sync)
            with pytest.raises(WriteError, match="replayed"):
                s.write_chunks({1: new}, step=3)
        np.testing.assert_array_equal(s.read_chunk(1), new)
        s.write_chunks({0: new})  # replays the pending journal first
        assert s.meta.committed_step == 3 and not s.pending_journal
    with open_store(path) as s:
        np.testing.assert_array_equal(s.read_rows(0, 8), np.concatenate([new, new]))


CHILD = """
import sys, numpy as np
from oocid.bank.store import open_store

def plan(k, n_chunks):
    return np.random.default_rng([k]).choice(n_chunks, min(3, n_chunks), replace=False)

def content(k, c, n, d):
    v = np.random.default_rng([k, int(c), 7]).standard_normal(d).astype(np.float32)
    return np.tile(v / np.linalg.norm(v), (n, 1))

if __name__ == "__main__":
    s = open_store(sys.argv[1])
    k = s.meta.committed_step + 1
    print("ready", flush=True)
    while True:
        new = {}
        for c in plan(k, s.n_chunks):
            lo, hi = s.chunk_range(int(c))
            new[int(c)] = content(k, c, hi - lo, s.dim)
        s.write_chunks(new, step=k)
        k += 1
"""


@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_leaves_every_chunk_old_or_new(tmp_path: Path, kind: str) -> None:
    helpers: dict = {}
    exec(CHILD.split("if __name__")[0], helpers)
    path = tmp_path / f"b.{kind}"
    n, d, cr = 600, 16, 32
    create_store(path, n, d, chunk_rows=cr).close()
    initial = expected_init(n, d, cr, seed=0)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rnd = random.Random(kind)
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], env=env,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(rnd.uniform(0.1, 0.5))
        child.send_signal(signal.SIGKILL)
        child.wait()
        with open_store(path) as s:
            last = s.meta.committed_step
            rows = s.read_rows(0, n)
            want = initial.copy()
            for k in range(last + 1):  # the writes up to the committed step, all of them
                for c in helpers["plan"](k, s.n_chunks):
                    lo, hi = s.chunk_range(int(c))
                    want[lo:hi] = helpers["content"](k, c, hi - lo, d)
        np.testing.assert_array_equal(rows, want)
        assert verify_store(path).ok
    assert last >= 1  # the child did get writes done


# ---- disk full -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_disk_full_during_journal_is_a_write_error(tmp_path: Path, kind: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / f"b.{kind}"
    with create_store(path, 8, 2, chunk_rows=4) as s:
        old = s.read_rows(0, 8)

        def full(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with monkeypatch.context() as m:
            m.setattr(os, "fsync", full)
            with pytest.raises(WriteError) as e:
                s.write_chunks({0: np.ones((4, 2), np.float32)}, step=1)
        assert str(e.value) == f"{path}: could not write bank journal: disk full (No space left on device)"
        assert not any(p.exists() for p in journal_paths(s))
        np.testing.assert_array_equal(s.read_rows(0, 8), old)
    with open_store(path) as s:
        np.testing.assert_array_equal(s.read_rows(0, 8), old)
        assert s.meta.committed_step == -1


@pytest.mark.parametrize("kind", KINDS)
def test_file_size_limit_in_subprocess(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"b.{kind}"
    create_store(path, 64, 8, chunk_rows=16).close()
    with open_store(path, read_only=True) as s:
        old = s.read_rows(0, 64)
    code = textwrap.dedent("""
        import resource, signal, sys, numpy as np
        from oocid.errors import WriteError
        from oocid.bank.store import open_store
        s = open_store(sys.argv[1])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (700, 700))
        try:
            s.write_chunks({0: np.ones((16, 8)), 1: np.ones((16, 8))}, step=1)
        except WriteError as e:
            print(e)
    """)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == f"{path}: could not write bank journal: disk full (File too large)", out
    with open_store(path) as s:
        np.testing.assert_array_equal(s.read_rows(0, 64), old)
        assert not any(p.exists() for p in journal_paths(s))


# ---- errors ----------------------------------------------------------------------------------


def test_path_errors(tmp_path: Path) -> None:
    for bad in ("bank.h5", "bank"):
        with pytest.raises(InputError, match=bad):
            create_store(tmp_path / bad, 4, 2)
        with pytest.raises(InputError, match=bad):
            open_store(tmp_path / bad)
    with pytest.raises(InputError, match="no bank here"):
        open_store(tmp_path / "missing.zarr")
    with pytest.raises(InputError, match="no such directory"):
        create_store(tmp_path / "nodir" / "b.npy", 4, 2)
    (tmp_path / "plain.zarr").mkdir()
    with pytest.raises(DataError, match=r"plain\.zarr: not an oocid bank"):
        open_store(tmp_path / "plain.zarr")


@pytest.mark.parametrize("kwargs", [{"n_rows": 0}, {"dim": 0}, {"chunk_rows": 0},
                                    {"dtype": "float64"}, {"n_rows": 2.5}])
def test_bad_create_arguments(tmp_path: Path, kwargs: dict) -> None:
    args = {"n_rows": 4, "dim": 2, **kwargs}
    with pytest.raises(InputError, match=r"b\.npy"):
        create_store(tmp_path / "b.npy", args.pop("n_rows"), args.pop("dim"), **args)


@pytest.mark.parametrize("kind", KINDS)
def test_create_over_existing_and_mismatched_metadata(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"b.{kind}"
    create_store(path, 8, 2, chunk_rows=4).close()
    with pytest.raises(InputError, match="already exists"):
        create_store(path, 8, 2)
    sidecar = path / "oocid.json" if kind == "zarr" else Path(f"{path}.meta.json")
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "n_rows": 9}))
    with pytest.raises(DataError, match=f"{path}: rows"):
        open_store(path)
    rep = verify_store(path)
    assert not rep.ok and "disagree" in rep.problems[0]
    sidecar.write_text("{not json")
    with pytest.raises(DataError, match="unreadable bank metadata"):
        open_store(path)
    sidecar.write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(DataError, match="not an oocid bank"):
        open_store(path)


def test_check_matches(tmp_path: Path) -> None:
    with create_store(tmp_path / "bank.zarr", 1000, 4, manifest_id="abc") as s:
        check_matches(s, 1000, 4, "abc")
        check_matches(s, 1000, 4, None)
        with pytest.raises(DataError, match=rf"^{tmp_path}/bank\.zarr has 1000 rows but the shards "
                                            r"\(manifest\.json\) have 1200 samples; give a new "
                                            r"--bank path to start a bank for them$"):
            check_matches(s, 1200, 4, "abc", source="the shards (manifest.json)")
        with pytest.raises(DataError, match=r"bank\.zarr has rows of dimension 4"):
            check_matches(s, 1000, 128, "abc")
        with pytest.raises(DataError, match=r"bank\.zarr belongs to manifest abc"):
            check_matches(s, 1000, 4, "xyz")


# ---- verify ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_verify_finds_corrupted_rows(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"b.{kind}"
    create_store(path, 50, 4, chunk_rows=8).close()
    if kind == "npy":
        raw = np.load(path, mmap_mode="r+")
    else:
        import zarr

        raw = zarr.open_array(path, mode="r+")
    raw[17] = np.nan
    raw[40] = raw[40] * 1.01
    if kind == "npy":
        raw.flush()
    rep = verify_store(path)
    assert not rep.ok and rep.n_bad == 2 and rep.bad_rows == [17, 40]
    assert abs(rep.max_norm_error) < 1e-6
    assert verify_store(path, tol=0.02).bad_rows == [17]
