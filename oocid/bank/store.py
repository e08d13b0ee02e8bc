"""The on-disk memory bank: N x D rows (`oocid.bank.rows`), crash-safe writes, opening a bank.

Dimension letters: N rows (one per instance), D feature dimension, C rows per chunk
(`chunk_rows`); chunk c holds rows [c*C, min((c+1)*C, N)). Rows are stored as float32 or
float16 and always read back as float32.

Crash safety: a commit writes its chunks as journal *parts* (at most MAX_WRITE_BYTES of rows
each), makes them durable, then one small *record* names the step and the parts; the record's
rename is the commit point (`oocid.bank.journal`). Then the parts are applied to the rows, fsynced,
`committed_step` is updated and the journal files are deleted. Opening a bank for writing replays
a committed record with all its parts and discards parts no record names, so after a kill the
bank is exactly its old or its new committed state, whatever the commit's size. Chunks written
with `write_part` between commits (a cache's evictions) stay in their parts until the next
commit. A read-only open sees committed chunks only, while a trainer writes (`bank.snapshot`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from oocid.atomic import atomic_write
from oocid.bank.damage import check_unit_rows
from oocid.bank.journal import Journal, PendingParts, read_journal, write_journal
from oocid.bank.meta import BANK_VERSION, DTYPES, BankMeta, new_bank_id
from oocid.bank.rows import _layout, _NpyRows, _ZarrRows, open_rows
from oocid.bank.settle import check_settle
from oocid.bank.snapshot import committed_snapshot, file_size, trainer_may_write
from oocid.errors import DataError, InputError, WriteError

MAX_WRITE_BYTES = 256 * 2**20  # cap one journal part at this many bytes of rows
_ABSENT = "no bank here (create one with `oocid bank init` or `oocid train`)"


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
        self._overlay: list[Journal] | None = None  # a committed record (+ parts) not yet in the rows
        self._pending = PendingParts()  # written since the last commit, not yet in the rows
        self._seq = 0
        self.writer = "0"  # names this writer's parts (several writers may write one step's parts)
        self.check_rows = True  # read_chunk: DataError at a row not finite or not unit-norm
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

    @property
    def pending_step(self) -> int | None:
        """The step a committed record not yet replayed carries (None: none, or no step)."""
        return self._overlay[-1].step if self._overlay else None

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
        for journal in self._overlay or ():
            for c in journal.chunk_ids:
                self._patch(out, start, stop, c, journal.load)
        if self._pending.newest:
            for c in range(start // self.chunk_rows, -(-stop // self.chunk_rows)):
                self._patch(out, start, stop, c, self._pending.load)
        self._count_read(stop - start)
        return out

    def _patch(self, out: np.ndarray, start: int, stop: int, c: int,
               load: Callable[[int], np.ndarray | None]) -> None:
        """Overwrite the part of out (rows [start, stop)) that chunk c covers with load(c)."""
        lo, hi = self.chunk_range(c)
        if lo < stop and start < hi:
            rows = load(c)
            if rows is not None:
                a, b = max(lo, start), min(hi, stop)
                out[a - start:b - start] = rows[a - lo:b - lo]

    def read_chunk(self, c: int) -> np.ndarray:
        """Chunk c as a fresh (chunk_len, D) float32 array (checked with `check_rows`)."""
        rows = self.read_rows(*self.chunk_range(c))
        if self.check_rows:
            try:
                check_unit_rows(rows, c * self.chunk_rows, self.path, self.meta.dtype)
            except DataError:  # a .npy a trainer started since the open may write in place:
                if not (self.read_only and isinstance(self._rows, _NpyRows)):
                    raise
                self._rows.stable = True  # from now on read until two reads agree; again
                rows = self.read_rows(*self.chunk_range(c))
                check_unit_rows(rows, c * self.chunk_rows, self.path, self.meta.dtype)
        return rows

    def read_index(self, index: np.ndarray) -> np.ndarray:
        """Rows `index` (any order, repeats allowed) as a (len(index), D) float32 array."""
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        if not idx.size:
            return np.empty((0, self.dim), dtype=np.float32)
        if idx.min() < 0 or idx.max() >= self.n_rows:
            raise IndexError(f"row index out of range [0, {self.n_rows})")
        fast = self._rows.take(idx) if self._overlay is None and not self._pending.newest else None
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

    def _items(self, chunks: Mapping[int, np.ndarray]) -> list[tuple[int, np.ndarray]]:
        items = []
        for c, rows in sorted(chunks.items()):
            lo, hi = self.chunk_range(int(c))
            arr = np.ascontiguousarray(rows, dtype=self.dtype)
            if arr.shape != (hi - lo, self.dim):
                raise ValueError(f"chunk {c}: rows {arr.shape} != {(hi - lo, self.dim)}")
            if not np.isfinite(arr).all():
                raise DataError(f"{self.path}: refusing to write non-finite values to chunk {c}")
            items.append((int(c), arr))
        return items

    def write_chunks(self, chunks: Mapping[int, np.ndarray], step: int | None = None,
                     foreign: Sequence[str] = ()) -> None:
        """Replace whole chunks {c: (chunk_len, D) rows}, all or none, crash-safe, any size.

        Commits these chunks together with every part written by `write_part` since the last
        commit, and the durable parts named in `foreign` (other writers' parts of this step,
        `pending_names`). If `step` is given, `meta.committed_step` becomes `step` together with
        the rows. Raises WriteError if the journal cannot be written (the bank is then unchanged).
        """
        self._check_writable()
        items = self._items(chunks)
        if not items and step is None and not self._pending.parts and not foreign:
            return
        with self._lock:
            if self._overlay is not None:
                self._recover()  # a previous apply failed: finish it first
            batch: list[tuple[int, np.ndarray]] = []
            size = 0
            for c, arr in items:  # all but the last MAX_WRITE_BYTES go into parts
                if batch and size + arr.nbytes > MAX_WRITE_BYTES:
                    self._write_part(batch)
                    batch, size = [], 0
                batch.append((c, arr))
                size += arr.nbytes
            others = [read_journal(self._journal.with_name(name), self.meta) for name in foreign]
            parts = tuple(j.path.name for j in [*self._pending.parts, *others])
            record = write_journal(self._journal_tmp, self._journal, batch, self.meta.dtype,
                                   self.dim, step, self.path, parts)
            self.journal_bytes_written += size
            journals = [*self._pending.parts, *others, record]
            self._overlay = journals  # reads see the commit while it is applied
            self._pending = PendingParts()
            self._apply(journals)

    def write_part(self, chunks: Mapping[int, np.ndarray]) -> None:
        """Write chunks into a durable journal part of the next commit, not into the rows.

        Reads see them at once; the next `write_chunks` commits them, and a kill before that
        discards them (the rows keep the last committed content)."""
        self._check_writable()
        items = self._items(chunks)
        if items:
            with self._lock:
                self._write_part(items)

    def _write_part(self, items: list[tuple[int, np.ndarray]]) -> None:
        self._seq += 1
        final = self._journal.with_name(f"{self._journal.name}.part-{self.writer}-{self._seq:06d}")
        tmp = final.with_name(final.name + ".tmp")
        journal = replace(write_journal(tmp, final, items, self.meta.dtype, self.dim, None,
                                        self.path), data=None)
        self.journal_bytes_written += sum(a.nbytes for _, a in items)
        self._pending.add(journal)

    def settle(self, step: int, previous: int | None = None, bank_id: str | None = None
               ) -> None:
        """Bring a node-local bank (opened with `recover=False`) to the run's committed `step`
        (rank 0's; `previous`: the one before) and `bank_id`: replay its own record, then, one
        commit behind (killed between rank 0's commit and its own), commit its parts, all of
        that step, or else discard them. Another run's bank: DataError (`check_settle`)."""
        self._check_writable()
        with self._lock:
            self._journal_tmp.unlink(missing_ok=True)
            journals = self._committed()
            if journals is not None:
                self._apply(journals)
            have = self.meta.committed_step
            check_settle(self.path, have, self.meta.bank_id, step, previous, bank_id)
            files = self._part_files()
            if have < step and files:
                parts = [read_journal(p, self.meta) for p in files]  # in writer, seq order
                self._apply([*parts, write_journal(self._journal_tmp, self._journal, [],
                                                   self.meta.dtype, self.dim, step, self.path,
                                                   tuple(p.name for p in files))])
            elif have < step:
                self._set_step(step)
            self._rows.cleanup()
            self._recover()  # discards the parts still here: of a step rank 0 never committed
            self._upgrade(bank_id)  # one metadata write: a kill leaves no id of its own

    def pending_names(self) -> list[str]:
        """This writer's durable parts not yet committed, for another writer's record."""
        return [j.path.name for j in self._pending.parts]

    def forget_pending(self) -> None:
        """Another writer has committed (and applied) this writer's parts."""
        self._pending = PendingParts()

    def _part_files(self) -> list[Path]:
        return sorted(self._journal.parent.glob(self._journal.name + ".part-*"))

    def _apply(self, journals: list[Journal]) -> None:
        """Copy a committed record's parts and chunks into the rows (in order), fsync, set the
        step, then delete the record and its parts."""
        record = journals[-1]
        try:
            touched: set[int] = set()
            for journal in journals:
                for c in journal.chunk_ids:
                    rows = journal.load(c)
                    self._rows.write(self.chunk_range(c)[0], rows)
                    self.bytes_written += rows.nbytes
                    touched.add(c)
            self._rows.sync(sorted(touched))
            if record.step is not None:
                self._set_step(record.step)
            # No directory fsync for the unlinks: if a power cut brings the record back, it is
            # the latest committed one (each commit fsyncs its name), so replaying is harmless;
            # parts it no longer names are discarded on open.
            self._journal.unlink()
            for journal in journals[:-1]:
                journal.path.unlink(missing_ok=True)
        except (OSError, WriteError) as e:
            # Reads see the committed content (from the durable journal files) until replayed.
            self._overlay = [replace(j, data=None) for j in journals]
            reason = e.strerror if isinstance(e, OSError) else str(e)
            raise WriteError(f"{self.path}: could not apply bank journal {self._journal.name} "
                             f"(it is replayed when the bank is next opened): {reason}") from e
        self._overlay = None

    def _committed(self) -> list[Journal] | None:
        """The committed record's parts and the record, in apply order (None: no record)."""
        if not self._journal.exists():
            return None
        record = read_journal(self._journal, self.meta)
        parts = []
        for name in record.parts:
            part = self._journal.with_name(name)
            if not part.is_file():
                raise DataError(f"{part}: bank journal is corrupt (a committed part is missing)")
            parts.append(read_journal(part, self.meta))
        return [*parts, record]

    def _recover(self) -> None:
        """Discard uncommitted parts; replay a committed record with its parts (idempotent)."""
        self._journal_tmp.unlink(missing_ok=True)
        journals = self._committed()
        named = {j.path for j in journals or ()}
        for p in self._part_files():
            if p not in named:
                p.unlink()
        self._pending = PendingParts()
        if journals is not None:
            self._apply(journals)
            self._rows.cleanup()
        self._overlay = None

    def _set_step(self, step: int) -> None:
        """Commit `step`, remembering the step committed before it (a replayed record: same)."""
        if step != self.meta.committed_step:
            self._set_meta(committed_step=step, previous_step=self.meta.committed_step)

    def _upgrade(self, bank_id: str | None = None) -> None:
        """A bank of an older version, written from now on as this version writes (with an id
        of its own from now on: checkpoints written before it recorded none), or taking
        `bank_id` (a node-local bank takes rank 0's): one metadata write."""
        want = bank_id or self.meta.bank_id or new_bank_id()
        if self.meta.version < BANK_VERSION or self.meta.bank_id != want:
            self._set_meta(version=BANK_VERSION, bank_id=want)

    def _set_meta(self, **updates: Any) -> None:
        meta = replace(self.meta, **updates)
        atomic_write(self._meta_path, meta.to_bytes(), "bank metadata")
        self.meta = meta

    # ---- misc --------------------------------------------------------------------------------

    def nbytes_on_disk(self) -> int:
        """Bytes of all the bank's files (rows, metadata, journal)."""
        paths = [*(self.path.rglob("*") if self.kind == "zarr" else (self.path, self._meta_path)),
                 self._journal, *self._part_files()]  # a trainer may delete some meanwhile
        return sum(file_size(p) for p in dict.fromkeys(paths))

    def close(self) -> None:
        with self._lock:
            self._rows.close()

    def __enter__(self) -> BankStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(path: Path | str, *, read_only: bool = False, recover: bool = True) -> BankStore:
    """Open a bank; a writable open first recovers from an interrupted write (unless another
    writer of the same run, holding the bank's lock, has just done so: `recover=False`)."""
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
    rows = open_rows(backend, path, read_only, meta, meta_path.name)
    store = BankStore(path, meta, read_only, rows, meta_path, journal, journal_tmp)
    try:
        if read_only:
            store._overlay = committed_snapshot(journal, meta)
            rows.stable = isinstance(rows, _NpyRows) and trainer_may_write(path)
        elif recover:
            store._recover()
            store._upgrade()
    except BaseException:
        store.close()
        raise
    return store
