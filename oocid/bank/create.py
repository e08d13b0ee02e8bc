"""Making a new bank: random unit rows built in bounded memory under a temporary name and
renamed into place, so a killed create leaves no half-made bank."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from oocid.atomic import atomic_write, fsync_dir
from oocid.bank.meta import DTYPES, BankMeta, new_bank_id
from oocid.bank.rows import _layout, _ZarrRows
from oocid.bank.store import BankStore, open_store
from oocid.errors import InputError, WriteError
from oocid.progress import chunk_bar


def _remove(p: Path) -> None:
    """Remove a file or a directory tree if it exists."""
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def remove_bank(path: Path) -> None:
    """Remove a bank and its metadata and journal files (one this process made and failed to
    fill: nothing of it may pass for a bank)."""
    _, meta_path, journal, journal_tmp = _layout(path)
    for p in (meta_path, journal, journal_tmp, path):
        _remove(p)


def _init_rows(seed: int, c: int, n: int, dim: int) -> np.ndarray:
    """Chunk c's initial rows: (n, D) float32 i.i.d. normal, each row scaled to unit norm."""
    x = np.random.default_rng([seed, c]).standard_normal((n, dim), dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    x[zero, 0], norms[zero] = 1.0, 1.0
    rows: np.ndarray = x / norms
    return rows


def create_store(path: Path | str, n_rows: int, dim: int = 128, *, dtype: str = "float32",
                 chunk_rows: int = 4096, manifest_id: str | None = None,
                 momentum: float | None = None, seed: int = 0,
                 progress: bool = False, bank_id: str | None = None) -> BankStore:
    """Create a bank of `n_rows` random unit rows (D = `dim`) in bounded memory and open it.

    Row content depends only on (seed, chunk), not on write order. The bank is built under a
    temporary name and renamed into place, so a killed create leaves no half-made bank.
    `bank_id`: the bank's identity (default: a new random one; a bank assembled from parts
    keeps theirs).
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
    meta = BankMeta(n_rows, dim, dtype, chunk_rows, manifest_id, momentum, seed=seed,
                    bank_id=bank_id or new_bank_id())
    n_chunks = -(-n_rows // chunk_rows)
    tmp = path.with_name(path.name + ".creating")
    _remove(tmp)  # left by a killed create
    try:
        backend.create(tmp, n_rows, dim, DTYPES[dtype], chunk_rows)
        rows = backend(tmp, read_only=False)
        with chunk_bar(n_chunks, f"creating {path.name}", progress) as bar:
            for c in range(n_chunks):
                lo, hi = c * chunk_rows, min((c + 1) * chunk_rows, n_rows)
                rows.write(lo, _init_rows(seed, c, hi - lo, dim).astype(DTYPES[dtype]))
                bar.update()
        rows.sync(list(range(n_chunks)))
        rows.close()
        if backend is _ZarrRows:
            atomic_write(tmp / meta_path.name, meta.to_bytes(), "bank metadata")
            os.rename(tmp, path)
        else:
            for p in (journal, journal_tmp):  # stale files of an earlier bank at this path
                p.unlink(missing_ok=True)
            atomic_write(meta_path, meta.to_bytes(), "bank metadata")
            os.link(tmp, path)  # fails rather than replace a file created meanwhile
            tmp.unlink()
        fsync_dir(path.parent)
    except (OSError, WriteError) as e:
        _remove(tmp)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise WriteError(f"{path}: could not create bank: {why}") from e
    return open_store(path)


def write_rows(store: BankStore, start: int, rows: np.ndarray, step: int | None = None) -> None:
    """Replace rows [start, start+M) of `store` with `rows` (M, D): a read-modify-write of the
    chunks they touch, committed all or none (a convenience for tools and tests; a trainer
    writes whole chunks)."""
    rows = np.asarray(rows)
    stop = start + len(rows)
    if rows.ndim != 2 or rows.shape[1] != store.dim or not 0 <= start <= stop <= store.n_rows:
        raise ValueError(f"rows {rows.shape} at {start} do not fit the bank "
                         f"({store.n_rows}, {store.dim})")
    chunks = {}
    for c in range(start // store.chunk_rows, -(-stop // store.chunk_rows)):
        lo, hi = store.chunk_range(c)
        if start <= lo and hi <= stop:
            chunks[c] = rows[lo - start:hi - start]
        else:
            cur = store.read_rows(lo, hi)  # as stored: rows written here may repair damage
            a, b = max(lo, start), min(hi, stop)
            cur[a - lo:b - lo] = rows[a - start:b - start]
            chunks[c] = cur
    store.write_chunks(chunks, step)
