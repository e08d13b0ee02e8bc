"""The on-disk memory bank: N x D rows (`oocid.bank.rows`), crash-safe writes, opening a bank.

Dimension letters: N rows (one per instance), D feature dimension, C rows per chunk
(`chunk_rows`); chunk c holds rows [c*C, min((c+1)*C, N)). Rows are stored as float32 or
float16 and always read back as float32.

Crash safety: `write_chunks` writes every chunk of the call into one journal file, fsyncs it and
renames it to its committed name (the commit point, `oocid.bank.journal`), then applies the
chunks to the rows, fsyncs them, updates `committed_step` and deletes the journal. Opening a
bank for writing replays a committed journal and discards an uncommitted one, so after a kill
every chunk is either its old or its new content. A read-only open serves a committed journal's
chunks from the journal file. `oocid.bank.create` makes new banks, `oocid.bank.verify` checks
them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from oocid.atomic import atomic_write
from oocid.bank.journal import Journal, read_journal, write_journal
from oocid.bank.meta import DTYPES, BankMeta
from oocid.bank.rows import _layout, _NpyRows, _ZarrRows
from oocid.errors import DataError, InputError, WriteError
from oocid.progress import Progress, progress_bar

_SETTABLE = ("manifest_id", "momentum", "committed_step")
_ABSENT = "no bank here (create one with `oocid bank init` or `oocid train`)"


def chunk_bar(total: int, desc: str, on: bool) -> Progress:
    """A progress bar over a bank's chunks (none unless `on`; oocid.progress)."""
    return progress_bar(total, desc, "chunk", enabled=on)


