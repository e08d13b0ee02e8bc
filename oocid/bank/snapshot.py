"""What a read-only open of a bank sees while a trainer writes it (docs/design.md, "Readers").

A trainer commits a step by renaming a record into place, then applies the record and its parts
to the rows and deletes them; the next commit may reuse the same file names. A reader that opens
the bank in between must not read those files later by path. So a read-only open copies a
committed record's (and its parts') rows into memory, holding the record open while it reads the
parts: if the record's name no longer points at that file afterwards (or a part vanished because
the trainer just applied it), the open starts again. A chunk written into the rows is replaced
whole (Zarr writes each chunk file under a temporary name and renames it), so every chunk a
reader gets is a committed one. A `.npy` bank is written in place: while its lock file says a
trainer may be writing, a reader reads each span twice and repeats until two reads agree.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import BinaryIO

from oocid.bank.journal import Journal, read_journal
from oocid.bank.meta import BankMeta
from oocid.errors import DataError

TRIES = 50


class _Moved(Exception):
    """The record was applied (and maybe replaced) by a trainer while it was read."""


def _same(path: Path, f: BinaryIO) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False


def _read_once(journal: Path, meta: BankMeta) -> list[Journal] | None:
    try:
        f = open(journal, "rb")
    except FileNotFoundError:
        return None
    with f:
        record = read_journal(journal, meta, keep=True, f=f)
        parts = []
        for name in record.parts:
            part = journal.with_name(name)
            try:
                parts.append(read_journal(part, meta, keep=True))
            except DataError as e:
                if not _same(journal, f):  # applied and deleted meanwhile
                    raise _Moved from e
                if not part.exists():
                    raise DataError(f"{part}: bank journal is corrupt (a committed part is "
                                    "missing)") from e
                raise
        if not _same(journal, f):  # a part may be a newer one of the same name
            raise _Moved
    return [*parts, record]


def committed_snapshot(journal: Path, meta: BankMeta) -> list[Journal] | None:
    """The committed record's parts and the record, rows in memory, in apply order (None: no
    record). Memory: at most one commit's rows, and only when a commit is being applied."""
    for attempt in range(TRIES):
        try:
            return _read_once(journal, meta)
        except _Moved:
            time.sleep(min(0.005 * (attempt + 1), 0.1))
    raise DataError(f"{journal}: the bank's commit record changed {TRIES} times while it was "
                    "read (a trainer committing very often?); try again")


def trainer_may_write(bank: Path) -> bool:
    """True when the bank's lock file holds a trainer's text (it is emptied on a clean exit)."""
    try:
        return os.stat(bank.with_name(bank.name + ".lock")).st_size > 0
    except OSError:
        return False


def file_size(p: Path) -> int:
    """p's size in bytes; 0 for a directory or a file gone meanwhile (a trainer deleted it)."""
    try:
        st = os.stat(p)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0
