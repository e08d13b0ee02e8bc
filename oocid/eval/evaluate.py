"""kNN evaluation: features of labeled validation shards scored against the memory bank.

Feature extraction is kept apart from scoring (as DINO's eval does); the bank is streamed
from the store chunk by chunk with a running top-k merge, so it never has to fit in memory,
and the queries can come batch by batch (`knn_streamed`), so neither do they.
Q queries, N bank rows, D dims, C classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from oocid.bank.store import BankStore
from oocid.data.manifest import Manifest
from oocid.data.reader import iter_samples
from oocid.errors import DataError
from oocid.method.knn import (
    BLOCK_ROWS,
    knn_scores_from_topk,
    topk_accuracy,
    topk_hits,
    topk_streaming,
)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(C, C) int64 counts of (true class, predicted class); pred, target (Q,) int64."""
    c = num_classes
    flat = target.long().cpu() * c + pred.long().cpu()
    return torch.bincount(flat, minlength=c * c).view(c, c)


def per_class_top1(confusion: Tensor) -> list[float | None]:
    """Top-1 accuracy of each true class (None for a class with no queries)."""
    n = confusion.sum(dim=1).tolist()
    diag = confusion.diagonal().tolist()
    return [None if n[c] == 0 else diag[c] / n[c] for c in range(len(n))]


def knn_report(sims: Tensor, neighbour_labels: Tensor, query_labels: Tensor, k: int,
               temperature: float, classes: Sequence[str],
               evaluated: Sequence[int] | None = None) -> dict[str, Any]:
    """top-1 (and top-5 with more than 5 classes: with 5 or fewer it is always 1), per-class
    top-1 and confusion matrix at k' = min(k, N), from the sorted top-k (sims,
    neighbour_labels (Q, >=k')). The confusion matrix is over every (training) class; the
    per-class list holds the `evaluated` ones (the validation set's; default all)."""
    c = len(classes)
    used = min(k, sims.shape[1])
    scores = knn_scores_from_topk(sims, neighbour_labels, used, temperature, c)
    acc = topk_accuracy(scores, query_labels, (1, 5))
    pred = scores.argsort(dim=1, descending=True, stable=True)[:, 0]  # as topk_accuracy ranks
    conf = confusion_matrix(pred, query_labels, c)
    n = conf.sum(dim=1).tolist()
    top1 = per_class_top1(conf)
    per = [{"class": classes[i], "n": int(n[i]), "top1": top1[i]}
           for i in (range(c) if evaluated is None else sorted(set(evaluated)))]
    top5 = {"top5": acc[5]} if c > 5 else {}
    return {"top1": acc[1], **top5, "k": used, "per_class": per, "confusion": conf.tolist()}


def read_labels(manifest: Manifest) -> np.ndarray:
    """(N,) int64 labels of a shard set, -1 where unknown: `labels.npy` beside the manifest when
    the shard writer left one, else read from the shards' members (no decoding)."""
    side = manifest.root / "labels.npy"
    if side.is_file():
        labels = np.load(side)
        if labels.shape != (manifest.n,):
            raise DataError(f"{side}: has {labels.shape} labels, manifest says {manifest.n}")
        return np.asarray(labels, dtype=np.int64)
    labels = np.full(manifest.n, -1, dtype=np.int64)
    for path in manifest.shard_paths():
        for s in iter_samples(path):
            if s.label is not None and 0 <= s.index < manifest.n:
                labels[s.index] = s.label
    return labels


def store_chunks(store: BankStore, device: torch.device) -> Iterator[tuple[int, Tensor]]:
    for c, rows in store.iter_chunks():
        yield store.chunk_range(c)[0], torch.from_numpy(rows).to(device)


def tensor_chunks(rows: Tensor, chunk: int = 65536) -> Iterator[tuple[int, Tensor]]:
    for start in range(0, rows.shape[0], chunk):
        yield start, rows[start:start + chunk]


def knn_evaluate(queries: Tensor, query_labels: Tensor, sims: Tensor, neighbours: Tensor,
                 bank_labels: Tensor, ks: tuple[int, ...], temperature: float, num_classes: int
                 ) -> dict[str, float]:
    """top-1/top-5 for each k from one top-k at max(ks)."""
    out: dict[str, float] = {}
    nl = bank_labels.to(neighbours.device)[neighbours]  # (Q, kmax)
    if (nl < 0).any():
        raise DataError("the bank's shards have unlabeled samples; kNN accuracy needs labels")
    for k in ks:
        scores = knn_scores_from_topk(sims, nl, min(k, sims.shape[1]), temperature, num_classes)
        acc = topk_accuracy(scores, query_labels, (1, 5))
        suffix = "" if k == max(ks) else f"_k{k}"
        out[f"top1{suffix}"] = acc[1]
        out[f"top5{suffix}"] = acc[5]
    return out


