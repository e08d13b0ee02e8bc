"""The cache's slots (`oocid.bank.slots`): a float16 bank's rows do not depend on when a
write-back lands, and closing stops the I/O thread without hiding an exception."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from oocid.bank.cache import ChunkCache
from oocid.bank.create import create_store
from oocid.bank.slots import at_bank_precision
from oocid.bank.store import BankStore
from oocid.method.npid import momentum_update, random_unit_rows

CPU = torch.device("cpu")
N, R, D = 32, 4, 8  # 8 chunks; a partial cache of 3 slots: 1 window chunk (chunk 0), 2 pool


def gated(store: BankStore, gate: threading.Event) -> None:
    """Make the store's `write_part` (the I/O thread's write-back) wait until `gate` is set."""
    real = store.write_part

    def write_part(chunks: Mapping[int, np.ndarray]) -> None:
        assert gate.wait(60), "the test never opened the gate"
        real(chunks)

    store.write_part = write_part  # type: ignore[method-assign]


def rows_of(c: int) -> torch.Tensor:
    return torch.arange(c * R, (c + 1) * R)


@pytest.mark.parametrize("kind", ["npy", "zarr"])
def test_float16_rows_do_not_depend_on_when_a_write_back_lands(tmp_path: Path, kind: str) -> None:
    """The same updates and evictions, with each evicted chunk read back while its write-back
    is still pending (the I/O thread held), after it landed, written synchronously
    (prefetch=False), or never evicted (a full cache): the same rows read back each time, the
    same bank after the commit, and a full cache's rows equal the committed bank's."""
    results: dict[str, tuple[list[torch.Tensor], np.ndarray]] = {}
    for mode in ("pending", "landed", "sync", "full"):
        store = create_store(tmp_path / f"{mode}.{kind}", N, D, chunk_rows=R, seed=1,
                             dtype="float16")
        gate = threading.Event()
        if mode in ("pending", "landed"):
            gated(store, gate)
        cache = ChunkCache(store, N if mode == "full" else 3 * R, CPU, steps_per_epoch=100,
                           pool_chunks=2, prefetch=mode != "sync")
        assert cache.full == (mode == "full")
        g = torch.Generator().manual_seed(0)
        got = []
        for k in range(8):
            c, others = 1 + k % 3, [4 + k % 2, 6]  # never chunk 0, the window's
            idx = rows_of(c)[torch.randperm(R, generator=g)[:3]]
            new = momentum_update(cache.gather(idx), random_unit_rows(3, D, g), 0.5)
            cache.update(idx, new)
            for o in others:  # two other chunks through the pool of 2: c is evicted
                cache.gather(rows_of(o))
            if mode != "full":
                assert cache.slot_host[c] < 0
            if mode == "landed":
                gate.set()
                assert cache.io is not None
                cache.io.drain()
            if mode == "pending":
                assert cache.io is not None and c in cache.io.pending  # not written yet
            got.append(cache.gather(rows_of(c)).clone())
        gate.set()
        cache.commit(1)
        bank = store.read_rows(0, N)
        if mode == "full":
            assert torch.equal(cache.rows, torch.from_numpy(bank))
        else:
            assert cache.writebacks >= 8
        cache.close()
        store.close()
        results[mode] = (got, bank)
    want_got, want_bank = results["sync"]
    for mode, (got, bank) in results.items():
        assert all(torch.equal(a, b) for a, b in zip(got, want_got, strict=True)), mode
        assert np.array_equal(bank, want_bank), mode


def test_bank_precision_rounds_as_the_store_does() -> None:
    """torch's float16 rounding in the cache equals numpy's cast in the store, ties included
    (every float16 value, the midpoints between neighbours, and normal draws)."""
    h = np.arange(65536, dtype=np.uint16).view(np.float16)
    a = np.sort(h[np.isfinite(h)].astype(np.float32))
    mid = ((a[:-1].astype(np.float64) + a[1:]) / 2).astype(np.float32)
    x = np.concatenate([a, mid, np.random.default_rng(0).standard_normal(10**5, np.float32)])
    x = x[np.abs(x) < 65504]
    got = at_bank_precision(torch.from_numpy(x), np.dtype("<f2")).numpy()
    assert np.array_equal(got, x.astype(np.float16).astype(np.float32))
    assert np.array_equal(at_bank_precision(torch.from_numpy(x), np.dtype("<f4")).numpy(), x)
    assert not np.array_equal(got, x)



def cache_with_a_failed_write_back(tmp_path: Path) -> ChunkCache:
    """A partial cache whose I/O thread holds the error of a write-back (disk full)."""
    store = create_store(tmp_path / "b.npy", N, D, chunk_rows=R, seed=1)

    def write_part(chunks: Mapping[int, np.ndarray]) -> None:
        raise OSError(28, "No space left on device")

    store.write_part = write_part  # type: ignore[method-assign]
    cache = ChunkCache(store, 3 * R, CPU, steps_per_epoch=100, pool_chunks=2)
    cache.update(rows_of(1), random_unit_rows(R, D))
    for o in (4, 6):
        cache.gather(rows_of(o))  # chunk 1 is evicted: its write-back fails in the thread
    io = cache.io
    assert io is not None
    with io.cond:
        io.cond.wait_for(lambda: io.inflight == 0)
    assert isinstance(io.error, OSError)
    return cache


def test_close_stops_the_io_thread_then_raises_its_error(tmp_path: Path) -> None:
    cache = cache_with_a_failed_write_back(tmp_path)
    io = cache.io
    assert io is not None
    with pytest.raises(OSError, match="No space left"):
        cache.close()
    assert not io.thread.is_alive() and cache.io is None
    cache.close()  # closed: nothing left to stop or raise
    cache.store.close()


def test_close_in_a_finally_keeps_the_exception_in_flight(tmp_path: Path) -> None:
    """The training loop's `finally` closes with raise_errors=False: the step's own exception
    reaches the user, not the I/O thread's stored one, and the thread is stopped."""
    cache = cache_with_a_failed_write_back(tmp_path)
    io = cache.io
    assert io is not None
    with pytest.raises(KeyboardInterrupt):
        try:
            raise KeyboardInterrupt
        finally:
            cache.close(raise_errors=False)
    assert not io.thread.is_alive() and cache.io is None
    cache.store.close()


def test_on_disk_bank_exits_with_the_exception_in_flight(tmp_path: Path) -> None:
    from oocid.api import OnDiskBank

    cache = cache_with_a_failed_write_back(tmp_path)
    bank = OnDiskBank(cache.store, 3 * R, CPU)  # the same failing store, a fresh cache
    cache.close(raise_errors=False)
    bank.update(rows_of(2), random_unit_rows(R, D))
    io = bank.io
    assert io is not None
    with pytest.raises(ValueError, match="in the with block"), bank:
        for o in (4, 6):
            bank.gather(rows_of(o))
        with io.cond:
            io.cond.wait_for(lambda: io.inflight == 0)
        raise ValueError("in the with block")
    assert not io.thread.is_alive()
    assert bank.store._rows.fd is None  # type: ignore[union-attr]  # the store closed too
