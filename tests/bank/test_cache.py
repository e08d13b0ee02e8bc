"""The device cache over the on-disk store: equivalence with the in-core bank, a stateful
model check, uniform negatives over an epoch, and the memory budget."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import oocid.bank.cache as cache_mod
from oocid.bank.cache import ChunkCache
from oocid.bank.create import create_store
from oocid.bank.incore import InCoreBank
from oocid.bank.sizing import cache_rows
from oocid.bank.slots import at_bank_precision
from oocid.bank.store import open_store
from oocid.config import demo_config
from oocid.data.batch import Batch
from oocid.errors import InputError
from oocid.method.fast import dense_scores_apply
from oocid.method.npid import NPIDStep, momentum_update, random_unit_rows
from oocid.method.zest import ZEstimator
from oocid.models import build_model
from oocid.train.setup import build_optimizer

CPU = torch.device("cpu")


def score_whole(shape: tuple[int, ...]) -> Callable[[int], bool] | None:
    """The rule the training step passes to `draw`: per-sample negatives scored as a whole table."""
    if len(shape) != 2:
        return None
    return lambda t: dense_scores_apply(shape[0], shape[1], t)


@pytest.mark.parametrize(("negatives", "dtype"), [("per-sample", "float32"), ("shared", "float32"),
                                                  ("per-sample", "float16")])
def test_full_budget_equals_in_core_bit_for_bit(tmp_path: Path, negatives: str, dtype: str
                                                ) -> None:
    """Same seed, same batches: identical losses, weights and final bank, on CPU (a float16
    bank's rows rounded alike in both)."""
    n, steps = 300, 12
    results = []
    for name, make in (("incore", lambda s: InCoreBank(s, CPU)),
                       ("cache", lambda s: ChunkCache(s, n, CPU, steps_per_epoch=5))):
        store = create_store(tmp_path / f"{name}.npy", n, 128, chunk_rows=64, seed=3, dtype=dtype)
        bank = make(store)
        cfg = demo_config()
        cfg.loss.kind, cfg.loss.nce_k, cfg.loss.z, cfg.loss.negatives = "nce", 32, "ema", negatives
        torch.manual_seed(0)
        model = build_model("small", 1, 128)
        step = NPIDStep(cfg, model, build_optimizer(cfg, model), bank, n, ZEstimator("ema"), 7)
        g = torch.Generator().manual_seed(1)
        losses = []
        for i in range(steps):
            idx = torch.randperm(n, generator=g)[:24]
            x = torch.randn(24, 1, 28, 28, generator=g)
            losses.append(step(Batch(x, idx, idx * 0), i, 0.03).loss)
        bank.commit(steps)
        rows = store.read_rows(0, n)
        assert np.array_equal(bank.all_rows().numpy(), rows)  # it holds what it committed
        if isinstance(bank, ChunkCache):
            bank.close()
        results.append((losses, model.state_dict(), rows))
        store.close()
    (la, ma, ba), (lb, mb, bb) = results
    assert la == lb
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert np.array_equal(ba, bb)


class CacheMachine(RuleBasedStateMachine):
    """Drive cache + store through gathers, updates, window moves, evictions, flushes and
    reopens; every read must equal a plain in-memory model of the bank."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="oocid-cache-"))
        self.count = 0
        # durability against power loss is tested in test_store; skip fsync here for speed
        self._fsync = os.fsync, getattr(os, "fdatasync", os.fsync)
        os.fsync = os.fdatasync = lambda fd: None  # type: ignore[assignment]
        self._touch_max = cache_mod.TOUCH_MAX

    @initialize(n=st.integers(20, 90), r=st.integers(3, 10), slots=st.integers(3, 8),
                kind=st.sampled_from(["npy", "zarr"]), prefetch=st.booleans(),
                touch_max=st.sampled_from([8, cache_mod.TOUCH_MAX]),
                dtype=st.sampled_from(["float32", "float16"]))
    def setup(self, n: int, r: int, slots: int, kind: str, prefetch: bool, touch_max: int,
              dtype: str) -> None:
        cache_mod.TOUCH_MAX = touch_max  # 8: larger gathers take the one-lookup path
        self.path = self.dir / f"b{self.count}.{kind}"
        self.count += 1
        self.store = create_store(self.path, n, 4, chunk_rows=r, seed=1, dtype=dtype)
        self.model = self.store.read_rows(0, n).copy()
        self.n, self.r, self.budget, self.prefetch = n, r, slots * r, prefetch
        self.cache = self._open()
        self.gen = torch.Generator().manual_seed(0)

    def _open(self) -> ChunkCache:
        return ChunkCache(self.store, self.budget, CPU, steps_per_epoch=7, pool_chunks=2,
                          prefetch=self.prefetch)

    def _batch(self, data: st.DataObject) -> torch.Tensor:
        # positives from 1-4 chunks: up to twice the pool's 2 chunks
        cs = data.draw(st.sets(st.integers(0, self.store.n_chunks - 1), min_size=1, max_size=4))
        rows = [i for c in cs for i in range(*self.store.chunk_range(c))]
        picks = data.draw(st.lists(st.sampled_from(rows), min_size=1, max_size=20, unique=True))
        return torch.tensor(picks, dtype=torch.int64)

    @rule(data=st.data())
    def gather(self, data: st.DataObject) -> None:
        idx = self._batch(data)
        got = self.cache.gather(idx).numpy()
        assert np.array_equal(got, self.model[idx.numpy()])

    @rule(data=st.data(), m=st.floats(0.0, 0.9),
          which=st.sampled_from(["same", "copy", "other", "reversed in place"]),
          between=st.lists(st.sampled_from(["evict", "window"]), max_size=3))
    def update(self, data: st.DataObject, m: float, which: str, between: list[str]) -> None:
        # as NPIDStep: gather, then update the same index tensor (the cache reuses the rows'
        # positions unless a chunk moved in between: evictions, window moves) -- or a copy of
        # it, or rows it did not gather, or the same tensor rewritten through a numpy alias
        idx = self._batch(data)
        old = self.cache.gather(idx)
        if which == "other":
            idx = self._batch(data)
            old = torch.from_numpy(self.model[idx.numpy()])
        elif which == "reversed in place":  # torch's version counter does not see this write
            idx.numpy()[:] = idx.numpy()[::-1].copy()
            old = old.flip(0)
        new = momentum_update(old, random_unit_rows(len(idx), 4, self.gen), m)
        for what in between:
            if what == "evict" and not self.cache.full and self.cache.pool:
                self.cache._evict_one()
            elif what == "window":
                self.cache.end_step()
        self.cache.update(idx.clone() if which == "copy" else idx, new)
        # a float16 bank's rows as the store keeps them, wherever they are read from
        self.model[idx.numpy()] = at_bank_precision(new, self.store.dtype).numpy()
        self.cache.end_step()

    @rule(k=st.integers(1, 40), per_sample=st.booleans())
    def negatives(self, k: int, per_sample: bool) -> None:
        shape = (3, k) if per_sample else (k,)
        state = self.gen.get_state()
        idx = self.cache.sample(shape, self.gen)
        window_rows = {i for c in self.cache.window for i in range(*self.store.chunk_range(c))}
        if not self.cache.full:
            assert set(idx.flatten().tolist()) <= window_rows
        assert np.array_equal(self.cache.gather(idx).numpy(), self.model[idx.numpy()])
        self.gen.set_state(state)  # draw: the same negatives, as (table, positions)
        table, at = self.cache.draw(shape, self.gen, score_whole(shape))
        assert at.shape == shape
        assert np.array_equal(table[at].numpy(), self.model[idx.numpy()])

    @rule()
    def end_step(self) -> None:
        self.cache.end_step()

    @precondition(lambda self: not self.cache.full and len(self.cache.pool) > 0)  # type: ignore[misc]
    @rule()
    def evict(self) -> None:
        self.cache._evict_one()

    @rule(step=st.integers(0, 100))
    def flush(self, step: int) -> None:
        self.cache.flush(step)
        assert self.store.meta.committed_step == step
        assert np.array_equal(self.store.read_rows(0, self.n), self.model)

    @rule()
    def close_and_reopen(self) -> None:
        self.cache.flush(1)
        self.cache.close()
        self.store.close()
        self.store = open_store(self.path)
        assert np.array_equal(self.store.read_rows(0, self.n), self.model)
        self.cache = self._open()

    @invariant()
    def within_budget(self) -> None:
        if hasattr(self, "cache"):
            assert self.cache.resident_rows() <= max(self.budget, self.store.n_chunks * self.r)
            assert self.cache.peak_resident_rows <= self.cache.n_slots * self.r

    def teardown(self) -> None:
        if hasattr(self, "cache"):
            self.cache.close()
            self.store.close()
        os.fsync, os.fdatasync = self._fsync
        cache_mod.TOUCH_MAX = self._touch_max
        shutil.rmtree(self.dir, ignore_errors=True)


CacheMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)
test_cache_state_machine = CacheMachine.TestCase


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """Upper quantile of chi-square (Wilson-Hilferty), z = 3.09 -> p = 0.001."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def test_negatives_uniform_over_an_epoch_with_small_cache(tmp_path: Path) -> None:
    n_chunks, r, steps, k = 40, 16, 200, 64
    store = create_store(tmp_path / "b.npy", n_chunks * r, 4, chunk_rows=r)
    cache = ChunkCache(store, 6 * r, CPU, steps_per_epoch=steps, pool_chunks=2)
    assert not cache.full and cache.w == 4
    g = torch.Generator().manual_seed(0)
    counts = np.zeros(n_chunks * r)
    for _ in range(steps):
        np.add.at(counts, cache.sample((k,), g).numpy(), 1)
        cache.end_step()
    # each chunk spent the same number of steps in the window ...
    per_chunk = counts.reshape(n_chunks, r).sum(1)
    expected = steps * k / n_chunks
    stat = float(((per_chunk - expected) ** 2 / expected).sum())
    assert stat < chi2_critical(n_chunks - 1), per_chunk
    # ... and rows are uniform overall
    e_row = steps * k / counts.size
    stat_rows = float(((counts - e_row) ** 2 / e_row).sum())
    assert stat_rows < chi2_critical(counts.size - 1)
    # disk reads over the epoch: the bank once (window) plus the initial fill, not steps x K
    assert cache.chunk_loads <= n_chunks + cache.w
    cache.close()
    store.close()


def test_window_only_sampling_is_needed(tmp_path: Path) -> None:
    """Sanity of the test above: sampling only the first chunks is caught by the same check."""
    n_chunks = 40
    counts = np.zeros(n_chunks)
    counts[:4] = 200 * 64 / 4
    expected = 200 * 64 / n_chunks
    assert float(((counts - expected) ** 2 / expected).sum()) > chi2_critical(n_chunks - 1)


@pytest.mark.parametrize(("shape", "cap", "copied"), [
    ((3, 8), None, True),  # 150 window rows <= 32 * 8: the loss scores the table whole
    ((3, 1), None, False),  # 150 > 32 * 1: the loss gathers the drawn rows
    ((3, 8), 100, False),  # the window is over the copy's size cap
    ((8,), None, False)])  # shared negatives: a (K, D) gather
def test_draw_copies_the_window_only_for_a_dense_per_sample_loss(
        tmp_path: Path, shape: tuple[int, ...], cap: int | None, copied: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    if cap is not None:
        monkeypatch.setattr(cache_mod, "WINDOW_COPY_MAX_BYTES", cap)
    store = create_store(tmp_path / "b.npy", 400, 4, chunk_rows=10, seed=1)
    cache = ChunkCache(store, 20 * 10, CPU, steps_per_epoch=4, pool_chunks=5, prefetch=False)
    assert cache.w * cache.r == 150
    g = torch.Generator().manual_seed(0)
    idx = cache.sample(shape, g)
    g.manual_seed(0)
    table, at = cache.draw(shape, g, score_whole(shape))
    assert (table.data_ptr() != cache.flat.data_ptr()) == copied
    if copied:
        assert table.shape == (150, 4)
    assert np.array_equal(table[at].numpy(), store.read_rows(0, 400)[idx.numpy()])
    cache.close()
    store.close()


def test_update_after_gather_reuses_the_rows_positions(tmp_path: Path) -> None:
    """NPIDStep gathers a batch's positives, then updates them: the update reuses the
    positions the gather found while nothing has moved (also under inference_mode, whose
    tensors have no version counter), and locates them afresh once a chunk has moved."""
    store = create_store(tmp_path / "b.npy", 64, 4, chunk_rows=8, seed=1)
    cache = ChunkCache(store, 5 * 8, CPU, steps_per_epoch=4, pool_chunks=2, prefetch=False)
    located: list[int] = []
    real = cache._chunk_groups
    cache._chunk_groups = lambda i: located.append(1) or real(i)  # type: ignore[method-assign]
    with torch.inference_mode():
        idx = torch.tensor([50, 41, 55])  # chunks 6 and 5: outside the first window
        rows = cache.gather(idx)
        cache.update(idx, rows * 0 + 0.5)
        assert len(located) == 1
        cache.update(idx.clone(), rows)  # equal indices, nothing moved: reused
        assert len(located) == 1
        cache._evict_one()  # a chunk moved: found afresh
        cache.update(idx, rows)
        assert len(located) == 2
        assert np.array_equal(cache.gather(idx).numpy(), store.read_rows(0, 64)[[50, 41, 55]])
    cache.close()
    store.close()


def test_budget_is_respected_and_too_small_budget_is_an_error(tmp_path: Path) -> None:
    store = create_store(tmp_path / "b.zarr", 1000, 8, chunk_rows=50)
    with pytest.raises(InputError, match=r"needs 3 chunks of 50 rows, 150 rows \(--cache-mb "
                                         r"0\.005 or more\)"):  # 150 x 8 x 4 B = 0.0046 MB
        ChunkCache(store, 120, CPU)
    assert cache_rows(0.005, 1000, 8, CPU) >= 150  # the figure said is enough
    with create_store(tmp_path / "small.zarr", 180, 8, chunk_rows=4096) as small:
        with pytest.raises(InputError, match=r"needs the whole bank, 180 rows"):
            ChunkCache(small, 20, CPU)  # one chunk, of 180 rows: not "3 chunks of 4096"
    cache = ChunkCache(store, 250, CPU, steps_per_epoch=10, pool_chunks=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        c = int(torch.randint(0, 20, (1,), generator=g))
        idx = torch.arange(c * 50, c * 50 + 10)
        cache.update(idx, momentum_update(cache.gather(idx), random_unit_rows(10, 8, g), 0.5))
        cache.gather(cache.sample((100,), g))
        cache.end_step()
        assert cache.resident_rows() <= 250
    assert cache.peak_resident_rows <= 250
    assert cache.writebacks > 0
    cache.flush(5)
    cache.close()
    rows = store.read_rows(0, 1000)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    store.close()


def test_per_sample_negatives_through_a_fresh_partial_cache_have_finite_gradients(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """losses.negative_scores scores every row of the cache's table, loaded or not, and the
    gradient multiplies each by zero where it was not drawn: slots never loaded must hold
    finite numbers. (Uninitialised slots over reused heap memory made every step of a resumed
    run non-finite in tests/train/test_kill.py; here uninitialised memory is made NaN on purpose.)"""
    from oocid.method.fast import negative_scores

    n_chunks, r = 40, 16
    store = create_store(tmp_path / "b.npy", n_chunks * r, 8, chunk_rows=r)
    real_empty, real_tempty = np.empty, torch.empty

    def nan_empty(*a: Any, **k: Any) -> Any:
        out = real_empty(*a, **k)
        if out.dtype.kind == "f":
            out.fill(np.nan)
        return out

    def nan_tempty(*a: Any, **k: Any) -> Any:
        out = real_tempty(*a, **k)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    with monkeypatch.context() as mp:  # what "uninitialised" may hold: NaN
        mp.setattr(np, "empty", nan_empty)
        mp.setattr(torch, "empty", nan_tempty)
        cache = ChunkCache(store, 20 * r, CPU, steps_per_epoch=50, pool_chunks=2)
    assert not cache.full and len(cache.free) > 0  # some slots never loaded
    g = torch.Generator().manual_seed(0)
    table, pos = cache.draw((4, 64), g, score_whole((4, 64)))
    assert bool(torch.isfinite(table).all())
    x = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1).requires_grad_()
    negative_scores(x, table, pos).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    cache.close()
    store.close()


@pytest.mark.parametrize(("bank_kind", "loss", "negatives"), [
    ("incore", "infonce", "shared"), ("incore", "softmax", "per-sample"),
    ("partial", "nce", "per-sample"), ("partial", "infonce", "shared")])
def test_step_updates_each_row_from_its_value_before_the_step(tmp_path: Path, bank_kind: str,
                                                              loss: str, negatives: str) -> None:
    """With two micro-batches per step, every row of the step's batch becomes
    momentum_update(row before the step, its feature, m): the loss's gathered positives reused
    for the update are the right rows, of the right micro-batch."""
    n, r, m = 96, 16, 0.5
    store = create_store(tmp_path / "b.npy", n, 128, chunk_rows=r, seed=3)
    bank: Any = InCoreBank(store, CPU) if bank_kind == "incore" else ChunkCache(
        store, 4 * r, CPU, steps_per_epoch=6, pool_chunks=2)
    cfg = demo_config()
    cfg.loss.kind, cfg.loss.nce_k, cfg.loss.z, cfg.loss.negatives = loss, 16, "ema", negatives
    cfg.bank.momentum, cfg.optim.accumulate = m, 2
    torch.manual_seed(0)
    model = build_model("small", 1, 128)
    step = NPIDStep(cfg, model, build_optimizer(cfg, model), bank, n,
                    ZEstimator("ema") if loss == "nce" else None, 7)
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        idx = torch.randperm(n, generator=g)[:16]
        if bank_kind == "partial":  # positives from two chunks, as a stream's batch would be
            idx = torch.cat([torch.randperm(r, generator=g)[:8] + r * (i % 6),
                             torch.randperm(r, generator=g)[:8] + r * ((i + 3) % 6)])
        micro = [Batch(torch.randn(8, 1, 28, 28, generator=g), part, part * 0) for part in idx.split(8)]
        before = bank.gather(idx).clone()
        with torch.no_grad():  # the features the step will compute (train mode, same weights)
            feats = torch.cat([model(b.images.contiguous(memory_format=torch.channels_last))
                               for b in micro])
        assert not step(micro, i, 0.03).skipped
        torch.testing.assert_close(bank.gather(idx), momentum_update(before, feats, m),
                                   atol=1e-5, rtol=0)
    if isinstance(bank, ChunkCache):
        bank.close()
    store.close()
