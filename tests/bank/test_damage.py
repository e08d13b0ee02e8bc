"""Damage is never read as data (oocid.bank.damage, oocid.bank.rows): a Zarr chunk file that is
missing (zarr would read its fill value, zeros), truncated or undecodable is a DataError naming
it; `verify_store` names each one; a read that checks its rows stops at the first one that is
not finite or not unit-norm. And a bank's id: made with it, kept, taken from rank 0 by a
node-local part."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from oocid.bank.create import create_store, write_rows
from oocid.bank.damage import check_unit_rows
from oocid.bank.meta import BANK_VERSION
from oocid.bank.parts import assemble, chunks_of, write_part_info
from oocid.bank.store import BankStore, open_store
from oocid.bank.verify import store_info, verify_store
from oocid.errors import DataError

N, D, R = 40, 8, 16  # chunks of 16, 16 and 8 rows


def zarr_bank(tmp_path: Path, name: str = "b.zarr", dtype: str = "float32") -> Path:
    path = tmp_path / name
    create_store(path, N, D, chunk_rows=R, dtype=dtype).close()
    return path


def poke(path: Path, row: int, value: float) -> None:
    """Set one element of a row in the bank's files, bypassing the store."""
    if path.suffix == ".npy":
        mm = np.load(path, mmap_mode="r+")
        mm[row, 0] = value
        mm.flush()
        del mm
    else:
        import zarr

        zarr.open_array(path, mode="r+")[row, 0] = value


def test_a_missing_chunk_file_is_named_not_read_as_zeros(tmp_path: Path) -> None:
    path = zarr_bank(tmp_path)
    (path / "c.1.0").unlink()
    with open_store(path, read_only=True) as s:
        assert s.read_rows(0, 16).shape == (16, D)  # the other chunks read as before
        with pytest.raises(DataError, match=re.escape(f"{path / 'c.1.0'}: the bank's chunk "
                                                      "file is missing (rows 16-31)")):
            s.read_rows(10, 20)
        with pytest.raises(DataError, match="c.1.0"):
            s.read_index(np.array([3, 17]))
    rep = verify_store(path)
    assert not rep.ok and rep.n_bad == 0
    assert any(str(path / "c.1.0") in p and "missing" in p for p in rep.problems), rep.problems


@pytest.mark.parametrize("size", [1000, 0, 3 * R * D * 4])
def test_a_chunk_file_of_the_wrong_size_is_named(tmp_path: Path, size: int) -> None:
    path = zarr_bank(tmp_path)
    chunk = path / "c.2.0"
    data = chunk.read_bytes()
    chunk.write_bytes((data * 3)[:size])
    with open_store(path, read_only=True) as s, \
            pytest.raises(DataError, match=re.escape(f"{chunk}: the bank's chunk file is "
                                                     f"truncated or damaged ({size} bytes")):
        s.read_chunk(2)
    info = store_info(path)  # was an internal ValueError (cannot reshape), then a DataError
    assert info["damaged"].startswith(f"{chunk}: the bank's chunk file is truncated or damaged")
    assert info["n_rows"] == N and "norm_mean" not in info
    rep = verify_store(path)
    assert not rep.ok and any(str(chunk) in p for p in rep.problems), rep.problems


def test_a_chunk_that_does_not_decode_is_named(tmp_path: Path) -> None:
    path = zarr_bank(tmp_path)
    with open_store(path, read_only=True) as s:
        rows = s._rows
        assert rows.chunk_bytes == R * D * 4
        rows.chunk_bytes = None  # as for a codec whose sizes vary: the decode itself fails
        (path / "c.0.0").write_bytes(b"\0" * 1000)
        with pytest.raises(DataError, match=re.escape(f"{path / 'c.0.0'}: the bank's chunk "
                                                      "does not decode")):
            s.read_chunk(0)


