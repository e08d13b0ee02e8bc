"""Checking a bank (`oocid bank verify`) and summarising it (`oocid bank info`), streaming it one
chunk at a time."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oocid.bank.damage import DEFAULT_TOL, norm_errors
from oocid.bank.store import BankStore, open_store
from oocid.errors import DataError
from oocid.progress import chunk_bar


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
    norms: np.ndarray = np.sqrt(np.einsum("ij,ij->i", x64, x64))
    return norms


def verify_store(path: Path | str, *, tol: float | None = None,
                 progress: bool = False) -> VerifyReport:
    """Check every row is finite and unit-norm within `tol`, streaming chunk by chunk.

    Metadata that disagrees with the rows is a problem too, and so is each chunk file that is
    missing, truncated or does not decode (named; the other chunks are still checked). A
    committed journal not yet replayed (a kill between the journal's commit and its copy into
    the rows) is a legitimate state, not a problem: its chunks are what a read sees, so they
    are the ones checked, and a note says so.
    """
    path = Path(path)
    try:
        store = open_store(path, read_only=True)
    except DataError as e:
        return VerifyReport(0, 0, "?", problems=[str(e)])
    store.check_rows = False  # every damaged row is listed below, not only the first
    with store, chunk_bar(store.n_chunks, f"verifying {path.name}", progress) as bar:
        tol = DEFAULT_TOL[store.meta.dtype] if tol is None else tol
        rep = VerifyReport(store.n_rows, store.dim, store.meta.dtype)
        if store.pending_journal:
            rep.notes.append(f"{path}: a committed journal from an interrupted write is checked in "
                             "place of the rows it covers; the next open for writing replays it")
        unreadable = 0
        for c in range(store.n_chunks):
            try:
                x = store.read_chunk(c)
            except DataError as e:  # a chunk file missing, truncated or undecodable: named
                unreadable += 1
                if unreadable <= 5:
                    rep.problems.append(str(e))
                bar.update()
                continue
            err = norm_errors(x)
            bad = np.flatnonzero(~(err <= tol))  # nan -> bad: as a checked read (damage.py)
            good = np.delete(err, bad)
            if good.size:
                rep.max_norm_error = max(rep.max_norm_error, float(good.max()))
            rep.n_bad += len(bad)
            room = 20 - len(rep.bad_rows)
            rep.bad_rows += (bad[:room] + store.chunk_range(c)[0]).tolist() if room > 0 else []
            bar.update()
    if unreadable > 5:
        rep.problems.append(f"{path}: {unreadable - 5} more unreadable chunk file(s)")
    if rep.n_bad:
        rep.problems.append(f"{path}: {rep.n_bad} row(s) not finite or not unit-norm within {tol}")
    return rep


def store_info(path: Path | str) -> dict[str, Any]:
    """Summary of a bank: shape, dtype, kind, sizes, metadata and row-norm statistics. A chunk
    file that is missing, truncated or does not decode leaves the norms out: `damaged` holds
    its error (naming the file) in their place, the metadata is all there."""
    with open_store(path, read_only=True) as store:
        store.check_rows = False  # the norms of a damaged bank are what this reports
        m = store.meta
        info: dict[str, Any] = {
            "path": str(store.path), "kind": store.kind, "n_rows": m.n_rows, "dim": m.dim,
            "dtype": m.dtype, "chunk_rows": m.chunk_rows, "n_chunks": store.n_chunks,
            "nbytes_on_disk": store.nbytes_on_disk(), "committed_step": m.committed_step,
            "bank_id": m.bank_id, "manifest_id": m.manifest_id, "momentum": m.momentum,
            "seed": m.seed, "pending_journal": store.pending_journal}
        lo, hi, total = np.inf, -np.inf, 0.0
        try:
            for _, x in store.iter_chunks():
                norms = _row_norms(x)
                lo, hi, total = min(lo, norms.min()), max(hi, norms.max()), total + norms.sum()
        except DataError as e:  # a chunk file missing, truncated or undecodable
            return {**info, "damaged": str(e)}
        return {**info, "norm_min": float(lo), "norm_mean": float(total / m.n_rows),
                "norm_max": float(hi)}


def check_matches(store: BankStore, n_rows: int, dim: int, manifest_id: str | None, *,
                  source: str = "the shards") -> None:
    """DataError unless the bank fits data of `n_rows` samples, `dim` features, `manifest_id`.

    A bank with no manifest id recorded matches any manifest; `manifest_id=None` skips the check.
    """
    name, new = store.path, "; give a new --bank path to start a bank for them"
    if store.n_rows != n_rows:
        raise DataError(f"{name} has {store.n_rows} rows but {source} have {n_rows} samples{new}")
    if store.dim != dim:
        raise DataError(f"{name} has rows of dimension {store.dim} but the model's are {dim}"
                        f"{new.replace('them', 'it')}")
    have = store.meta.manifest_id
    if manifest_id is not None and have is not None and have != manifest_id:
        raise DataError(f"{name} belongs to manifest {have} but {source} are manifest "
                        f"{manifest_id}{new}")
