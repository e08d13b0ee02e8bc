"""The bank's redo journal: how a write of several chunks commits all or none.

`BankStore.write_chunks` writes every chunk of the call into one journal file under its
temporary name, fsyncs it and renames it to its committed name (the rename is the commit point),
then applies the chunks to the rows (docs/design.md, "Journal and crash safety"). A committed
journal found on open is replayed; an uncommitted one is discarded.

File format: MAGIC | u64 header length | header json (dtype, dim, step, [[chunk, rows], ...]) |
payload (the chunks' rows, in header order, store dtype, C order) | END | u32 crc32 of header +
payload.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

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
                  dim: int, step: int | None, where: Path) -> Journal:
    """Write chunks [(c, (chunk_len, D) C-order rows)] to `tmp`, fsync, rename to `final`.

    The rename is the commit point. On OSError nothing is committed and WriteError (naming the
    bank `where`, not the journal file) is raised. The rows are streamed into the file chunk by
    chunk with a running crc32, so no second copy of them is made in memory.
    """
    head = json.dumps({"dtype": dtype, "dim": dim, "step": step,
                       "chunks": [[c, len(a)] for c, a in items]}).encode()
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
    return Journal(final, DTYPES[dtype], dim, step, offsets, dict(items))


def read_journal(path: Path, meta: BankMeta) -> Journal:
    """Parse a committed journal and check its crc32; DataError if it is damaged."""
    try:
        with open(path, "rb") as f:
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
            while left > 0:
                block = f.read(min(left, 1 << 24))
                if not block:
                    raise ValueError("truncated")
                crc, left = zlib.crc32(block, crc), left - len(block)
            if f.read(len(_END) + 4) != _END + struct.pack("<I", crc):
                raise ValueError("checksum mismatch")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise DataError(f"{path}: bank journal is corrupt ({e})") from e
    return Journal(path, DTYPES[meta.dtype], meta.dim, h["step"], offsets)