def test_verify_names_every_unreadable_chunk_and_checks_the_rest(tmp_path: Path) -> None:
    path = zarr_bank(tmp_path)
    (path / "c.0.0").unlink()
    (path / "c.2.0").write_bytes(b"x")
    with open_store(path) as s:
        pass  # a writable open (recover, upgrade) reads no rows
    with open_store(path, read_only=True) as s:
        s._rows.read(16, 32)  # the sound chunk
    with create_store(tmp_path / "scaled.zarr", N, D, chunk_rows=R) as s:
        write_rows(s, 20, s.read_rows(20, 21) * 2)
    rep = verify_store(path)
    assert [p.split(":")[0] for p in rep.problems] == [str(path / "c.0.0"), str(path / "c.2.0")]
    rep = verify_store(tmp_path / "scaled.zarr")
    assert rep.bad_rows == [20] and len(rep.problems) == 1


@pytest.mark.parametrize("kind", ["zarr", "npy"])
def test_checked_reads_stop_at_the_first_damaged_row(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"b.{kind}"
    with create_store(path, N, D, chunk_rows=R) as s:
        rows = s.read_rows(0, N)
        write_rows(s, 21, rows[21:22] * 1.01)  # 1% off
        s.check_rows = True
        s.read_chunk(0)
        with pytest.raises(DataError, match=re.escape(f"{path}: row 21 has norm 1.01, not 1: "
                                                      "the bank is damaged") + ".*" +
                           re.escape(f"`oocid bank verify {path}`")):
            s.read_chunk(1)
        s.check_rows = False
        write_rows(s, 21, rows[21:22])  # repaired
        s.check_rows = True
        s.read_chunk(1)
        poke(path, 23, np.nan)  # a store refuses to write it: damage from outside
        with pytest.raises(DataError, match="row 23 is not finite"):
            s.read_chunk(1)
        s.check_rows = False
        assert np.isnan(s.read_chunk(1)[23 - R, 0])  # verify and info read as it is


def test_verify_and_checked_reads_draw_one_line(tmp_path: Path) -> None:
    """Rows just inside and just outside the float32 tolerance: `bank verify` lists exactly
    the rows a checked read stops at (it tells the user to run verify)."""
    path = tmp_path / "b.npy"
    with create_store(path, N, D, chunk_rows=R) as s:
        rows = s.read_rows(0, N)
        for i, f in enumerate([1 + 0.9e-4, 1 + 1.1e-4, 1 - 0.9e-4, 1 - 1.1e-4, 1 + 0.99995e-4]):
            write_rows(s, 2 * i, rows[2 * i:2 * i + 1] * f)
        refused = []
        s.check_rows = True
        for i in range(0, 10, 2):
            try:
                check_unit_rows(s.read_rows(i, i + 1), i, path, "float32")
            except DataError:
                refused.append(i)
    assert refused[:2] == [2, 6] and not {0, 4} & set(refused)  # row 8: either, but the same
    assert verify_store(path).bad_rows == refused


def test_a_read_only_npy_rereads_a_row_a_trainer_is_writing(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A .npy bank is written in place: a knn that opened it before a trainer started may read
    a row half old, half new. That is not damage: it reads again until two reads agree."""
    path = tmp_path / "b.npy"
    create_store(path, N, D, chunk_rows=R).close()
    with open_store(path, read_only=True) as s:
        s.check_rows = True
        assert not s._rows.stable  # no trainer held the lock when it was opened
        real = type(s._rows)._read
        torn = [True]

        def read(self: object, start: int, stop: int) -> np.ndarray:
            out = real(self, start, stop)  # type: ignore[arg-type]
            if torn[0]:
                torn[0] = False
                out[3, : D // 2] *= 1.5  # half the row rewritten
            return out

        monkeypatch.setattr(type(s._rows), "_read", read)
        assert np.allclose(np.linalg.norm(s.read_chunk(0), axis=1), 1, atol=1e-5)
        assert s._rows.stable  # and from now on every read is read twice


def test_a_float16_banks_rounding_is_not_damage(tmp_path: Path) -> None:
    path = zarr_bank(tmp_path, dtype="float16")
    rng = np.random.default_rng(1)
    with open_store(path) as s:
        x = rng.standard_normal((N, D)).astype(np.float32)
        write_rows(s, 0, x / np.linalg.norm(x, axis=1, keepdims=True))
        s.check_rows = True
        for c in range(s.n_chunks):
            s.read_chunk(c)
        write_rows(s, 5, s.read_rows(5, 6) * 1.002)
        with pytest.raises(DataError, match="row 5 has norm 1.00"):
            s.read_chunk(0)


def test_each_bank_has_an_id_of_its_own_kept_by_reopens(tmp_path: Path) -> None:
    a, b = zarr_bank(tmp_path, "a.zarr"), zarr_bank(tmp_path, "b.zarr")
    with open_store(a) as sa, open_store(b, read_only=True) as sb:
        ida = sa.meta.bank_id
        assert ida is not None and sb.meta.bank_id is not None and ida != sb.meta.bank_id
        sa.write_chunks({}, step=4)
    with open_store(a, read_only=True) as sa:
        assert sa.meta.bank_id == ida


@pytest.mark.parametrize("version", [2, 3])
def test_a_bank_without_an_id_gets_one_when_opened_for_writing(tmp_path: Path, version: int
                                                               ) -> None:
    path = zarr_bank(tmp_path)
    meta = json.loads((path / "oocid.json").read_text())
    del meta["bank_id"]
    meta["version"] = version
    if version < 3:
        del meta["previous_step"]
    (path / "oocid.json").write_text(json.dumps(meta))
    with open_store(path, read_only=True) as s:
        assert s.meta.bank_id is None  # a read-only open changes nothing
    with open_store(path) as s:
        new = s.meta.bank_id
    meta = json.loads((path / "oocid.json").read_text())
    assert isinstance(new, str) and meta["bank_id"] == new and meta["version"] == BANK_VERSION


def test_a_node_local_part_takes_rank_0s_id(tmp_path: Path) -> None:
    """Fresh (or without an id): it adopts the id rank 0's bank broadcasts; trained with
    another id: another run's part, refused."""
    rank0, other = zarr_bank(tmp_path, "a.zarr"), zarr_bank(tmp_path, "b.zarr")
    with open_store(rank0, read_only=True) as s:
        run_id = s.meta.bank_id
    assert run_id is not None
    with open_store(other, recover=False) as s:
        s.settle(-1, None, run_id)
        assert s.meta.bank_id == run_id
    with open_store(other, recover=False) as s:
        s.write_chunks({}, step=6)
        meta_file = s._meta_path
        before = meta_file.stat().st_mtime_ns, meta_file.read_bytes()
        s.settle(6, 2, run_id)  # at the run's step, its id: nothing to do
        assert (s.meta.committed_step, s.meta.bank_id) == (6, run_id)
        assert (meta_file.stat().st_mtime_ns, meta_file.read_bytes()) == before  # not rewritten
    third = zarr_bank(tmp_path, "c.zarr")
    with open_store(third) as s:
        s.write_chunks({}, step=6)
    with open_store(third, recover=False) as s, \
            pytest.raises(DataError, match=f"c.zarr: is bank {s.meta.bank_id}, but the run's "
                                           f"\\(rank 0's\\) is bank {run_id}: another run's"):
        s.settle(6, 2, run_id)


def test_an_older_node_local_bank_takes_rank_0s_id_in_one_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trained version-2 part settling: the upgrade and rank 0's id are one metadata write,
    so a kill cannot leave it trained under an id of its own (refused on the next launch)."""
    bank = zarr_bank(tmp_path)
    with open_store(bank) as s:
        s.write_chunks({}, step=6)
    meta = json.loads((bank / "oocid.json").read_text())
    meta["version"] = 2
    del meta["bank_id"], meta["previous_step"]
    (bank / "oocid.json").write_text(json.dumps(meta))
    ids: list[str] = []
    set_meta = BankStore._set_meta

    def spy(self: BankStore, **updates: object) -> None:
        if "bank_id" in updates:
            ids.append(str(updates["bank_id"]))
        set_meta(self, **updates)

    monkeypatch.setattr(BankStore, "_set_meta", spy)
    with open_store(bank, recover=False) as s:
        s.settle(6, 2, "rank0id")
        assert (s.meta.bank_id, s.meta.version) == ("rank0id", BANK_VERSION)
    assert ids == ["rank0id"]


def test_parts_of_different_banks_are_not_one_bank_and_assemble_keeps_the_id(tmp_path: Path
                                                                              ) -> None:
    a, b = zarr_bank(tmp_path, "a.zarr"), zarr_bank(tmp_path, "b.zarr")
    write_part_info(a, [0, 2], 2, 0, None)
    write_part_info(b, [1], 2, 1, None)
    with pytest.raises(DataError, match="bank id"):
        chunks_of([a, b])
    with open_store(a, read_only=True) as s:
        run_id = s.meta.bank_id
    with open_store(b, recover=False) as s:
        s.settle(-1, None, run_id)
    assert len(chunks_of([a, b])) == 2
    assemble([a, b], tmp_path / "whole.npy")
    with open_store(tmp_path / "whole.npy", read_only=True) as s:
        assert s.meta.bank_id == run_id


def two_parts(tmp_path: Path) -> tuple[Path, Path, str]:
    """The two parts of one node-local bank (chunks 0 and 2, chunk 1), and the run's id."""
    a, b = zarr_bank(tmp_path, "a.zarr"), zarr_bank(tmp_path, "b.zarr")
    write_part_info(a, [0, 2], 2, 0, None)
    write_part_info(b, [1], 2, 1, None)
    with open_store(a, read_only=True) as s:
        run_id = s.meta.bank_id
    with open_store(b, recover=False) as s:
        s.settle(-1, None, run_id)
    return a, b, run_id


def test_assembling_parts_stops_at_a_damaged_row_and_writes_no_bank(tmp_path: Path) -> None:
    """A damaged row in one part is not copied into the assembled bank: DataError naming the
    part and the row, and no bank at the output path."""
    a, b, _ = two_parts(tmp_path)
    poke(b, R + 3, 7.0)  # row 19, in chunk 1: part b's
    with pytest.raises(DataError, match=r"b\.zarr.*row 19"):
        assemble([a, b], tmp_path / "whole.zarr")
    assert not (tmp_path / "whole.zarr").exists()


KILLED_ASSEMBLE = """
import os, sys
from pathlib import Path
from oocid.bank.store import BankStore
from oocid.bank.parts import assemble
commit = BankStore.write_chunks
def commit_then_die(self, *a, **kw):
    commit(self, *a, **kw)
    os._exit(9)  # SIGKILL's effect: no clean-up runs
BankStore.write_chunks = commit_then_die
assemble([Path(p) for p in sys.argv[2:]], Path(sys.argv[1]))
"""


def test_a_bank_assemble_killed_before_its_end_is_not_the_runs(tmp_path: Path) -> None:
    """Killed after the commit of every row but before the bank takes the parts' id: what is
    left has an id of its own, so it is never taken for the run's bank."""
    import subprocess
    import sys

    a, b, run_id = two_parts(tmp_path)
    out = tmp_path / "whole.zarr"
    p = subprocess.run([sys.executable, "-c", KILLED_ASSEMBLE, str(out), str(a), str(b)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 9, p.stderr
    with open_store(out, read_only=True) as s:
        assert s.meta.bank_id != run_id
    out.rename(tmp_path / "left.zarr")
    assemble([a, b], out)
    with open_store(out, read_only=True) as s:
        assert s.meta.bank_id == run_id
