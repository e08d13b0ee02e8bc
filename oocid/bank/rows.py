"""Where a bank's rows live: a Zarr v3 array (`bank.zarr/`) or a `.npy` file, behind one small
interface (read, take, write, sync, cleanup, close), and the file layout of each kind.

Layout:
    bank.zarr/  zarr.json, c.<c>.0 (one uncompressed file per chunk), oocid.json (BankMeta),
                journal (committed redo journal), journal.tmp (being written)
    bank.npy    a plain .npy file, opened as a read-only memmap and written with pwrite;
                bank.npy.meta.json, bank.npy.journal, bank.npy.journal.tmp beside it
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from oocid.atomic import fsync_dir
from oocid.bank.meta import DTYPES, BankMeta
from oocid.errors import DataError, InputError


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
        self.stable = False  # unused: each chunk file is replaced whole
        # every chunk is a file of exactly this size (uncompressed; None: a codec that changes it)
        self.chunk_bytes = None if arr.compressors or arr.filters else \
            int(np.prod(arr.chunks)) * self.dtype.itemsize

    @staticmethod
    def create(path: Path, n: int, dim: int, dtype: np.dtype, chunk_rows: int) -> None:
        import zarr
        from zarr.storage import LocalStore

        zarr.create_array(store=LocalStore(path), shape=(n, dim), chunks=(chunk_rows, dim),
                          dtype=dtype, compressors=None, fill_value=0.0,
                          chunk_key_encoding={"name": "default", "separator": "."},
                          dimension_names=("row", "dim"))

    def chunk_file(self, c: int) -> Path:
        return self.path / self.arr.metadata.encode_chunk_key((c, 0))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop). Every chunk is written as a file (write_empty_chunks), so a
        missing one is damage, not zeros (zarr would read it as its fill value): DataError,
        as for a chunk file of the wrong size or one that does not decode."""
        rows = self.chunks[0]
        spans = range(start // rows, -(-stop // rows))
        for c in spans:
            path = self.chunk_file(c)
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                raise DataError(f"{path}: the bank's chunk file is missing (rows "
                                f"{c * rows}-{min((c + 1) * rows, self.shape[0]) - 1})") from None
            if self.chunk_bytes is not None and size != self.chunk_bytes:
                raise DataError(f"{path}: the bank's chunk file is truncated or damaged ({size} "
                                f"bytes, a chunk is {self.chunk_bytes})")
        try:
            out = np.asarray(self.arr[start:stop])
        except (ValueError, TypeError, KeyError, OSError, RuntimeError) as e:  # zarr's, for a
            # chunk that does not decode
            names = ", ".join(str(self.chunk_file(c)) for c in spans)
            raise DataError(f"{names}: the bank's chunk does not decode ({type(e).__name__}: "
                            f"{' '.join(str(e).split())})") from e
        return out.astype(np.float32, copy=False)

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
        fsync_dir(self.path)

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
        self.stable = False  # read twice until two reads agree (a trainer may write in place)

    @staticmethod
    def create(path: Path, n: int, dim: int, dtype: np.dtype, chunk_rows: int) -> None:
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, dim))
        del mm

    def read(self, start: int, stop: int) -> np.ndarray:
        out = self._read(start, stop)
        for _ in range(100 if self.stable else 0):
            again = self._read(start, stop)
            if np.array_equal(out, again):
                break
            out = again
        return out.astype(np.float32, copy=False)

    def _read(self, start: int, stop: int) -> np.ndarray:
        dim = self.shape[1]
        out = np.empty((stop - start, dim), dtype=self.dtype)
        view = memoryview(out.data).cast("B")
        pos = self.offset + start * dim * self.dtype.itemsize
        while len(view):
            k = os.preadv(self.rfd, [view], pos)
            if k <= 0:
                raise OSError(f"{self.path}: short read at byte {pos}")
            view, pos = view[k:], pos + k
        return out

    def take(self, index: np.ndarray) -> np.ndarray | None:
        if self.stable:
            return None  # grouped by chunk in BankStore, through read()
        rows: np.ndarray = self.mm[index].astype(np.float32, copy=False)
        return rows

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


def open_rows(backend: type[_ZarrRows] | type[_NpyRows], path: Path, read_only: bool,
              meta: BankMeta, meta_name: str) -> _ZarrRows | _NpyRows:
    """The bank's rows, checked against its metadata (read from `meta_name`)."""
    try:
        rows = backend(path, read_only)
    except Exception as e:  # zarr / numpy raise many types for a damaged array
        raise DataError(f"{path}: cannot open the bank's rows ({type(e).__name__}: {e})") from e
    want = ((meta.n_rows, meta.dim), DTYPES[meta.dtype])
    chunks = rows.chunks is None or rows.chunks == (meta.chunk_rows, meta.dim)
    if (rows.shape, rows.dtype) != want or not chunks:
        rows.close()
        raise DataError(f"{path}: rows {rows.shape} {rows.dtype} (chunks {rows.chunks}) disagree "
                        f"with {meta_name}: ({meta.n_rows}, {meta.dim}) {meta.dtype} "
                        f"(chunks of {meta.chunk_rows})")
    return rows
