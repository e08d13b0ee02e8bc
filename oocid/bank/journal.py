"""The bank's redo journal: how a commit of any number of chunks applies all or none.

A commit is made of *parts* and one *record* (docs/design.md, "Journal and crash safety"). Each
part is a journal file of some chunks, written under a temporary name, fsynced and renamed to
`<journal>.part-<writer>-<seq>`: durable, but not yet committed. The record is a journal file at
`<journal>` itself that names the step, the parts (in apply order) and may carry chunks of its
own (applied last); its rename is the commit point. A record found on open is replayed with all
its parts; parts no record names are discarded. Several writers can each write parts of one step
(distinct `writer` names), then one record commits them all.

File format (parts and record): MAGIC | u64 header length | header json (dtype, dim, step,
chunks [[chunk, rows], ...], parts [names]) | payload (the chunks' rows, in header order, store
dtype, C order) | END | u32 crc32 of header + payload. A header without "parts" (bank version 1)
names none.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from oocid.atomic import fsync_dir, write_error
from oocid.bank.meta import DTYPES, BankMeta
from oocid.errors import DataError

_MAGIC, _END = b"OOCIDJ1\n", b"OOCIDEND"


@dataclass
class Journal:
    """A committed journal: chunk c's rows are `data[c]` in memory or at `offsets[c]` in `path`."""

    path: Path
    dtype: np.dtype
    dim: int
    step: int | None
    offsets: dict[int, tuple[int, int]]  # c -> (byte offset, rows)
    data: dict[int, np.ndarray] | None = None
    parts: tuple[str, ...] = ()  # a record's parts, by file name, in apply order

    @property
    def chunk_ids(self) -> list[int]:
        return list(self.offsets)

    def load(self, c: int) -> np.ndarray:
        """Chunk c's rows, (chunk_len, D) in the store dtype."""
        if self.data is not None:
            return self.data[c]
        off, n = self.offsets[c]
        x = np.fromfile(self.path, dtype=self.dtype, count=n * self.dim, offset=off)
        return x.reshape(n, self.dim)


def write_journal(tmp: Path, final: Path, items: list[tuple[int, np.ndarray]], dtype: str,
                  dim: int, step: int | None, where: Path, parts: tuple[str, ...] = ()) -> Journal:
    """Write chunks [(c, (chunk_len, D) C-order rows)] to `tmp`, fsync, rename to `final`.

    The rename is the commit point. On OSError nothing is committed and WriteError (naming the
    bank `where`, not the journal file) is raised. The rows are streamed into the file chunk by
    chunk with a running crc32, so no second copy of them is made in memory.
    """
    obj: dict[str, object] = {"dtype": dtype, "dim": dim, "step": step,
                              "chunks": [[c, len(a)] for c, a in items]}
    if parts:
        obj["parts"] = list(parts)
    head = json.dumps(obj).encode()
    pos, offsets = len(_MAGIC) + 8 + len(head), {}
    for c, a in items:
        offsets[c] = (pos, len(a))
        pos += a.nbytes
    try:
        with open(tmp, "wb") as f:
            f.write(_MAGIC + struct.pack("<Q", len(head)) + head)
            crc = zlib.crc32(head)
            for _, a in items:
                view = a.data.cast("B")
                f.write(view)
                crc = zlib.crc32(view, crc)
            f.write(_END + struct.pack("<I", crc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise write_error(where, "bank journal", e) from e
    fsync_dir(final.parent)
    return Journal(final, DTYPES[dtype], dim, step, offsets, dict(items), parts)


def read_journal(path: Path, meta: BankMeta, *, keep: bool = False,
                 f: BinaryIO | None = None) -> Journal:
    """Parse a committed journal and check its crc32; DataError if it is damaged.

    `keep`: hold its rows in memory (a reader's snapshot: the file may be deleted and its name
    reused once it is applied). `f`: the file, already open at its start."""
    kept: dict[int, np.ndarray] = {}
    try:
        with open(path, "rb") if f is None else nullcontext(f) as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                raise ValueError("bad magic")
            (hlen,) = struct.unpack("<Q", f.read(8))
            head = f.read(min(hlen, 1 << 30))
            h = json.loads(head)
            if h["dtype"] != meta.dtype or h["dim"] != meta.dim:
                raise ValueError(f"rows {h['dtype']} x {h['dim']} do not fit the bank")
            itemsize, pos, offsets = DTYPES[meta.dtype].itemsize, f.tell(), {}
            for c, n in h["chunks"]:
                if n != min(meta.chunk_rows, meta.n_rows - c * meta.chunk_rows) or c < 0:
                    raise ValueError(f"chunk {c} of {n} rows does not fit the bank")
                offsets[int(c)] = (pos, int(n))
                pos += n * meta.dim * itemsize
            crc, left = zlib.crc32(head), pos - f.tell()
            if keep:
                start, payload = f.tell(), f.read(left)
                if len(payload) != left:
                    raise ValueError("truncated")
                crc, left = zlib.crc32(payload, crc), 0
                for c, (off, n) in offsets.items():
                    kept[c] = np.frombuffer(payload, DTYPES[meta.dtype], n * meta.dim,
                                            off - start).reshape(n, meta.dim)
            while left > 0:
                block = f.read(min(left, 1 << 24))
                if not block:
                    raise ValueError("truncated")
                crc, left = zlib.crc32(block, crc), left - len(block)
            if f.read(len(_END) + 4) != _END + struct.pack("<I", crc):
                raise ValueError("checksum mismatch")
            parts = tuple(str(p) for p in h.get("parts", []))
            if any("/" in p or not p.startswith(path.name + ".part-") for p in parts):
                raise ValueError(f"bad part names {list(parts)}")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise DataError(f"{path}: bank journal is corrupt ({e})") from e
    return Journal(path, DTYPES[meta.dtype], meta.dim, h["step"], offsets, kept if keep else None,
                   parts)


class PendingParts:
    """Journal parts written since the last commit (`BankStore.write_part`), oldest first, with
    which part holds each chunk's newest rows. A part whose every chunk was written again later
    is deleted: no commit needs it."""

    def __init__(self) -> None:
        self.parts: list[Journal] = []
        self.newest: dict[int, Journal] = {}  # chunk -> the part with its newest rows
        self._live: dict[Path, set[int]] = {}  # part -> chunks it is the newest for

    def add(self, journal: Journal) -> None:
        self.parts.append(journal)
        self._live[journal.path] = set(journal.chunk_ids)
        for c in journal.chunk_ids:
            old = self.newest.get(c)
            self.newest[c] = journal
            if old is not None:
                live = self._live[old.path]
                live.discard(c)
                if not live:
                    self.parts.remove(old)
                    del self._live[old.path]
                    old.path.unlink(missing_ok=True)

    def load(self, c: int) -> np.ndarray | None:
        """Chunk c's newest pending rows (None: no part has them)."""
        while True:
            journal = self.newest.get(c)
            if journal is None:
                return None
            try:
                return journal.load(c)
            except FileNotFoundError:  # superseded and deleted meanwhile: a newer part has it
                continue
