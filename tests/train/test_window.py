"""The window of negatives of a partial cache: sized for 4 x K rows when the budget allows (the
pool for the positives gives way), one warning line when it cannot, none when the whole bank is
cached or at the demo's size (oocid.bank.sizing, oocid.train.setup.make_cache)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oocid.bank.cache import ChunkCache
from oocid.bank.create import create_store
from oocid.bank.sizing import default_pool_chunks, positives_pool, window_target_rows
from oocid.config import Config, demo_config
from oocid.train.setup import make_cache, window_warning

CPU = torch.device("cpu")


def streamed(k: int, workers: int = 3, buffer: int = 200) -> Config:
    cfg = Config()
    cfg.loss.kind, cfg.loss.nce_k = "infonce", k
    cfg.data.workers, cfg.data.shuffle_buffer = workers, buffer
    return cfg


def cache_for(tmp_path: Path, cfg: Config, n: int, r: int, budget_chunks: int,
              in_memory: bool = False) -> ChunkCache:
    store = create_store(tmp_path / "bank.npy", n, 4, chunk_rows=r)
    return make_cache(cfg, store, CPU, 100, budget_chunks * r, in_memory=in_memory)


def test_target_is_4k_or_half_a_small_bank_but_never_under_k() -> None:
    assert window_target_rows(4096, 1_281_167) == 4 * 4096
    assert window_target_rows(4096, 10_000) == 5000  # the demo's bank
    assert window_target_rows(4096, 6000) == 4096  # half would be under K
    assert window_target_rows(64, 20_000) == 256


def test_pool_gives_way_to_the_window_down_to_its_least() -> None:
    want = positives_pool(29 * 100, 100, 3, 200)
    assert want == (21, 7)  # 3 workers x (2 buffer chunks + 5); one worker's share
    assert default_pool_chunks(29 * 100, 100, want, 0) == 21  # no negatives: as wanted
    assert default_pool_chunks(29 * 100, 100, want, 1024) == 18  # 11 window chunks
    assert default_pool_chunks(60 * 100, 100, want, 1024) == 21  # room for both
    assert default_pool_chunks(12 * 100, 100, want, 1024) == 7  # never under the least
    assert positives_pool(8000, 1000, 0, 2048, in_memory_batch=256) == (3, 3)


def test_streamed_window_reaches_4k_when_the_budget_allows(tmp_path: Path) -> None:
    """29 of 60 chunks, 3 workers: the old pool of 21 chunks left a window of 800 rows for
    K 256 (under 4 K = 1024); the pool now shrinks to 18 for an 11-chunk window, and no warning."""
    cfg = streamed(256)
    cache = cache_for(tmp_path, cfg, 6000, 100, 29)
    try:
        assert not cache.full and cache.w * cache.r >= 4 * 256
        assert cache.n_slots - cache.w == 18
        assert window_warning(cfg, cache) is None
    finally:
        cache.close()


def test_warns_in_one_line_when_the_budget_cannot(tmp_path: Path) -> None:
    cfg = streamed(256)
    cache = cache_for(tmp_path, cfg, 6000, 100, 12)  # pool at its least (7): a 5-chunk window
    try:
        assert cache.w * cache.r == 500
        said = window_warning(cfg, cache)
        assert said == ("oocid: warning: the cache's window of negatives holds 500 rows, under "
                        "4 x loss.nce_k = 1024: a step's 256 negatives come from few of the "
                        "bank's rows (raise --cache-mb)")
    finally:
        cache.close()
    cfg.bank.pool_chunks = 10  # a pool set by hand is kept, and named in the advice
    (tmp_path / "b").mkdir()
    cache = cache_for(tmp_path / "b", cfg, 6000, 100, 12)
    try:
        said = window_warning(cfg, cache)
        assert said is not None and "\n" not in said
        assert "holds 200 rows, fewer than loss.nce_k = 256: negatives repeat" in said
        assert said.endswith("(lower bank.pool_chunks or raise --cache-mb)")
    finally:
        cache.close()


@pytest.mark.parametrize("budget_chunks", [8, 10])  # out of core (80 %); the whole bank
def test_no_warning_at_the_demo_size(tmp_path: Path, budget_chunks: int) -> None:
    """The demo's 10,000 rows in chunks of 1,000, in memory, K 4096: through 8 chunks the pool
    keeps the 3 chunks a batch can span and the window holds half the bank; whole, the window is
    the bank."""
    cfg = demo_config()
    cfg.loss.kind = "infonce"
    cache = cache_for(tmp_path, cfg, 10_000, 1000, budget_chunks, in_memory=True)
    try:
        assert cache.full == (budget_chunks == 10)
        assert cache.w * cache.r == (5000 if budget_chunks == 8 else 10_000)
        assert window_warning(cfg, cache) is None
    finally:
        cache.close()
