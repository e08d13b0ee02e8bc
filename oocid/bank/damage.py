"""Damage is never read as data: a bank's rows are finite unit vectors, so a row that is not
is damage (a scaled or overwritten row, a chunk read back as zeros), and a chunk read
(`BankStore.read_chunk`: kNN, training, merging parts) stops at the first one instead of using
it. Only `oocid bank verify` turns the check off (`check_rows`), to list every damaged row."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from oocid.errors import DataError

# Largest |norm - 1| of a sound row. A unit row rounded to float16 has every element within a
# relative 2**-11 of its value, so its norm is within 2**-11 = 4.9e-4 of 1; 1e-3 leaves a factor
# two. Float32 rounding of a unit row gives ~1e-7; 1e-4 catches any real drift.
DEFAULT_TOL = {"float32": 1e-4, "float16": 1e-3}


def norm_errors(rows: np.ndarray) -> np.ndarray:
    """(n,) |norm - 1| of (n, D) float32 rows, nan or inf for a row not finite: one float32
    pass (its rounding, ~1e-6 for D 128, is far inside either tolerance)."""
    sq = np.einsum("ij,ij->i", rows, rows)
    err: np.ndarray = np.abs(np.sqrt(sq.astype(np.float64)) - 1.0)
    return err


def check_unit_rows(rows: np.ndarray, first: int, bank: Path, dtype: str) -> None:
    """DataError naming `bank` and the first row of `rows` ((n, D) float32, bank rows from
    `first` on) that is not finite or not unit-norm within the tolerance of the bank's dtype
    (the test `oocid bank verify` makes)."""
    err = norm_errors(rows)
    bad = ~(err <= DEFAULT_TOL[dtype])  # nan -> bad
    if not bad.any():
        return
    i = int(np.flatnonzero(bad)[0])
    what = "is not finite" if not np.isfinite(rows[i]).all() else \
        f"has norm {float(np.linalg.norm(rows[i].astype(np.float64))):.4g}, not 1"
    raise DataError(f"{bank}: row {first + i} {what}: the bank is damaged or was not written by "
                    f"a trainer (run `oocid bank verify {bank}`)")
