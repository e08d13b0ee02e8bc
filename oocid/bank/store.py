"""The on-disk memory bank: N x D rows in a Zarr v3 array or a `.npy` memmap, crash-safe writes.

Dimension letters: N rows (one per instance), D feature dimension, C rows per chunk
(`chunk_rows`); chunk c holds rows [c*C, min((c+1)*C, N)). Rows are stored as float32 or
float16 and always read back as float32.

Layout:
    bank.zarr/  zarr.json, c.<c>.0 (one uncompressed file per chunk), oocid.json (BankMeta),
                journal (committed redo journal), journal.tmp (being written)
    bank.npy    a plain .npy file, opened as a read-only memmap and written with pwrite;
                bank.npy.meta.json, bank.npy.journal, bank.npy.journal.tmp beside it

Crash safety: `write_chunks` writes every chunk of the call into one journal file, fsyncs it and
renames it to its committed name (the commit point), then applies the chunks to the rows, fsyncs
them, updates `committed_step` and deletes the journal. Opening a bank for writing replays a
committed journal and discards an uncommitted one, so after a kill every chunk is either its old
or its new content. A read-only open serves a committed journal's chunks from the journal file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from oocid.errors import DataError, InputError, WriteError

BANK_FORMAT = "oocid-bank"
BANK_VERSION = 1
DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
# Largest |norm - 1| accepted by `verify_store`. A unit row rounded to float16 has every element
# within a relative 2**-11 of its value, so its norm is within 2**-11 = 4.9e-4 of 1; 1e-3 leaves
# a factor two. Float32 rounding of a unit row gives ~1e-7; 1e-4 catches any real drift.
DEFAULT_TOL = {"float32": 1e-4, "float16": 1e-3}
_SETTABLE = ("manifest_id", "momentum", "committed_step")
_ABSENT = "no bank here (create one with `oocid bank init` or `oocid train`)"


@dataclass(frozen=True)
class BankMeta:
    """The bank's metadata sidecar (`oocid.json` / `<path>.meta.json`)."""

    n_rows: int
    dim: int
    dtype: str
    chunk_rows: int
    manifest_id: str | None = None
    momentum: float | None = None
    committed_step: int = -1
    init: str = "unit-gaussian"
    seed: int = 0
    format: str = BANK_FORMAT
    version: int = BANK_VERSION

    @classmethod
    def from_json(cls, obj: Any, where: Path) -> BankMeta:
        """Parse and check a decoded metadata object; DataError naming `where` if malformed."""
        if not isinstance(obj, dict) or obj.get("format") != BANK_FORMAT:
            raise DataError(f"{where}: not an oocid bank metadata file")
        if obj.get("version") != BANK_VERSION:
            raise DataError(f"{where}: unsupported bank version {obj.get('version')!r}")
        names = {f.name for f in fields(cls)}
        if set(obj) != names:
            raise DataError(f"{where}: bank metadata keys differ from {sorted(names)}")
        meta = cls(**obj)
        ints = ("n_rows", "dim", "chunk_rows", "committed_step", "seed")
        bad = [k for k in ints if type(getattr(meta, k)) is not int]
        if meta.dtype not in DTYPES or meta.n_rows < 1 or meta.dim < 1 or meta.chunk_rows < 1:
            bad.append("n_rows/dim/chunk_rows/dtype")
        if meta.manifest_id is not None and not isinstance(meta.manifest_id, str):
            bad.append("manifest_id")
        if meta.momentum is not None and not isinstance(meta.momentum, (int, float)):
            bad.append("momentum")
        if bad:
            raise DataError(f"{where}: bad bank metadata field(s) {', '.join(bad)}")
        return meta


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically: tmp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"{path}: could not write bank metadata: {e.strerror or e}") from e


def _meta_bytes(meta: BankMeta) -> bytes:
    return json.dumps(asdict(meta), indent=1).encode()


