"""All-or-nothing file writes, with one error policy.

Every file oocid replaces (checkpoints, the bank's metadata and journals, shard manifests and
shards, result files) is written to a temporary name beside it, flushed to disk, renamed over
the final name, and the folder is flushed so that the rename itself survives a power cut. A
reader sees the old file or the new one, never a part. Any `OSError` on the way removes the
temporary file, leaves the old file untouched, and becomes one `WriteError` that names the path
and says what could not be written ("disk full" for ENOSPC / EFBIG / EDQUOT).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from oocid.errors import InputError, WriteError

TMP_SUFFIX = ".tmp"
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def write_error(path: Path, what: str, e: OSError) -> WriteError:
    """The one message for a failed write: `PATH: could not write WHAT: REASON`."""
    reason = e.strerror or str(e)
    if e.errno in _FULL:
        reason = f"disk full ({reason})"
    return WriteError(f"{path}: could not write {what}: {reason}")


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk. Best effort: some file systems
    refuse to fsync a directory, and the data itself is already durable by then."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


class AtomicFile:
    """A file written under a temporary name and put in place by `commit()`; `abort()` (or an
    error in either) removes the temporary file. For writes that span many calls (a shard);
    `atomic_open` is the context-manager form."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what, self.tmp = path, what, tmp_path(path)
        try:
            self.file: BinaryIO = open(self.tmp, "wb")
        except OSError as e:
            raise write_error(path, what, e) from None

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise write_error(self.path, self.what, e) from None
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass


@contextmanager
def atomic_open(path: Path, what: str) -> Iterator[BinaryIO]:
    """`with atomic_open(path, "checkpoint") as f: f.write(...)`: the file appears at `path`
    complete when the block ends without an error, and not at all otherwise."""
    out = AtomicFile(path, what)
    try:
        yield out.file
    except OSError as e:
        out.abort()
        raise write_error(path, what, e) from None
    except BaseException:
        out.abort()
        raise
    out.commit()


def atomic_write(path: Path, data: bytes | str, what: str) -> None:
    """Write `data` (str as UTF-8) to `path` all or nothing."""
    with atomic_open(path, what) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def check_writable(path: Path, what: str, *, parents: bool = False, bank: bool = False) -> None:
    """Fail before any work when a file cannot be created at `path`: `write_error` (exit 4)
    when the folder it goes in (with `parents`, the nearest folder above it that exists: the
    rest would be created) is a file or refuses a new file (read-only, permissions); an
    InputError naming the folder when, without `parents`, that folder does not exist, and one
    when `path` itself is a folder (unless it is a `bank`: a Zarr bank is one). Probed by
    creating and removing a file of a name of its own there (which works as root too, where
    permission bits would not tell)."""
    if not bank and path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name for the {what}")
    folder = existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():  # a file where a folder must be (ENOTDIR, even for root)
        raise write_error(path, what, NotADirectoryError(errno.ENOTDIR,
                                                         f"{existing} is not a folder"))
    if existing != folder and not parents:
        raise InputError(f"{folder}: no such directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".oocid-probe-", dir=existing)
    except OSError as e:
        raise write_error(path, what, e) from None
    os.close(fd)
    os.unlink(probe)