QUERY_CHUNK = 4096  # queries scored per pass over the bank


def knn_against(queries: Tensor, query_labels: Tensor,
                chunks: Callable[[], Iterator[tuple[int, Tensor]]], bank_labels: Tensor, k: int,
                temperature: float, num_classes: int, query_chunk: int = QUERY_CHUNK
                ) -> dict[str, float]:
    """Weighted kNN accuracy of queries against bank chunks; `chunks()` starts a fresh pass
    over the bank for each block of `query_chunk` queries (memory: one chunk + top-k)."""
    return knn_streamed(iter([(queries, query_labels)]), chunks, bank_labels, k, temperature,
                        num_classes, query_chunk)


LabelledTopk = Callable[[Tensor, Iterator[tuple[int, Tensor]]], tuple[Tensor, Tensor]]


def knn_streamed(batches: Iterator[tuple[Tensor, Tensor]],
                 chunks: Callable[[], Iterator[tuple[int, Tensor]]], bank_labels: Tensor, k: int,
                 temperature: float, num_classes: int, query_chunk: int = QUERY_CHUNK,
                 block_rows: int = BLOCK_ROWS, topk: LabelledTopk | None = None
                 ) -> dict[str, float]:
    """Weighted kNN top-1/top-5 of query batches (features (b, D), labels (b,)) against bank
    chunks, never holding the whole query set: the batches are taken as they come, cut into
    blocks of `query_chunk` queries, and each block is scored by one pass over the bank
    (`chunks()` starts one) keeping only its running top-k, then counted and dropped.

    Memory: a block of queries and its (query_chunk, k) top-k, with `topk_streaming`'s block of
    `block_rows` bank rows and score buffer, whatever the number of queries. The blocks are those
    `knn_against` cut from all the queries at once, so the accuracies are the same. `topk`
    (queries, chunks) -> (similarities, neighbours' labels) replaces the top-k over `chunks`
    (several processes: `oocid.distributed.merge.topk_across`)."""
    counts = _HitCounts(bank_labels, k, temperature, num_classes, block_rows, topk)
    for q, y in blocks_of(batches, query_chunk):
        counts.add(q, y, chunks)
    if not counts.n:
        raise DataError("no samples to score")
    return counts.accuracy()


def blocks_of(batches: Iterator[tuple[Tensor, Tensor]], rows: int
              ) -> Iterator[tuple[Tensor, Tensor]]:
    """(x (b, ...), y (b,)) batches regrouped into blocks of `rows` (the last one shorter)."""
    held: list[tuple[Tensor, Tensor]] = []
    n = 0
    for x, y in batches:
        held.append((x, y))
        n += x.shape[0]
        while n >= rows:
            q, lab = _joined(held)
            yield q[:rows], lab[:rows]
            held, n = [(q[rows:], lab[rows:])], n - rows
    if n:
        yield _joined(held)


def _joined(held: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    if len(held) == 1:  # one batch (or what is left of one): its rows as they are
        return held[0]
    return torch.cat([f for f, _ in held]), torch.cat([lab for _, lab in held])


class _HitCounts:
    """Queries scored so far, and how many had their class among the top 1 and top 5."""

    def __init__(self, bank_labels: Tensor, k: int, temperature: float, num_classes: int,
                 block_rows: int, topk: LabelledTopk | None = None) -> None:
        self.bank_labels, self.k, self.t, self.c = bank_labels, k, temperature, num_classes
        self.block_rows, self.topk = block_rows, topk
        self.n, self.hits = 0, {1: 0, 5: 0}

    def add(self, q: Tensor, y: Tensor, chunks: Callable[[], Iterator[tuple[int, Tensor]]]
            ) -> None:
        if self.topk is not None:
            sims, nl = self.topk(q, chunks())
        else:
            sims, neighbours = topk_streaming(q, chunks(), self.k, block_rows=self.block_rows)
            if self.bank_labels.device != neighbours.device:  # moved once, not once a block
                self.bank_labels = self.bank_labels.to(neighbours.device)
            nl = self.bank_labels[neighbours]  # (q, k')
        if (nl < 0).any():
            raise DataError("the bank's shards have unlabeled samples; kNN accuracy needs labels")
        scores = knn_scores_from_topk(sims, nl, min(self.k, sims.shape[1]), self.t, self.c)
        for top, hit in topk_hits(scores, y, (1, 5)).items():
            self.hits[top] += hit
        self.n += q.shape[0]

    def accuracy(self) -> dict[str, float]:
        """{"top1", "top5"}: each count / n rounded to float32, as a float32 mean of 0/1 hits."""
        return {f"top{top}": float(torch.tensor(float(h), dtype=torch.float32).div(self.n))
                for top, h in self.hits.items()}


def num_classes_of(manifest: Manifest, labels: np.ndarray) -> int:
    if manifest.classes:
        return len(manifest.classes)
    return int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0

