"""The device cache of bank chunks over the on-disk store (docs/design.md, "Device cache").

N rows in chunks of R rows (chunk c = rows [c*R, (c+1)*R), aligned with the shards); D dims;
B batch; K negatives. The cache holds S slots of R rows on the device, S*R <= the budget:

- W *window* slots cycle through the bank in chunk order at a rate that visits every chunk once
  per epoch (each chunk stays W/rate steps). Negatives are drawn uniformly from the window's
  rows only, so over an epoch every row has the same chance of being a negative.
- P = S - W *pool* slots hold the chunks of the batch's positives, LRU; a chunk evicted dirty is
  written back (in a background thread, `oocid.bank.io_thread`) into journal parts of the next
  commit, not into the rows: the rows on disk stay those of the last commit. The slots, their
  residency, write-back and flush are `oocid.bank.slots`; this module adds the window.
- The window's next chunks are read ahead by the same background thread (host buffers, pinned
  on CUDA), so disk I/O overlaps compute. Disk traffic per epoch is O(bank size).
When the budget covers the whole bank, every chunk is loaded in order once and never evicted,
and gather / sample / update are exactly those of `InCoreBank` (bit for bit on CPU).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from math import ceil
from typing import Any

import numpy as np
import torch
from torch import Tensor

from oocid.bank.slots import ChunkSlots, at_bank_precision
from oocid.bank.store import BankStore
from oocid.errors import InputError
from oocid.method.kernels import take_rows
from oocid.method.own_draws import thin_own

TOUCH_MAX = 8192  # gathers up to this many indices update the LRU order
WINDOW_COPY_MAX_BYTES = 128 * 2**20  # `draw` may copy the window's rows out up to this size


class ChunkCache(ChunkSlots):
    """Bank rows cached on `device` in whole chunks; same interface as `InCoreBank`."""

    def __init__(self, store: BankStore, budget_rows: int, device: torch.device, *,
                 steps_per_epoch: int = 1, pool_chunks: int | None = None, prefetch: bool = True,
                 prefetch_ahead: int = 2) -> None:
        r, n_chunks = store.chunk_rows, store.n_chunks
        max_slots = budget_rows // r
        self.full = budget_rows >= store.n_rows or max_slots >= n_chunks
        if not self.full and max_slots < 3:
            need = store.n_rows if n_chunks <= 3 else 3 * r  # the whole bank, or 3 chunks
            what = "the whole bank" if n_chunks <= 3 else f"3 chunks of {r} rows"
            mb = ceil(need * store.dim * 4 / 2**20 * 1000) / 1000  # rounded up: enough
            raise InputError(f"{store.path}: a device cache of {budget_rows} rows is too small: "
                             f"it needs {what}, {need} rows (--cache-mb {mb:g} or more)")
        super().__init__(store, n_chunks if self.full else max_slots, device,
                         io=prefetch and not self.full)
        self.window: deque[int] = deque()
        # the last small gather: (a copy of its indices, _moves then, its chunks, its
        # positions), so the step's update of the same positives skips locating them again
        self._located: tuple[np.ndarray, int, list[int], Tensor] | None = None
        self.ahead = prefetch_ahead
        # the rate at which a sample's own row stays among its negatives: 1 with one process;
        # this process's rows / the bank's with several (oocid.method.own_draws)
        self.keep_own = 1.0
        # several processes drawing from the whole bank: `exchange` gathers every process's
        # `share_rows` rows (oocid.train.ddp.exchange_negatives); None: draw from own rows
        self.exchange: Callable[[Tensor], Tensor] | None = None
        self.share_rows = 0
        if self.full:
            self.rows = self.flat[: self.n]  # (N, D): identity layout, as InCoreBank
            for c in range(self.n_chunks):
                self._load(c)
            self.w = self.n_slots
            self.rate = 0.0
        else:
            pool = max(2, self.n_slots // 4) if pool_chunks is None else pool_chunks
            self.w = max(1, self.n_slots - min(self.n_slots - 1, max(1, pool)))
            self.rate = self.n_chunks / max(1, steps_per_epoch)  # window chunks per step
        self.next_chunk = 0  # next chunk to enter the window
        self.acc = 0.0
        self._window_rows: tuple[Tensor, Tensor] | None = None  # (rows, their positions)
        if not self.full:
            for _ in range(self.w):
                self._window_push()

    def _fits_pool(self, chunks: list[int]) -> bool:
        return len(chunks) <= self.n_slots - self.w

    # ---- window --------------------------------------------------------------------------

    def _window_push(self) -> None:
        c = self.next_chunk
        self.next_chunk = (self.next_chunk + 1) % self.n_chunks
        if c in self.pool:
            del self.pool[c]
        elif self.slot_host[c] < 0:
            self._load(c)
        self.window.append(c)
        self._window_rows = None
        if self.io is not None:  # read ahead the chunks that enter next
            for j in range(self.ahead):
                nxt = (self.next_chunk + j) % self.n_chunks
                if self.slot_host[nxt] < 0:
                    self.io.read_ahead(nxt)

    def _window_pop(self) -> None:
        c = self.window.popleft()
        self.pool[c] = None
        self.pool.move_to_end(c, last=False)  # least recently used: the first to go
        while len(self.pool) > self.n_slots - self.w:
            self._evict_one()

    def end_step(self) -> None:
        """Advance the window by this step's share of the epoch."""
        if self.full:
            return
        self.acc += self.rate
        while self.acc >= 1.0:
            self.acc -= 1.0
            self._window_pop()
            self._window_push()

    def _window_index(self) -> tuple[Tensor, Tensor]:
        """The window's rows in order (global indices) and where they sit in `self.flat`."""
        if self._window_rows is None:
            ranges = [self.store.chunk_range(c) for c in self.window]
            rows = torch.cat([torch.arange(a, b) for a, b in ranges])
            at = torch.cat([torch.arange(b - a) + int(self.slot_host[c]) * self.r
                            for c, (a, b) in zip(self.window, ranges, strict=True)])
            self._window_rows = rows.to(self.device), at.to(self.device)
        return self._window_rows

    # ---- the bank interface ----------------------------------------------------------------

    def gather(self, index: Tensor) -> Tensor:
        """Rows (..., D) for global indices (...). Small index sets (a batch's positives, shared
        negatives) are made resident and marked recently used, chunk by chunk if they span more
        chunks than the pool holds; large ones (more than TOUCH_MAX, e.g. per-sample negatives
        gathered as the official code does, tools/bench_bank.py) take one table lookup, loading
        only on a miss. (Training draws its negatives already located: `draw`.)"""
        if self.full:
            return take_rows(self.rows, index)
        if int(index.numel()) > TOUCH_MAX:
            slot = self.slot_of[index // self.r]
            if not bool((slot < 0).any()):
                return take_rows(self.flat, slot * self.r + index % self.r)
        idx = self._host(index)
        chunks, chunk = self._chunk_groups(idx)
        if (self.slot_host[chunks] >= 0).all():  # all resident: only the LRU order changes
            for c in chunks:
                if c in self.pool:
                    self.pool.move_to_end(c)
        elif self._fits_pool(chunks):
            self.ensure(chunks)
        else:  # more chunks than the pool
            out = torch.empty(*index.shape, self.dim, dtype=self.flat.dtype, device=self.device)
            flat_out = out.view(-1, self.dim)
            for _, m, at in self._one_chunk_at_a_time(chunks, idx, chunk):
                flat_out[m] = take_rows(self.flat, at)
            return out
        at = self._positions(idx, chunk, index.shape)
        self._located = (idx.copy(), self._moves, chunks, at)
        return take_rows(self.flat, at)

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """Negative indices drawn uniformly, with replacement, from the window's rows."""
        if self.full:
            return torch.randint(0, self.n, shape, generator=generator,
                                 device=generator.device).to(self.device)
        rows, _ = self._window_index()
        return rows[self._pick(int(rows.numel()), shape, generator)]

    def draw(self, shape: tuple[int, ...], generator: torch.Generator,
             score_whole: Callable[[int], bool] | None = None, own: Tensor | None = None
             ) -> tuple[Tensor, Tensor]:
        """`sample`'s negatives, located: (table, positions) with table[positions] ==
        gather(sample(shape, g)) for a generator in the same state, without global indices
        or LRU bookkeeping (the window is resident). With `own` (B,), the rows of per-sample
        draws (B, K), and `keep_own` < 1 (this cache holds one process's part of a bank), a
        draw of a sample's own row is thinned to the whole bank's rate (`thin_own`)."""
        if self.exchange is not None:
            return self._draw_across(shape, generator)
        thin = own is not None and self.keep_own < 1.0 and len(shape) == 2
        if self.full:
            pick = self.sample(shape, generator)
            if thin:
                assert own is not None
                pick = thin_own(pick, None, own, self.n, self.keep_own, generator)
            return self.rows, pick
        rows, at = self._window_index()
        n = int(rows.numel())
        pick = self._pick(n, shape, generator)
        if thin:
            assert own is not None
            pick = thin_own(pick, rows, own, n, self.keep_own, generator)
        if score_whole is not None and score_whole(n) \
                and n * self.dim * self.flat.element_size() <= WINDOW_COPY_MAX_BYTES:
            # negatives the caller scores as a whole table: the window's rows copied out in
            # order are the table of the rows that can be drawn, with `pick` as positions; the
            # copy spares scoring the pool's other rows too (docs/benchmarks.md, "training step")
            return take_rows(self.flat, at), pick
        return self.flat, at[pick]

    def _draw_across(self, shape: tuple[int, ...], generator: torch.Generator
                     ) -> tuple[Tensor, Tensor]:
        """Several processes: each draws `share_rows` rows uniformly from its candidates (all
        its rows, or its window); the rows of every process, exchanged (a collective), are the
        table the step's negatives are drawn from, uniformly: each negative is then a uniform
        draw from the whole bank, and a sample's own row comes back at about the whole bank's
        rate, 1/N."""
        if self.full:
            mine = take_rows(self.rows, self._pick(self.n, (self.share_rows,), generator))
        else:
            rows, at = self._window_index()
            pick = self._pick(int(rows.numel()), (self.share_rows,), generator)
            mine = take_rows(self.flat, at[pick])
        assert self.exchange is not None
        table = self.exchange(mine)
        return table, self._pick(int(table.shape[0]), shape, generator)

    def _pick(self, n: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        return torch.randint(0, n, shape, generator=generator,
                             device=generator.device).to(self.device)

    def update(self, index: Tensor, rows: Tensor) -> None:
        """Write rows (B, D) at global indices (B,) (unique), at the bank's precision, and mark
        their chunks dirty."""
        rows = at_bank_precision(rows, self.store.dtype)
        if self.full:
            self.rows[index] = rows
            for c in self._chunk_groups(self._host(index))[0]:  # slot c holds chunk c here
                self.dirty[c] = True
            return
        memo = self._located  # where `gather` found these rows, if no chunk has moved since
        idx = self._host(index)
        if memo is not None and memo[1] == self._moves and np.array_equal(memo[0], idx):
            chunks, at = memo[2], memo[3].view(index.shape)
            self.ensure(chunks)  # all resident: only marks them recently used
        else:
            chunks, chunk = self._chunk_groups(idx)
            if not self._fits_pool(chunks):
                for c, m, at in self._one_chunk_at_a_time(chunks, idx, chunk):
                    self.flat[at] = rows[m.to(rows.device)]
                    self.dirty[int(self.slot_host[c])] = True
                return
            self.ensure(chunks)  # the usual case (a batch's positives): one write
            at = self._positions(idx, chunk, index.shape)
        self.flat[at] = rows
        for s in self.slot_host[chunks].tolist():
            self.dirty[s] = True

    def all_rows(self) -> Tensor:
        if not self.full:
            raise InputError("the exact softmax needs the whole bank in the cache; raise "
                             "--cache-mb or use --loss infonce (or --loss auto)")
        return self.rows

    # ---- between commits, checkpoints -----------------------------------------------------

    def rows_now(self) -> Iterator[tuple[int, Tensor]]:
        """(first row, rows) of each chunk as the cache holds it now, writing nothing to the
        bank (a kNN scan between commits): resident chunks from their slots, the others from
        the store, whose pending parts hold the evicted ones."""
        if self.full:
            yield 0, self.rows
            return
        if self.io is not None:  # pending write-backs land in parts, which the store reads
            self.io.drain()
        for c in range(self.n_chunks):
            a, b = self.store.chunk_range(c)
            s = int(self.slot_host[c])
            yield a, self.slots[s, : b - a] if s >= 0 else \
                torch.from_numpy(self.store.read_chunk(c)).to(self.device, self.flat.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self.window), "next_chunk": self.next_chunk, "acc": self.acc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the window (which rows are negatives) of a checkpoint by position: it starts
        at the saved window's first chunk and holds this cache's W chunks, so a resume under
        another budget (a saved full cache has no window) refills it to the current size."""
        if self.full:
            return
        while self.window:
            self._window_pop()
        start = int(state["window"][0]) if state["window"] else int(state["next_chunk"])
        self.next_chunk = start % self.n_chunks
        for _ in range(self.w):
            self._window_push()
        self.acc = float(state["acc"])