def _remove(p: Path) -> None:
    """Remove a file or a directory tree if it exists."""
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _init_rows(seed: int, c: int, n: int, dim: int) -> np.ndarray:
    """Chunk c's initial rows: (n, D) float32 i.i.d. normal, each row scaled to unit norm."""
    x = np.random.default_rng([seed, c]).standard_normal((n, dim), dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    x[zero, 0], norms[zero] = 1.0, 1.0
    return x / norms


# ---- the redo journal ------------------------------------------------------------------------
# MAGIC | u64 header length | header json | payload (the chunks' rows, in header order, store
# dtype, C order) | END | u32 crc32 of header + payload.
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
    bank `where`) is raised.
    """
    head = json.dumps({"dtype": dtype, "dim": dim, "step": step,
                       "chunks": [[c, len(a)] for c, a in items]}).encode()
    pos, offsets = len(_MAGIC) + 8 + len(head), {}
    for c, a in items:
        offsets[c] = (pos, len(a))
        pos += a.nbytes
    committed = False
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
        committed = True
        _fsync_dir(final.parent)
    except OSError as e:
        for p in (tmp, final) if committed else (tmp,):
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass
        raise WriteError(f"{where}: could not write bank journal: {e.strerror or e}") from e
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


class _ZarrRows:
    """Rows in a Zarr v3 array at the root of a directory, one uncompressed file per chunk."""

    def __init__(self, path: Path, read_only: bool) -> None:
        import zarr
        from zarr.storage import LocalStore

        self.path = path
        arr = zarr.open_array(store=LocalStore(path, read_only=read_only), mode="r" if read_only
                              else "r+")
        # An all-zero chunk must still be written as a file (it is fsynced by name).
        self.arr = arr.with_config({"write_empty_chunks": True})
        self.shape, self.dtype, self.chunks = arr.shape, np.dtype(arr.dtype), arr.chunks

    @staticmethod
    def create(path: Path, n: int, dim: int, dtype: np.dtype, chunk_rows: int) -> None:
        import zarr
        from zarr.storage import LocalStore

        zarr.create_array(store=LocalStore(path), shape=(n, dim), chunks=(chunk_rows, dim),
                          dtype=dtype, compressors=None, fill_value=0.0,
                          chunk_key_encoding={"name": "default", "separator": "."},
                          dimension_names=("row", "dim"))

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.arr[start:stop]).astype(np.float32, copy=False)

    def take(self, index: np.ndarray) -> np.ndarray | None:
        return None  # grouped by chunk in BankStore

    def write(self, start: int, rows: np.ndarray) -> None:
        self.arr[start:start + len(rows)] = rows

    def sync(self, chunk_ids: list[int]) -> None:
        for c in chunk_ids:
            fd = os.open(self.path / self.arr.metadata.encode_chunk_key((c, 0)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(self.path)

    def cleanup(self) -> None:
        """Remove zarr's temporary chunk files left by a killed write."""
        for p in self.path.glob("c.*.partial"):
            p.unlink(missing_ok=True)

    def close(self) -> None:
        pass


