"""oocid.atomic: a file appears whole or not at all, and a failed write is one WriteError."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from oocid.atomic import atomic_open, atomic_write, write_error
from oocid.errors import WriteError


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    p = tmp_path / "r.json"
    atomic_write(p, "old", "results")
    atomic_write(p, "new", "results")
    assert p.read_text() == "new" and [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_unwritable_place_is_one_write_error_and_no_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")  # a file where a folder should be: ENOTDIR, even as root
    with pytest.raises(WriteError, match=r"file/r\.json: could not write results: "):
        atomic_write(tmp_path / "file" / "r.json", "{}", "results")


def test_an_error_inside_the_block_keeps_the_old_file(tmp_path: Path) -> None:
    p = tmp_path / "r.json"
    atomic_write(p, "old", "results")
    with pytest.raises(WriteError, match="disk full"), atomic_open(p, "results") as f:
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["r.json"]
    with pytest.raises(KeyError), atomic_open(p, "results") as f:  # not an OSError: re-raised
        raise KeyError("x")
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_message_names_the_path_and_says_disk_full() -> None:
    e = write_error(Path("/x/y"), "bank journal", OSError(errno.EFBIG, "File too large"))
    assert str(e) == "/x/y: could not write bank journal: disk full (File too large)"


def test_a_folder_where_a_file_goes_is_refused_before_any_work(tmp_path: Path) -> None:
    """`knn --out DIR` used to search first and then fail to write (exit 4); a Zarr bank is a
    folder and passes."""
    from oocid.atomic import check_writable
    from oocid.errors import InputError

    (tmp_path / "results").mkdir()
    with pytest.raises(InputError, match=r"results: is a folder; give a file name for the results"):
        check_writable(tmp_path / "results", "results")
    (tmp_path / "b.zarr").mkdir()
    check_writable(tmp_path / "b.zarr", "bank", bank=True)
