"""kNN evaluation: features of labeled validation shards scored against the memory bank.

Feature extraction is kept apart from scoring (as DINO's eval does); the bank is streamed
from the store chunk by chunk with a running top-k merge, so it never has to fit in memory.
Q queries, N bank rows, D dims, C classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from oocid.bank.store import BankStore
from oocid.data.manifest import Manifest
from oocid.data.reader import iter_samples
from oocid.errors import DataError
from oocid.method.knn import knn_scores_from_topk, topk_accuracy, topk_streaming


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


def knn_against(queries: Tensor, query_labels: Tensor,
                chunks: Callable[[], Iterator[tuple[int, Tensor]]], bank_labels: Tensor, k: int,
                temperature: float, num_classes: int, query_chunk: int = 4096
                ) -> dict[str, float]:
    """Weighted kNN accuracy of queries against bank chunks; `chunks()` starts a fresh pass
    over the bank for each block of `query_chunk` queries (memory: one chunk + top-k)."""
    all_s, all_i = [], []
    for q in queries.split(query_chunk):  # type: ignore[no-untyped-call]
        s, i = topk_streaming(q, chunks(), k)
        all_s.append(s)
        all_i.append(i)
    return knn_evaluate(queries, query_labels, torch.cat(all_s), torch.cat(all_i), bank_labels,
                        (k,), temperature, num_classes)


def num_classes_of(manifest: Manifest, labels: np.ndarray) -> int:
    if manifest.classes:
        return len(manifest.classes)
    return int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0


def check_same_classes(train: Manifest, val: Manifest, val_path: Path) -> None:
    if train.classes and val.classes and tuple(train.classes) != tuple(val.classes):
        raise DataError(f"{val_path}: class names differ from the training shards' "
                        f"({len(val.classes)} vs {len(train.classes)} classes)")