class _NpyRows:
    """Rows in a .npy file: reads through a read-only memmap, writes with pwrite + fdatasync."""

    def __init__(self, path: Path, read_only: bool) -> None:
        self.path = path
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
        if not isinstance(mm, np.memmap) or not mm.flags.c_contiguous:
            raise ValueError("not a C-order array")
        self.mm, self.offset = mm, mm.offset
        self.shape, self.dtype, self.chunks = mm.shape, mm.dtype, None
        self.fd = None if read_only else os.open(path, os.O_RDWR)
        # contiguous reads use pread, not the memmap: mapped pages would count in the process's
        # RSS and grow it to the whole bank over an epoch (the out-of-core budget forbids that)
        self.rfd = os.open(path, os.O_RDONLY)

    @staticmethod
    def create(path: Path, n: int, dim: int, dtype: np.dtype, chunk_rows: int) -> None:
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, dim))
        del mm

    def read(self, start: int, stop: int) -> np.ndarray:
        dim = self.shape[1]
        out = np.empty((stop - start, dim), dtype=self.dtype)
        view = memoryview(out.data).cast("B")
        pos = self.offset + start * dim * self.dtype.itemsize
        while len(view):
            k = os.preadv(self.rfd, [view], pos)
            if k <= 0:
                raise OSError(f"{self.path}: short read at byte {pos}")
            view, pos = view[k:], pos + k
        return out.astype(np.float32, copy=False)

    def take(self, index: np.ndarray) -> np.ndarray | None:
        return self.mm[index].astype(np.float32, copy=False)

    def write(self, start: int, rows: np.ndarray) -> None:
        assert self.fd is not None
        view = rows.data.cast("B")
        pos = self.offset + start * rows.shape[1] * rows.itemsize
        while len(view):
            k = os.pwrite(self.fd, view, pos)
            view, pos = view[k:], pos + k

    def sync(self, chunk_ids: list[int]) -> None:
        assert self.fd is not None
        getattr(os, "fdatasync", os.fsync)(self.fd)

    def cleanup(self) -> None:
        pass

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.rfd is not None:
            os.close(self.rfd)
            self.rfd = None  # type: ignore[assignment]
        self.mm = None  # type: ignore[assignment]


def _layout(path: Path) -> tuple[type[_ZarrRows] | type[_NpyRows], Path, Path, Path]:
    """(backend, metadata path, journal path, journal tmp path) for a bank path."""
    if path.suffix == ".zarr":
        return _ZarrRows, path / "oocid.json", path / "journal", path / "journal.tmp"
    if path.suffix == ".npy":
        meta, journal = (path.with_name(path.name + ext) for ext in (".meta.json", ".journal"))
        return _NpyRows, meta, journal, journal.with_name(journal.name + ".tmp")
    raise InputError(f"{path}: a bank path must end with .zarr or .npy")


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
        _atomic_write(self._meta_path, _meta_bytes(meta))
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


