"""What a training step needs of a memory bank: the `Bank` protocol.

Two banks implement it: `oocid.bank.incore.InCoreBank` (the bank held whole on the device) and
`oocid.bank.cache.ChunkCache` (a device cache of chunks over the on-disk bank). The step sees
only this interface, so it runs unchanged on either, and on any bank a user brings.

Dimension letters: B batch, K negatives, D feature dim, N bank rows, T rows of a draw's table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor


class Bank(Protocol):
    n: int  # rows N

    @property
    def device(self) -> torch.device:
        """Where the rows (and the draws' random generator) live."""
        ...

    def gather(self, index: Tensor) -> Tensor:
        """Rows of `index` (B,) as a (B, D) copy."""
        ...

    def draw(self, shape: tuple[int, ...], generator: torch.Generator,
             score_whole: Callable[[int], bool] | None = None, own: Tensor | None = None
             ) -> tuple[Tensor, Tensor]:
        """Negatives drawn uniformly (with replacement) from the rows a step may use, as
        (table (T, D), positions into it of `shape`). `score_whole(T)` says whether the caller
        will score every row of a table of T rows; the bank may then hand out a smaller table.
        `own` (B,): the samples' rows, for a bank that holds part of the rows to keep each
        sample's own row among its (B, K) negatives at the whole bank's rate."""
        ...

    def update(self, index: Tensor, rows: Tensor) -> None:
        """Write `rows` (B, D) at `index` (B,) (the step's momentum update)."""
        ...

    def all_rows(self) -> Tensor:
        """The whole bank (N, D) on the device (the exact softmax); only where it fits."""
        ...

    def end_step(self) -> None:
        """Called once after every step (a cache moves its window of negatives here)."""
        ...
