"""`oocid bank verify` of several banks (a shell's `*.zarr`: each whole bank on its own, the
parts of a node-local bank together) and `oocid bank info` of a bank with a damaged chunk file
(the metadata shown, the norms named as not computed). Run in this process through `main`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import in_process

from oocid.bank.create import create_store
from oocid.bank.parts import write_part_info

N, D, R = 40, 8, 16  # chunks of 16, 16 and 8 rows


oocid = in_process


def bank(path: Path, bank_id: str | None = None) -> Path:
    create_store(path, N, D, chunk_rows=R, bank_id=bank_id).close()
    return path


def parts(tmp_path: Path, chunks: list[list[int]]) -> list[Path]:
    """Node-local parts of one bank, part i training chunks[i]."""
    out = []
    for i, own in enumerate(chunks):
        p = bank(tmp_path / f"part{i}.zarr", bank_id="0123456789abcdef")
        write_part_info(p, own, len(chunks), i, None)
        out.append(p)
    return out


def ok_line(path: Path) -> str:
    return f"{path}: ok ({N} rows x {D}, float32, max | |v|-1 | = "


def test_several_whole_banks_are_each_verified_on_their_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = bank(tmp_path / "a.zarr"), bank(tmp_path / "b.npy")
    r = oocid(monkeypatch, capsys, "bank", "verify", a, b)
    assert (r.rc, r.err) == (0, ""), r  # was exit 2: "a whole bank ... cannot be combined"
    lines = r.out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(ok_line(a)) and lines[1].startswith(ok_line(b))


def test_a_failing_bank_among_several_is_named_and_the_others_still_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    a, bad, c = bank(tmp_path / "a.npy"), bank(tmp_path / "bad.npy"), bank(tmp_path / "c.npy")
    rows = np.load(bad, mmap_mode="r+")
    rows[20] *= 3
    rows.flush()
    del rows
    r = oocid(monkeypatch, capsys, "bank", "verify", a, bad, c)
    assert r.rc == 1, r
    assert [x.split(": ok")[0] for x in r.out.splitlines()] == [str(a), str(c)]
    err = r.err.splitlines()
    assert len(err) == 2 and err[0].startswith(f"oocid: error: {bad}: 1 bad rows (first: 20)")
    assert err[1] == "oocid: error: 1 of the checks of 3 banks failed (each named above)"
    one = oocid(monkeypatch, capsys, "bank", "verify", bad)  # one bank: its line only, as before
    assert one.rc == 1 and one.err.splitlines() == err[:1], one


def test_a_path_that_is_no_bank_among_several_fails_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A shell's `runs/*/bank*` also matches `bank.npy.meta.json`: that path, and a missing
    one, fail on their own lines (exit 1) and the banks after them are still checked."""
    a, c = bank(tmp_path / "a.npy"), bank(tmp_path / "c.zarr")
    meta, gone = tmp_path / "a.npy.meta.json", tmp_path / "gone.zarr"
    r = oocid(monkeypatch, capsys, "bank", "verify", a, meta, gone, c)
    assert r.rc == 1, r
    assert [x.split(": ok")[0] for x in r.out.splitlines()] == [str(a), str(c)]
    err = r.err.splitlines()
    assert len(err) == 3 and err[0].startswith(f"oocid: error: {meta}: ")
    assert err[1].startswith(f"oocid: error: {gone}: ")
    assert err[2] == "oocid: error: 2 of the checks of 4 banks failed (each named above)"
    assert oocid(monkeypatch, capsys, "bank", "verify", gone).rc == 2  # one path: as before


def test_whole_banks_alone_and_the_parts_together(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = bank(tmp_path / "whole.zarr")
    p0, p1 = parts(tmp_path, [[0, 2], [1]])
    r = oocid(monkeypatch, capsys, "bank", "verify", p0, whole, p1)
    assert (r.rc, r.err) == (0, ""), r
    assert r.out.splitlines()[-1] == "2 parts: every chunk once, same shards, same committed step"
    assert sum(": ok (" in x for x in r.out.splitlines()) == 3
    r = oocid(monkeypatch, capsys, "bank", "verify", whole, p0)
    assert r.rc == 0 and r.out.splitlines()[-1].startswith(f"note: {p0} is one part of a "
                                                             "node-local bank (2 chunks)"), r


def test_parts_that_lack_a_chunk_fail_verification(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    p0, p1 = parts(tmp_path, [[0], [1]])
    whole = bank(tmp_path / "whole.zarr")
    r = oocid(monkeypatch, capsys, "bank", "verify", whole, p0, p1)
    assert r.rc == 1, r
    err = r.err.splitlines()
    assert len(err) == 2 and "lack chunk(s) [2] (1 of 3)" in err[0], r


def test_info_of_a_bank_with_a_truncated_chunk_shows_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = bank(tmp_path / "b.zarr")
    chunk = path / "c.1.0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    r = oocid(monkeypatch, capsys, "bank", "info", path)
    assert r.rc == 3, r
    shown = dict(x.strip().split(": ", 1) for x in r.out.splitlines())
    assert (shown["n_rows"], shown["dim"], shown["n_chunks"]) == (str(N), str(D), "3"), r
    assert shown["norms"] == "not computed (a damaged chunk file, below)"
    assert "norm_mean" not in shown
    assert r.err == (f"oocid: error: {chunk}: the bank's chunk file is truncated or damaged (100 "
                     f"bytes, a chunk is {R * D * 4}); the norm statistics were not computed "
                     f"(`oocid bank verify {path}` names every damaged chunk file)\n"), r
