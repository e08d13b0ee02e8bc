"""Weighted kNN over the memory bank (METHOD.md section 4), as pure functions.

Dimension letters: Q queries, N bank rows, D feature dim, C classes, k neighbours.
Top-k is computed once at the largest k and reused for smaller k (as DINO's eval does);
`topk_streaming` merges the top-k of bank chunks so the bank never has to be in memory whole.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def topk_streaming(queries: Tensor, chunks: Iterable[tuple[int, Tensor]], k: int
                   ) -> tuple[Tensor, Tensor]:
    """Running top-k of cosine similarity over bank chunks.

    queries (Q, D) unit rows; chunks yields (start_row, rows (n, D)) in any order.
    Returns (sims (Q, k'), index (Q, k')) sorted by decreasing similarity, k' = min(k, N seen).
    Memory: one chunk's (Q, n) scores plus the (Q, k) buffers."""
    best_s: Tensor | None = None
    best_i: Tensor | None = None
    q = queries.float()
    for start, rows in chunks:
        s = q @ rows.to(q.device, torch.float32).t()  # (Q, n)
        kk = min(k, s.shape[1])
        cs, ci = s.topk(kk, dim=1)  # (Q, kk)
        ci = ci + start
        if best_s is None or best_i is None:
            best_s, best_i = cs, ci
            continue
        cat_s = torch.cat([best_s, cs], dim=1)
        cat_i = torch.cat([best_i, ci], dim=1)
        kk = min(k, cat_s.shape[1])
        best_s, pos = cat_s.topk(kk, dim=1)
        best_i = torch.gather(cat_i, 1, pos)
    if best_s is None or best_i is None:
        raise ValueError("topk_streaming: the bank has no rows")
    order = best_s.argsort(dim=1, descending=True, stable=True)
    return torch.gather(best_s, 1, order), torch.gather(best_i, 1, order)


def knn_scores_from_topk(sims: Tensor, neighbour_labels: Tensor, k: int, temperature: float,
                         num_classes: int) -> Tensor:
    """Class scores (Q, C) from the sorted top-k: w_c = sum_{j in top-k, y_j = c} exp(s_j / t).

    sims (Q, >=k) sorted decreasing; neighbour_labels (Q, >=k) int64."""
    s = sims[:, :k].float()
    y = neighbour_labels[:, :k].long()
    weights = torch.exp(s / temperature)  # (Q, k)
    scores = torch.zeros(s.shape[0], num_classes, dtype=torch.float32, device=s.device)
    return scores.scatter_add_(1, y, weights)


def weighted_knn(queries: Tensor, bank: Tensor, bank_labels: Tensor, k: int, temperature: float,
                 num_classes: int, query_chunk: int = 1024) -> Tensor:
    """Weighted kNN class scores (Q, C) of the official code.

    queries (Q, D) and bank (N, D) unit rows, bank_labels (N,) int64; k is clamped to N.
    Neighbours are the k bank rows of highest cosine similarity s_j, weighted by
    alpha_j = exp(s_j / temperature)."""
    if bank.shape[0] == 0:
        raise ValueError("weighted_knn: empty bank")
    k = min(k, bank.shape[0])
    labels = bank_labels.to(bank.device).long()
    out = []
    for q in queries.split(query_chunk):
        sims, idx = (q.float() @ bank.float().t()).topk(k, dim=1)  # (q, k)
        out.append(knn_scores_from_topk(sims, labels[idx], k, temperature, num_classes))
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def topk_accuracy(scores: Tensor, targets: Tensor, ks: tuple[int, ...] = (1, 5)
                  ) -> dict[int, float]:
    """Fraction of rows whose target is among the `k` best classes, for each k."""
    res: dict[int, float] = {}
    if scores.shape[0] == 0:
        return {k: float("nan") for k in ks}
    order = scores.argsort(dim=1, descending=True, stable=True)
    for k in ks:
        kk = min(k, scores.shape[1])
        hit = (order[:, :kk] == targets.view(-1, 1).to(order.device)).any(dim=1)
        res[k] = float(hit.float().mean().item())
    return res
