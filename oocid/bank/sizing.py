"""How big the device cache of bank chunks is, how many of its chunks hold the positives, and
its slot memory (`oocid.bank.cache.ChunkCache`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def cache_rows(cache_mb: float, n_rows: int, dim: int, device: torch.device,
               sharers: int = 1) -> int:
    """Rows the device cache may hold: `cache_mb` MB of float32 rows, or (0) the default."""
    if cache_mb > 0:
        return int(cache_mb * 2**20) // (dim * 4)
    return default_cache_rows(n_rows, dim, device, sharers)


def default_cache_rows(n_rows: int, dim: int, device: torch.device, sharers: int = 1) -> int:
    """The whole bank when it fits in a quarter of free device memory, else that quarter; on
    the CPU, host memory is shared by `sharers` processes of one machine (one quarter among
    them)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = _available_ram() // max(1, sharers)
    quarter = max(1, free // 4 // (dim * 4))
    return int(min(n_rows, quarter))


WINDOW_K_TIMES = 4  # the window of negatives is sized for this many times K rows


def window_target_rows(k: int, n_rows: int) -> int:
    """Rows the window of negatives of a partial cache should hold for K negatives a step:
    WINDOW_K_TIMES x K, so that a step's K draws are mostly distinct rows from a set much larger
    than K; on a bank under 2 x WINDOW_K_TIMES x K rows, half the bank (but at least K), since
    the window of a partial cache shares the budget with the pool and can never be the whole
    bank (the demo's 10,000 rows with K 4,096: 5,000)."""
    return min(WINDOW_K_TIMES * k, max(k, n_rows // 2))


def positives_pool(budget_rows: int, chunk_rows: int, workers: int, shuffle_buffer: int,
                   in_memory_batch: int = 0) -> tuple[int, int]:
    """(wanted, least) pool chunks for the positives of the data order.

    Streamed: each data worker's reservoir shuffle buffer keeps stragglers from ~5 shards back,
    so every worker wants room for its buffer's chunks plus 5 and the pool at least a quarter
    of the slots (fewer makes the positives' chunks thrash: docs/benchmarks.md, "Bank work per
    step"); the least is one worker's share, the chunks one batch can span. In memory
    (`in_memory_batch` = B > 0), a chunk-local batch spans at most two groups of
    ceil(B / R) chunks, plus one for a short group (`oocid.data.memory.local_order`): both."""
    if in_memory_batch > 0:
        span = 2 * -(-in_memory_batch // chunk_rows) + 1
        return span, span
    per_worker = -(-shuffle_buffer // chunk_rows) + 5
    return max(budget_rows // chunk_rows // 4, max(1, workers) * per_worker), per_worker


def default_pool_chunks(budget_rows: int, chunk_rows: int, pool: tuple[int, int],
                        window_rows: int) -> int:
    """Pool chunks of a partial cache of `budget_rows` rows: the wanted size of `pool`
    (`positives_pool`), shrunk toward its least as far as the window needs to hold
    `window_rows` rows (`window_target_rows`). A batch whose positives span more chunks than
    the pool holds is gathered chunk by chunk (slower, never wrong), and a pool under the
    wanted size re-reads more chunks; a window of too few rows biases every step's negatives,
    so the window comes first."""
    wanted, least = pool
    window_chunks = -(-window_rows // chunk_rows)
    return max(min(least, wanted), min(wanted, budget_rows // chunk_rows - window_chunks))


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def zeroed_slots(n_slots: int, chunk_rows: int, dim: int, device: torch.device) -> Tensor:
    """The cache's (S, R, D) float32 slots on `device`, zeroed.

    Zeroed, not empty: the loss multiplies every slot's rows, loaded or not, by the gradient
    (zero where a row was not drawn), and 0 * NaN garbage would be NaN. On the CPU the memory
    comes from numpy, which asks for transparent huge pages (random gathers over a large bank
    miss the TLB far less, as a numpy-backed in-memory bank does), and is written once now:
    np.zeros maps pages lazily, and the first write into each huge page (zeroing, compaction)
    would otherwise land in a chunk load in the middle of training."""
    if device.type == "cpu":
        slots = torch.from_numpy(np.zeros((n_slots, chunk_rows, dim), np.float32))
        slots.fill_(0.0)
        return slots
    return torch.zeros(n_slots, chunk_rows, dim, dtype=torch.float32, device=device)