def _progress(total: int, desc: str, on: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", disable=not on)


def create_store(path: Path | str, n_rows: int, dim: int = 128, *, dtype: str = "float32",
                 chunk_rows: int = 4096, manifest_id: str | None = None,
                 momentum: float | None = None, seed: int = 0,
                 progress: bool = False) -> BankStore:
    """Create a bank of `n_rows` random unit rows (D = `dim`) in bounded memory and open it.

    Row content depends only on (seed, chunk), not on write order. The bank is built under a
    temporary name and renamed into place, so a killed create leaves no half-made bank.
    """
    path = Path(path)
    backend, meta_path, journal, journal_tmp = _layout(path)
    for name, v in (("n_rows", n_rows), ("dim", dim), ("chunk_rows", chunk_rows)):
        if type(v) is not int or v < 1:
            raise InputError(f"{path}: {name} must be a positive integer, got {v!r}")
    if dtype not in DTYPES:
        raise InputError(f"{path}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if path.exists():
        raise InputError(f"{path}: already exists (open it, or remove it to start a new bank)")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: no such directory")
    meta = BankMeta(n_rows, dim, dtype, chunk_rows, manifest_id, momentum, seed=seed)
    n_chunks = -(-n_rows // chunk_rows)
    tmp = path.with_name(path.name + ".creating")
    _remove(tmp)  # left by a killed create
    try:
        backend.create(tmp, n_rows, dim, DTYPES[dtype], chunk_rows)
        rows = backend(tmp, read_only=False)
        with _progress(n_chunks, f"creating {path.name}", progress) as bar:
            for c in range(n_chunks):
                lo, hi = c * chunk_rows, min((c + 1) * chunk_rows, n_rows)
                rows.write(lo, _init_rows(seed, c, hi - lo, dim).astype(DTYPES[dtype]))
                bar.update()
        rows.sync(list(range(n_chunks)))
        rows.close()
        if backend is _ZarrRows:
            _atomic_write(tmp / meta_path.name, _meta_bytes(meta))
            os.rename(tmp, path)
        else:
            for p in (journal, journal_tmp):  # stale files of an earlier bank at this path
                p.unlink(missing_ok=True)
            _atomic_write(meta_path, _meta_bytes(meta))
            os.link(tmp, path)  # fails rather than replace a file created meanwhile
            tmp.unlink()
        _fsync_dir(path.parent)
    except (OSError, WriteError) as e:
        _remove(tmp)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise WriteError(f"{path}: could not create bank: {why}") from e
    return open_store(path)


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


@dataclass
class VerifyReport:
    """What `verify_store` found; `ok` when there is nothing wrong."""

    n_rows: int
    dim: int
    dtype: str
    n_bad: int = 0
    bad_rows: list[int] = field(default_factory=list)
    max_norm_error: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth saying, but not wrong

    @property
    def ok(self) -> bool:
        return self.n_bad == 0 and not self.problems


def _row_norms(x: np.ndarray) -> np.ndarray:
    """(n,) float64 L2 norms of (n, D) rows; non-finite rows give nan or inf."""
    x64 = x.astype(np.float64)
    return np.sqrt(np.einsum("ij,ij->i", x64, x64))


def verify_store(path: Path | str, *, tol: float | None = None,
                 progress: bool = False) -> VerifyReport:
    """Check every row is finite and unit-norm within `tol`, streaming chunk by chunk.

    Metadata that disagrees with the rows is a problem too. A committed journal not yet replayed
    (a kill between the journal's commit and its copy into the rows) is a legitimate state, not
    a problem: its chunks are what a read sees, so they are the ones checked, and a note says so.
    """
    path = Path(path)
    try:
        store = open_store(path, read_only=True)
    except DataError as e:
        return VerifyReport(0, 0, "?", problems=[str(e)])
    with store, _progress(store.n_chunks, f"verifying {path.name}", progress) as bar:
        tol = DEFAULT_TOL[store.meta.dtype] if tol is None else tol
        rep = VerifyReport(store.n_rows, store.dim, store.meta.dtype)
        if store.pending_journal:
            rep.notes.append(f"{path}: a committed journal from an interrupted write is checked in "
                             "place of the rows it covers; the next open for writing replays it")
        for c, x in store.iter_chunks():
            err = np.abs(_row_norms(x) - 1.0)
            bad = np.flatnonzero(~(err <= tol))  # nan -> bad
            good = np.delete(err, bad)
            if good.size:
                rep.max_norm_error = max(rep.max_norm_error, float(good.max()))
            rep.n_bad += len(bad)
            room = 20 - len(rep.bad_rows)
            rep.bad_rows += (bad[:room] + store.chunk_range(c)[0]).tolist() if room > 0 else []
            bar.update()
    if rep.n_bad:
        rep.problems.append(f"{path}: {rep.n_bad} row(s) not finite or not unit-norm within {tol}")
    return rep


def store_info(path: Path | str) -> dict[str, Any]:
    """Summary of a bank: shape, dtype, kind, sizes, metadata and row-norm statistics."""
    with open_store(path, read_only=True) as store:
        lo, hi, total = np.inf, -np.inf, 0.0
        for _, x in store.iter_chunks():
            norms = _row_norms(x)
            lo, hi, total = min(lo, norms.min()), max(hi, norms.max()), total + norms.sum()
        m = store.meta
        return {"path": str(store.path), "kind": store.kind, "n_rows": m.n_rows, "dim": m.dim,
                "dtype": m.dtype, "chunk_rows": m.chunk_rows, "n_chunks": store.n_chunks,
                "nbytes_on_disk": store.nbytes_on_disk(), "committed_step": m.committed_step,
                "manifest_id": m.manifest_id, "momentum": m.momentum, "seed": m.seed,
                "pending_journal": store.pending_journal, "norm_min": float(lo),
                "norm_mean": float(total / m.n_rows), "norm_max": float(hi)}
