"""How big the device cache of bank chunks is, how many of its chunks hold the positives, and
its slot memory (`oocid.bank.cache.ChunkCache`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def cache_rows(cache_mb: float, n_rows: int, dim: int, device: torch.device) -> int:
    """Rows the device cache may hold: `cache_mb` MB of float32 rows, or (0) the default."""
    if cache_mb > 0:
        return int(cache_mb * 2**20) // (dim * 4)
    return default_cache_rows(n_rows, dim, device)


def default_cache_rows(n_rows: int, dim: int, device: torch.device) -> int:
    """The whole bank when it fits in a quarter of free device memory, else that quarter."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = _available_ram()
    quarter = max(1, free // 4 // (dim * 4))
    return int(min(n_rows, quarter))


def default_pool_chunks(budget_rows: int, chunk_rows: int, workers: int, shuffle_buffer: int
                        ) -> int:
    """Pool chunks for the positives: each data worker's reservoir shuffle buffer keeps
    stragglers from ~5 shards back, so give every worker room for its buffer's chunks plus 5
    (fewer makes the positives' chunks thrash: docs/benchmarks.md, "Bank work per step")."""
    per_worker = -(-shuffle_buffer // chunk_rows) + 5
    return max(budget_rows // chunk_rows // 4, max(1, workers) * per_worker)


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
