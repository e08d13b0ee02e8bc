"""The device cache's background I/O thread: reads the window's next chunks ahead and writes
evicted dirty chunks back into journal parts of the next commit (`BankStore.write_part`), so disk
I/O overlaps compute (`oocid.bank.cache.ChunkCache`).

Each chunk has a version, bumped whenever newer rows of it are queued for write-back or written;
a read-ahead is used only if no newer rows were queued after it started, and a chunk with a
write-back still pending is served from the pending copy (newer than the disk).
"""

from __future__ import annotations

import queue
import threading
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from oocid.bank.store import BankStore

Job = Literal["read", "write", "stop"]


class IOThread:
    """One background thread: reads chunks ahead, writes evicted chunks back. With a CUDA
    `pin_device`, read chunks come back in pinned host memory, allocated with that device
    current in the thread (a new thread's current device is GPU 0, whatever the caller's)."""

    def __init__(self, store: BankStore, pin_device: torch.device | None = None) -> None:
        self.store = store
        self.pin_device = pin_device
        self.pin = pin_device is not None
        self.jobs: queue.Queue[tuple[Job, tuple[int, int] | None]] = queue.Queue()
        self.ready: dict[int, tuple[int, np.ndarray | Tensor]] = {}  # chunk -> (version read, rows)
        self.version: dict[int, int] = {}  # bumped when a chunk's newer rows are queued to write
        self.pending: dict[int, np.ndarray] = {}  # chunk -> rows queued for write-back
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.error: BaseException | None = None
        self.inflight = 0
        self.thread = threading.Thread(target=self._run, name="oocid-bank-io", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.pin_device is not None and self.pin_device.index is not None:
            try:
                torch.cuda.set_device(self.pin_device)
            except BaseException as e:  # reported by the next check(), as a job's error is
                with self.cond:
                    self.error = e
        while True:
            kind, arg = self.jobs.get()
            if kind == "stop":
                return
            try:
                if kind == "read":
                    assert arg is not None
                    c, v = arg
                    rows: np.ndarray | Tensor = self.store.read_chunk(c)
                    if self.pin:
                        rows = torch.from_numpy(rows).pin_memory()
                    with self.cond:
                        self.ready[c] = (v, rows)
                elif kind == "write":
                    with self.cond:
                        batch = dict(self.pending)
                    if batch:
                        self.store.write_part(batch)
                        with self.cond:
                            for c, rows in batch.items():
                                if self.pending.get(c) is rows:
                                    del self.pending[c]
            except BaseException as e:
                with self.cond:
                    self.error = e
            finally:
                with self.cond:
                    self.inflight -= 1
                    self.cond.notify_all()

    def submit(self, kind: Job, arg: tuple[int, int] | None = None) -> None:
        with self.cond:
            self.inflight += 1
        self.jobs.put((kind, arg))

    def read_ahead(self, c: int) -> None:
        """Queue a read of chunk c unless one is already waiting to be taken."""
        if c not in self.ready:
            self.submit("read", (c, self.version.get(c, 0)))

    def current(self, c: int) -> np.ndarray | Tensor | None:
        """Chunk c's newest rows held here (None: read it from the store): a pending write-back,
        else a read-ahead made after the last write-back was queued. A read-ahead is taken
        either way (it is used once)."""
        self.check()
        with self.cond:
            got = self.ready.pop(c, None)
            fresh = got[1] if got is not None and got[0] == self.version.get(c, 0) else None
            pend = self.pending.get(c)
        return fresh if pend is None else pend

    def write_back(self, c: int, rows: np.ndarray) -> None:
        """Queue chunk c's rows (a host copy) to be written to the store."""
        with self.cond:
            self.pending[c] = rows
            self.version[c] = self.version.get(c, 0) + 1
        self.submit("write")

    def invalidate(self, chunks: list[int]) -> None:
        """Mark read-aheads of `chunks` queued so far stale (their rows are being written)."""
        with self.cond:
            for c in chunks:
                self.version[c] = self.version.get(c, 0) + 1

    def check(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def drain(self) -> None:
        with self.cond:
            while self.inflight:
                self.cond.wait()
        self.check()

    def stop(self) -> None:
        """Stop the thread once the jobs queued so far are done (pending write-backs land)."""
        self.jobs.put(("stop", None))
        self.thread.join()

    def close(self, raise_errors: bool = True) -> None:
        """Stop the thread, always; then raise a job's stored error, unless `raise_errors` is
        False (closing while another exception propagates: that one must not be replaced)."""
        try:
            self.stop()
        finally:
            if raise_errors:
                self.check()

