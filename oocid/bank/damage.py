"""Damage is never read as data: a bank's rows are finite unit vectors, so a row that is not
is damage (a scaled or overwritten row, a chunk read back as zeros), and a read that checks
(`BankStore.check_rows`: kNN, training) stops at the first one instead of using it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from oocid.errors import DataError

# Largest |norm - 1| of a sound row. A unit row rounded to float16 has every element within a
# relative 2**-11 of its value, so its norm is within 2**-11 = 4.9e-4 of 1; 1e-3 leaves a factor
# two. Float32 rounding of a unit row gives ~1e-7; 1e-4 catches any real drift.
DEFAULT_TOL = {"float32": 1e-4, "float16": 1e-3}


def check_unit_rows(rows: np.ndarray, first: int, bank: Path, dtype: str) -> None:
    """DataError naming `bank` and the first row of `rows` ((n, D) float32, bank rows from
    `first` on) that is not finite or not unit-norm within the tolerance of the bank's dtype.
    One pass over rows already in memory (a float32 dot product per row)."""
    sq = np.einsum("ij,ij->i", rows, rows)
    tol = DEFAULT_TOL[dtype]
    # |n - 1| <= tol  <=>  (1 - tol)^2 <= n^2 <= (1 + tol)^2; nan fails both
    bad = ~((sq >= (1 - tol) ** 2) & (sq <= (1 + tol) ** 2))
    if not bad.any():
        return
    i = int(np.flatnonzero(bad)[0])
    what = "is not finite" if not np.isfinite(rows[i]).all() else \
        f"has norm {float(np.sqrt(sq[i])):.4g}, not 1"
    raise DataError(f"{bank}: row {first + i} {what}: the bank is damaged or was not written by "
                    f"a trainer (run `oocid bank verify {bank}`)")
