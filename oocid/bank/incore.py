"""The bank held whole in (device) memory, loaded from and committed to the on-disk store.

This is the in-core reference of the algorithm; `oocid.bank.cache` gives the same interface over a
budget of cached chunks. N rows, D dims, B batch, K negatives.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from oocid.bank.slots import at_bank_precision
from oocid.bank.store import BankStore
from oocid.method.kernels import take_rows


class InCoreBank:
    """All N rows as one float32 tensor on `device`, at the bank's precision (a float16 bank's
    updates are rounded to float16, as `ChunkCache` rounds them)."""

    def __init__(self, store: BankStore, device: torch.device) -> None:
        self.store = store
        self.n = store.n_rows
        self.dim = store.dim
        rows = np.empty((self.n, self.dim), dtype=np.float32)
        for c, chunk in store.iter_chunks():
            a, b = store.chunk_range(c)
            rows[a:b] = chunk
        self.rows = torch.from_numpy(rows).to(device)  # (N, D)
        self.device = device

    def gather(self, index: Tensor) -> Tensor:
        """Rows (len(index), D) for any index tensor shape (..., ) -> (..., D)."""
        return take_rows(self.rows, index)

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """Negative indices, uniform over [0, N) with replacement, of the given shape."""
        return torch.randint(0, self.n, shape, generator=generator, device=generator.device
                             ).to(self.device)

    def draw(self, shape: tuple[int, ...], generator: torch.Generator,
             score_whole: Callable[[int], bool] | None = None, own: Tensor | None = None
             ) -> tuple[Tensor, Tensor]:
        """`sample`'s negatives as (table, positions): table[positions] are their rows (the
        whole bank, whether or not the caller scores it whole; `own` changes nothing)."""
        return self.rows, self.sample(shape, generator)

    def update(self, index: Tensor, rows: Tensor) -> None:
        self.rows[index] = at_bank_precision(rows, self.store.dtype)

    def all_rows(self) -> Tensor:
        return self.rows

    def end_step(self) -> None:
        """Nothing moves between steps in a bank held whole."""

    def commit(self, step: int) -> None:
        """Write every chunk to the store and commit `step` (one journal, atomic)."""
        host = self.rows.detach().cpu().numpy()
        chunks = {c: host[slice(*self.store.chunk_range(c))] for c in range(self.store.n_chunks)}
        self.store.write_chunks(chunks, step=step)
