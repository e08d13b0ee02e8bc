"""The device cache's slots: which chunk each holds, loading and evicting chunks, writing dirty
ones back, and the flush of a commit (`oocid.bank.cache.ChunkCache` adds the window of
negatives and the bank interface on top).

R rows a chunk, D dims, S slots of (R, D) float32 rows on the device. Rows are kept at the
bank's precision: a float16 bank's rows are rounded to float16 as they are written into a slot
(`at_bank_precision`), so a chunk's rows are the same whether they come from its slot, from a
pending write-back or from the store, however the background I/O is timed (docs/design.md,
"Device cache").
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from oocid.bank.io_thread import IOThread
from oocid.bank.sizing import zeroed_slots
from oocid.bank.store import BankStore
from oocid.errors import InputError


def at_bank_precision(rows: Tensor, dtype: np.dtype) -> Tensor:
    """float32 rows rounded to what a bank of `dtype` stores (and reads back): a float16 bank's
    through float16 (round to nearest even, as numpy's cast in the store), a float32 bank's as
    they are."""
    rows = rows.to(torch.float32)
    return rows.to(torch.float16).to(torch.float32) if dtype == np.float16 else rows


class ChunkSlots:
    """S slots of whole chunks on `device`: residency, LRU pool, write-back and flush."""

    def __init__(self, store: BankStore, n_slots: int, device: torch.device, io: bool) -> None:
        self.store = store
        self.device = device
        self.n, self.dim, self.r = store.n_rows, store.dim, store.chunk_rows
        self.n_chunks = store.n_chunks
        self.n_slots = n_slots
        self.w = 0  # window slots (set by the cache); the pool has the others
        self.slots = zeroed_slots(n_slots, self.r, self.dim, device)  # (S, R, D)
        self.flat = self.slots.view(n_slots * self.r, self.dim)  # (S*R, D)
        # chunk -> slot (-1: not resident). The host array is the bookkeeping's (numpy on a few
        # hundred indices costs less than torch's fixed per-op overhead); on the CPU the tensor
        # is a view of it, on a GPU a copy kept in step for lookups of device indices.
        self.slot_host = np.full((self.n_chunks,), -1, dtype=np.int64)
        self.slot_of = torch.from_numpy(self.slot_host) if device.type == "cpu" else \
            torch.full((self.n_chunks,), -1, dtype=torch.int64, device=device)
        self.chunk_of = [-1] * n_slots
        self.dirty = [False] * n_slots
        self.free = list(range(n_slots - 1, -1, -1))
        self.pool: OrderedDict[int, None] = OrderedDict()  # LRU order, oldest first
        self.pinned: set[int] = set()
        self._moves = 0  # bumped whenever a chunk enters or leaves a slot
        self.chunk_loads = 0
        self.writebacks = 0
        self.peak_resident_rows = 0
        self.io = IOThread(store, device if device.type == "cuda" else None) if io else None

    def _fetch(self, c: int) -> Tensor:
        """Rows of chunk c from the prefetcher, a pending write-back, or the store."""
        rows = self.io.current(c) if self.io is not None else None
        if rows is None:
            rows = self.store.read_chunk(c)
        return rows if isinstance(rows, Tensor) else torch.from_numpy(np.asarray(rows))

    def _load(self, c: int) -> int:
        if not self.free:
            self._evict_one()
        s = self.free.pop()
        a, b = self.store.chunk_range(c)
        data = self._fetch(c)
        self.slots[s, : b - a].copy_(data, non_blocking=True)
        if b - a < self.r:
            self.slots[s, b - a:].zero_()
        self._set_slot(c, s)
        self.chunk_of[s] = c
        self.dirty[s] = False
        self.chunk_loads += 1
        self.peak_resident_rows = max(self.peak_resident_rows, self.resident_rows())
        return s

    def _evict_one(self) -> None:
        for c in self.pool:
            if c not in self.pinned:
                break
        else:
            raise InputError(
                f"{self.store.path}: the cache's {self.n_slots - self.w} pool chunks cannot hold "
                "one batch's positives (raise --cache-mb, or read shards in order)")
        del self.pool[c]
        self._drop(c)

    def _drop(self, c: int) -> None:
        s = int(self.slot_host[c])
        if self.dirty[s]:
            a, b = self.store.chunk_range(c)
            # in the store's dtype: exact, as the slot holds rows at the bank's precision, and
            # a pending float16 copy takes half the host memory
            rows = self.slots[s, : b - a].cpu().numpy().astype(self.store.dtype)
            if self.io is not None:
                self.io.write_back(c, rows)
            else:
                self.store.write_part({c: rows})
            self.writebacks += 1
        self._set_slot(c, -1)
        self.chunk_of[s] = -1
        self.dirty[s] = False
        self.free.append(s)

    def _set_slot(self, c: int, s: int) -> None:
        self.slot_host[c] = s
        self._moves += 1
        if self.slot_of.device.type != "cpu":
            self.slot_of[c] = s

    def resident_rows(self) -> int:
        return (self.n_slots - len(self.free)) * self.r

    def ensure(self, chunks: list[int]) -> None:
        """Make `chunks` resident at once (positives go to the pool, most recently used)."""
        self.pinned = set(chunks)  # not evicted while this call loads the others
        try:
            for c in chunks:
                if c in self.pool:
                    self.pool.move_to_end(c)
                elif self.slot_host[c] < 0:
                    self._load(c)
                    self.pool[c] = None
        finally:
            self.pinned = set()

    @staticmethod
    def _host(index: Tensor) -> np.ndarray:
        """A small index set as a flat host array (a view on the CPU)."""
        return index.detach().reshape(-1).cpu().numpy()

    def _chunk_groups(self, idx: np.ndarray) -> tuple[list[int], np.ndarray]:
        """(The chunks of host indices idx, sorted; the chunk of each index)."""
        chunk = idx // self.r
        return np.unique(chunk).tolist(), chunk

    def _one_chunk_at_a_time(self, chunks: list[int], idx: np.ndarray, chunk: np.ndarray
                             ) -> Iterator[tuple[int, Tensor, Tensor]]:
        """For an index set spanning more chunks than the pool (slower, never wrong): each chunk
        made resident in turn, with (the chunk, which entries of idx are its rows, where those
        rows sit in `self.flat`), valid until the next one is yielded."""
        for c in chunks:
            self.ensure([c])
            m = np.flatnonzero(chunk == c)
            yield c, torch.from_numpy(m).to(self.device), \
                self._positions(idx[m], chunk[m], torch.Size([len(m)]))

    def _positions(self, idx: np.ndarray, chunk: np.ndarray, shape: torch.Size) -> Tensor:
        """Rows of `self.flat` holding global rows idx (all resident), as a device tensor."""
        slot = self.slot_host[chunk]
        if (slot < 0).any():
            raise RuntimeError("bank cache: a row that is not resident")
        return torch.from_numpy(slot * self.r + idx % self.r).view(shape).to(self.device)

    # ---- persistence -----------------------------------------------------------------------

    def flush(self, step: int | None = None) -> None:
        """Write every dirty chunk (and pending write-backs) and, with `step`, commit it."""
        if self.io is not None:
            self.io.drain()
        chunks: dict[int, np.ndarray] = {}
        for s, c in enumerate(self.chunk_of):
            if c >= 0 and self.dirty[s]:
                a, b = self.store.chunk_range(c)
                chunks[c] = self.slots[s, : b - a].cpu().numpy()
        if self.io is not None:  # read-aheads from before this write are stale now
            self.io.invalidate(list(chunks))
        self.store.write_chunks(chunks, step)
        for s in range(self.n_slots):
            self.dirty[s] = False

    def commit(self, step: int) -> None:
        self.flush(step)

    def close(self, raise_errors: bool = True) -> None:
        """Let the pending write-backs land and stop the I/O thread, always; then raise its
        stored error, unless `raise_errors` is False (a `finally` while another exception
        propagates, which that error must not replace: the parts are uncommitted either way)."""
        io, self.io = self.io, None
        if io is not None:
            io.close(raise_errors)

    def stats(self) -> dict[str, int]:
        return {"chunk_loads": self.chunk_loads, "writebacks": self.writebacks,
                "bytes_read": self.store.bytes_read, "bytes_written": self.store.bytes_written,
                "peak_resident_rows": self.peak_resident_rows, "slots": self.n_slots,
                "window_slots": self.w}