class BankStore:
    """An open bank. Reads of distinct chunks are safe from several threads; writes serialise.

    Use `create_store` / `open_store` to get one. `bytes_read` / `bytes_written` count row
    payload bytes in the store dtype; `journal_bytes_written` counts the journal's copy.
    """

    def __init__(self, path: Path, meta: BankMeta, read_only: bool, rows: _ZarrRows | _NpyRows,
                 meta_path: Path, journal: Path, journal_tmp: Path) -> None:
        self.path, self.meta, self.read_only = path, meta, read_only
        self._rows, self._meta_path = rows, meta_path
        self._journal, self._journal_tmp = journal, journal_tmp
        self.bytes_read = self.bytes_written = self.journal_bytes_written = 0
        self._overlay: Journal | None = None  # a committed journal not yet in the rows
        self._lock = threading.RLock()
        self._count_lock = threading.Lock()

    @property
    def n_rows(self) -> int:
        return self.meta.n_rows

    @property
    def dim(self) -> int:
        return self.meta.dim

    @property
    def chunk_rows(self) -> int:
        return self.meta.chunk_rows

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.meta.dtype]

    @property
    def kind(self) -> str:
        """"zarr" or "npy"."""
        return "zarr" if isinstance(self._rows, _ZarrRows) else "npy"

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    @property
    def pending_journal(self) -> bool:
        """True when reads are served partly from a committed journal not yet replayed."""
        return self._overlay is not None

    def chunk_range(self, c: int) -> tuple[int, int]:
        """[start, stop) rows of chunk c."""
        if not 0 <= c < self.n_chunks:
            raise IndexError(f"chunk {c} out of range [0, {self.n_chunks})")
        return c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.n_rows)

    # ---- reads -------------------------------------------------------------------------------

    def _count_read(self, n_rows: int) -> None:
        with self._count_lock:
            self.bytes_read += n_rows * self.dim * self.dtype.itemsize

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a fresh (stop-start, D) float32 array."""
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"rows [{start}, {stop}) out of range [0, {self.n_rows})")
        out = self._rows.read(start, stop)
        overlay = self._overlay
        if overlay is not None:
            for c in overlay.chunk_ids:
                lo, hi = self.chunk_range(c)
                if lo < stop and start < hi:
                    a, b = max(lo, start), min(hi, stop)
                    out[a - start:b - start] = overlay.load(c)[a - lo:b - lo]
        self._count_read(stop - start)
        return out

    def read_chunk(self, c: int) -> np.ndarray:
        """Chunk c as a fresh (chunk_len, D) float32 array."""
        return self.read_rows(*self.chunk_range(c))

    def read_index(self, index: np.ndarray) -> np.ndarray:
        """Rows `index` (any order, repeats allowed) as a (len(index), D) float32 array."""
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        if not idx.size:
            return np.empty((0, self.dim), dtype=np.float32)
        if idx.min() < 0 or idx.max() >= self.n_rows:
            raise IndexError(f"row index out of range [0, {self.n_rows})")
        fast = self._rows.take(idx) if self._overlay is None else None
        if fast is not None:
            self._count_read(len(idx))
            return fast
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        order = np.argsort(idx, kind="stable")
        srt = idx[order]
        bounds = np.flatnonzero(np.diff(srt // self.chunk_rows)) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(srt)], strict=True):
            lo, hi = int(srt[a]), int(srt[b - 1]) + 1  # only the span of this chunk we need
            out[order[a:b]] = self.read_rows(lo, hi)[srt[a:b] - lo]
        return out

    def iter_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (c, (chunk_len, D) float32 rows) for every chunk, one chunk in memory at a time."""
        for c in range(self.n_chunks):
            yield c, self.read_chunk(c)

    # ---- writes ------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise InputError(f"{self.path}: bank is open read-only")

    def write_chunks(self, chunks: Mapping[int, np.ndarray], step: int | None = None) -> None:
        """Replace whole chunks {c: (chunk_len, D) rows}, all or none, crash-safe.

        If `step` is given, `meta.committed_step` becomes `step` together with the rows.
        Raises WriteError if the journal cannot be written (the bank is then unchanged).
        """
        self._check_writable()
        items = []
        for c, rows in sorted(chunks.items()):
            lo, hi = self.chunk_range(int(c))
            arr = np.ascontiguousarray(rows, dtype=self.dtype)
            if arr.shape != (hi - lo, self.dim):
                raise ValueError(f"chunk {c}: rows {arr.shape} != {(hi - lo, self.dim)}")
            if not np.isfinite(arr).all():
                raise DataError(f"{self.path}: refusing to write non-finite values to chunk {c}")
            items.append((int(c), arr))
        if not items and step is None:
            return
        with self._lock:
            if self._overlay is not None:
                self._recover()  # a previous apply failed: finish it first
            journal = write_journal(self._journal_tmp, self._journal, items, self.meta.dtype,
                                    self.dim, step, self.path)
            self.journal_bytes_written += sum(a.nbytes for _, a in items)
            self._apply(journal)

    def _apply(self, journal: Journal) -> None:
        """Copy a committed journal's chunks into the rows, fsync, set the step, drop it."""
        try:
            for c in journal.chunk_ids:
                rows = journal.load(c)
                self._rows.write(self.chunk_range(c)[0], rows)
                self.bytes_written += rows.nbytes
            self._rows.sync(journal.chunk_ids)
            if journal.step is not None:
                self._set_meta(committed_step=journal.step)
            # No directory fsync for the unlink: if a power cut brings the journal back, it is
            # the latest committed one (each commit fsyncs its name), so replaying is harmless.
            self._journal.unlink()
        except (OSError, WriteError) as e:
            # Reads see the committed content (from the durable journal file) until it is replayed.
            self._overlay = replace(journal, data=None)
            reason = e.strerror if isinstance(e, OSError) else str(e)
            raise WriteError(f"{self.path}: could not apply bank journal {self._journal.name} "
                             f"(it is replayed when the bank is next opened): {reason}") from e
        self._overlay = None

    def _recover(self) -> None:
        """Discard an uncommitted journal; replay a committed one (idempotent)."""
        self._journal_tmp.unlink(missing_ok=True)
        if self._journal.exists():
            self._apply(read_journal(self._journal, self.meta))
            self._rows.cleanup()
        self._overlay = None

    def write_rows(self, start: int, rows: np.ndarray, step: int | None = None) -> None:
        """Replace rows [start, start+M) with `rows` (M, D): read-modify-write of touched chunks."""
        self._check_writable()
        rows = np.asarray(rows)
        stop = start + len(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim or not 0 <= start <= stop <= self.n_rows:
            raise ValueError(f"rows {rows.shape} at {start} do not fit the bank "
                             f"({self.n_rows}, {self.dim})")
        with self._lock:
            chunks = {}
            for c in range(start // self.chunk_rows, -(-stop // self.chunk_rows)):
                lo, hi = self.chunk_range(c)
                if start <= lo and hi <= stop:
                    chunks[c] = rows[lo - start:hi - start]
                else:
                    cur = self.read_chunk(c)
                    a, b = max(lo, start), min(hi, stop)
                    cur[a - lo:b - lo] = rows[a - start:b - start]
                    chunks[c] = cur
            self.write_chunks(chunks, step)

    def set_meta(self, **updates: Any) -> None:
        """Atomically update metadata fields: manifest_id, momentum, committed_step."""
        self._check_writable()
        unknown = set(updates) - set(_SETTABLE)
        if unknown:
            raise ValueError(f"set_meta: only {_SETTABLE} can be set, not {sorted(unknown)}")
        with self._lock:
            self._set_meta(**updates)

    def _set_meta(self, **updates: Any) -> None:
        meta = replace(self.meta, **updates)
        atomic_write(self._meta_path, meta.to_bytes(), "bank metadata")
        self.meta = meta

    # ---- misc --------------------------------------------------------------------------------

    def nbytes_on_disk(self) -> int:
        """Bytes of all the bank's files (rows, metadata, journal)."""
        if self.kind == "zarr":
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        paths = (self.path, self._meta_path, self._journal)
        return sum(p.stat().st_size for p in paths if p.exists())

    def close(self) -> None:
        with self._lock:
            self._rows.close()

    def __enter__(self) -> BankStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(path: Path | str, *, read_only: bool = False) -> BankStore:
    """Open a bank; a writable open first recovers from an interrupted write."""
    path = Path(path)
    backend, meta_path, journal, journal_tmp = _layout(path)
    if not path.exists():
        raise InputError(f"{path}: {_ABSENT}")
    if not meta_path.is_file():
        raise DataError(f"{path}: not an oocid bank (no {meta_path.name})")
    try:
        meta = BankMeta.from_json(json.loads(meta_path.read_text()), meta_path)
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"{meta_path}: unreadable bank metadata ({e})") from e
    try:
        rows = backend(path, read_only)
    except Exception as e:  # zarr / numpy raise many types for a damaged array
        raise DataError(f"{path}: cannot open the bank's rows ({type(e).__name__}: {e})") from e
    want = ((meta.n_rows, meta.dim), DTYPES[meta.dtype])
    chunks = rows.chunks is None or rows.chunks == (meta.chunk_rows, meta.dim)
    if (rows.shape, rows.dtype) != want or not chunks:
        rows.close()
        raise DataError(f"{path}: rows {rows.shape} {rows.dtype} (chunks {rows.chunks}) disagree "
                        f"with {meta_path.name}: ({meta.n_rows}, {meta.dim}) {meta.dtype} "
                        f"(chunks of {meta.chunk_rows})")
    store = BankStore(path, meta, read_only, rows, meta_path, journal, journal_tmp)
    try:
        if read_only:
            if journal.exists():
                store._overlay = read_journal(journal, meta)
        else:
            store._recover()
    except BaseException:
        store.close()
        raise
    return store


def check_matches(store: BankStore, n_rows: int, dim: int, manifest_id: str | None, *,
                  source: str = "the shards") -> None:
    """DataError unless the bank fits data of `n_rows` samples, `dim` features, `manifest_id`.

    A bank with no manifest id recorded matches any manifest; `manifest_id=None` skips the check.
    """
    name = store.path.name
    if store.n_rows != n_rows:
        raise DataError(f"{name} has {store.n_rows} rows but {source} have {n_rows} samples")
    if store.dim != dim:
        raise DataError(f"{name} has rows of dimension {store.dim} but the model's are {dim}")
    have = store.meta.manifest_id
    if manifest_id is not None and have is not None and have != manifest_id:
        raise DataError(f"{name} belongs to manifest {have} but {source} are manifest "
                        f"{manifest_id}")
