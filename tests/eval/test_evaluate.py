"""The kNN of validation queries streamed batch by batch against bank chunks (`knn_streamed`):
the same accuracies as scoring all the queries at once, in memory bounded by a block of queries
and its top-k, whatever the number of queries."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import oocid.eval.evaluate as ev
from oocid.errors import DataError
from oocid.eval.evaluate import knn_against, knn_streamed
from oocid.method.knn import knn_scores_from_topk, topk_accuracy, topk_streaming

D, C, K, T = 16, 12, 20, 0.07


def clustered(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """n unit rows around C class centres (a kNN neither perfect nor at chance), labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(C, D, generator=torch.Generator()
                                                        .manual_seed(0)), dim=1)
    labels = torch.randint(0, C, (n,), generator=g)
    rows = centres[labels] + 2.0 * torch.randn(n, D, generator=g) / D ** 0.5
    return torch.nn.functional.normalize(rows, dim=1), labels


BANK, BANK_LABELS = clustered(3000, 1)


def bank_chunks(rows: int = 500) -> list[tuple[int, Tensor]]:
    return [(a, BANK[a:a + rows].clone()) for a in range(0, BANK.shape[0], rows)]


def old_knn_against(queries: Tensor, labels: Tensor, query_chunk: int) -> dict[str, float]:
    """The evaluation as it was before streaming: the whole (Q, k) top-k, then the accuracy."""
    all_s, all_i = [], []
    for q in queries.split(query_chunk):
        s, i = topk_streaming(q, iter(bank_chunks()), K)
        all_s.append(s)
        all_i.append(i)
    sims, nb = torch.cat(all_s), torch.cat(all_i)
    scores = knn_scores_from_topk(sims, BANK_LABELS[nb], K, T, C)
    acc = topk_accuracy(scores, labels, (1, 5))
    return {"top1": acc[1], "top5": acc[5]}


def batches_of(queries: Tensor, labels: Tensor, sizes: list[int]) -> Iterator[tuple[Tensor, Tensor]]:
    a, i = 0, 0
    while a < queries.shape[0]:
        b = min(a + sizes[i % len(sizes)], queries.shape[0])
        yield queries[a:b].clone(), labels[a:b].clone()
        a, i = b, i + 1


@pytest.mark.parametrize("sizes", [[512], [7, 300, 64], [2000]])
def test_streamed_equals_all_at_once(sizes: list[int]) -> None:
    queries, labels = clustered(1100, 2)
    want = old_knn_against(queries, labels, 256)
    assert 0.3 < want["top1"] < 0.95 and want["top1"] < want["top5"]  # a real test of ranking
    got = knn_streamed(batches_of(queries, labels, sizes), lambda: iter(bank_chunks()),
                       BANK_LABELS, K, T, C, query_chunk=256)
    assert got == want  # exactly: the same blocks of queries, the same float32 rounding
    assert knn_against(queries, labels, lambda: iter(bank_chunks()), BANK_LABELS, K, T, C,
                       query_chunk=256) == want


def test_no_queries_and_unlabeled_bank_are_data_errors() -> None:
    with pytest.raises(DataError, match="no samples to score"):
        knn_streamed(iter([]), lambda: iter(bank_chunks()), BANK_LABELS, K, T, C)
    q, y = clustered(10, 3)
    unlabeled = torch.full_like(BANK_LABELS, -1)
    with pytest.raises(DataError, match="unlabeled"):
        knn_streamed(iter([(q, y)]), lambda: iter(bank_chunks()), unlabeled, K, T, C)


def test_queries_held_are_bounded_by_a_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation of 5,000 queries in batches of 96, blocks of 256: each pass over the bank
    scores at most a block, and starts once at most a block and a batch have been read."""
    queries, labels = clustered(5000, 4)
    produced, scored, blocks = [0], [0], []

    def source() -> Iterator[tuple[Tensor, Tensor]]:
        for q, y in batches_of(queries, labels, [96]):
            produced[0] += q.shape[0]
            yield q, y

    def spy(q: Tensor, chunks: Any, k: int, **kw: Any) -> tuple[Tensor, Tensor]:
        blocks.append((q.shape[0], produced[0] - scored[0]))  # (rows scored, rows held)
        scored[0] += q.shape[0]
        return topk_streaming(q, chunks, k, **kw)

    monkeypatch.setattr(ev, "topk_streaming", spy)
    knn_streamed(source(), lambda: iter(bank_chunks()), BANK_LABELS, K, T, C, query_chunk=256)
    assert scored[0] == produced[0] == 5000
    assert len(blocks) == -(-5000 // 256)
    assert max(r for r, _ in blocks) == 256
    assert max(h for _, h in blocks) <= 256 + 96


class LargestStorage(TorchDispatchMode):
    """The largest storage any tensor op returns while active (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                self.peak = max(self.peak, t.untyped_storage().nbytes())
        return out


def test_validation_memory_bounded() -> None:
    """The largest tensor made while scoring does not grow with the number of queries: 800
    and 4,800 queries (batches made on the fly; 1,000 bank rows in chunks of one block) peak
    alike (the (256, 250) score buffer), under the 4,800 queries' features or their top-k."""
    peaks = {}
    for n in (800, 4800):
        chunks = bank_chunks(250)[:4]

        def source(n: int = n) -> Iterator[tuple[Tensor, Tensor]]:
            g = torch.Generator().manual_seed(n)
            for _ in range(0, n, 100):
                q = torch.nn.functional.normalize(torch.randn(100, D, generator=g), dim=1)
                yield q, torch.randint(0, C, (100,), generator=g)

        with LargestStorage() as mode:
            knn_streamed(source(), lambda chunks=chunks: iter(chunks), BANK_LABELS, K, T, C,
                         query_chunk=256, block_rows=250)
        peaks[n] = mode.peak
    assert peaks[800] == peaks[4800] == 256 * 250 * 4, peaks
    assert peaks[4800] < min(4800 * D * 4, 4800 * K * 8), peaks
