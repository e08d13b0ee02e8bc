"""Weighted kNN over the memory bank (METHOD.md section 4), as pure functions.

Dimension letters: Q queries, N bank rows, D feature dim, C classes, k neighbours.
Top-k is computed once at the largest k and reused for smaller k (as DINO's eval does);
`topk_streaming` merges the top-k of bank chunks so the bank never has to be in memory whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

BLOCK_ROWS = 65536  # bank rows scored per GEMM: large enough for torch.topk's fast path
QUERY_BLOCK = 512  # queries per GEMM: a (512, 65536) float32 score buffer is 128 MB


def _blocks(chunks: Iterable[tuple[int, Tensor]], block_rows: int, device: torch.device
            ) -> Iterator[tuple[int | Tensor, Tensor]]:
    """Consecutive chunks regrouped into blocks of at most `block_rows` rows, copied into one
    reused (block_rows, D) float32 buffer: yields (start row, or the (n,) int64 row index of a
    block of chunks that are not consecutive, rows (n, D)). A chunk larger than a block is
    split into views. The rows yielded are valid until the next block is asked for."""
    buf: Tensor | None = None
    fill, first, contiguous = 0, 0, True
    starts: list[tuple[int, int]] = []  # (start row, rows) of the chunks in the buffer

    def flush() -> tuple[int | Tensor, Tensor]:
        assert buf is not None
        where: int | Tensor = first if contiguous else torch.cat(
            [torch.arange(a, a + n, device=device) for a, n in starts])
        return where, buf[:fill]

    for start, rows in chunks:
        for a in range(0, rows.shape[0], block_rows):
            part = rows[a:a + block_rows]
            n = part.shape[0]
            if n == block_rows:  # a whole block already: no copy
                yield start + a, part.to(device, torch.float32)
                continue
            if buf is None or buf.shape[1] != part.shape[1]:
                buf = torch.empty(block_rows, part.shape[1], dtype=torch.float32, device=device)
            if fill and fill + n > block_rows:
                yield flush()
                fill, starts = 0, []
            if not fill:
                first, contiguous = start + a, True
            else:
                contiguous = contiguous and start + a == first + fill
            buf[fill:fill + n].copy_(part)
            starts.append((start + a, n))
            fill += n
    if fill:
        yield flush()


def topk_streaming(queries: Tensor, chunks: Iterable[tuple[int, Tensor]], k: int, *,
                   block_rows: int = BLOCK_ROWS, query_block: int = QUERY_BLOCK) -> tuple[Tensor, Tensor]:
    """Running top-k of cosine similarity over bank chunks.

    queries (Q, D) unit rows; chunks yields (start_row, rows (n, D)) in any order.
    Returns (sims (Q, k'), index (Q, k')) sorted by decreasing similarity (ties by increasing
    index), k' = min(k, N seen). Chunks are regrouped into blocks of `block_rows` rows; each
    block is scored `query_block` queries at a time, S = q @ rows^T (query_block, n), and its
    top-k merged in place with those queries' running top-k by one topk over [running | block]
    (query_block, 2k). Memory: one block of rows, one (query_block, block_rows) score buffer,
    the (Q, k) running top-k."""
    q = queries.float()
    nq = q.shape[0]
    best_s = torch.empty(nq, 0, dtype=torch.float32, device=q.device)  # (Q, k') running top-k
    best_i = torch.empty(nq, 0, dtype=torch.int64, device=q.device)
    scores = torch.empty(0, dtype=torch.float32, device=q.device)  # reused score buffer
    seen = 0
    for where, rows in _blocks(chunks, block_rows, q.device):
        n = rows.shape[0]
        seen += n
        width = min(k, best_s.shape[1] + n)  # k' after this block
        out_s, out_i = (best_s, best_i) if width == best_s.shape[1] else (
            torch.empty(nq, width, dtype=torch.float32, device=q.device),
            torch.empty(nq, width, dtype=torch.int64, device=q.device))
        if scores.numel() < min(query_block, nq) * n:
            scores = torch.empty(min(query_block, nq) * n, dtype=torch.float32, device=q.device)
        for a in range(0, nq, query_block):
            b = min(a + query_block, nq)
            s = torch.mm(q[a:b], rows.t(), out=scores[:(b - a) * n].view(b - a, n))  # (q, n)
            cs, ci = s.topk(min(k, n), dim=1, sorted=False)  # (q, kk)
            ci = ci + where if isinstance(where, int) else where[ci]
            ms, pos = torch.cat([best_s[a:b], cs], dim=1).topk(width, dim=1, sorted=False)
            out_i[a:b] = torch.gather(torch.cat([best_i[a:b], ci], dim=1), 1, pos)  # (q, k')
            out_s[a:b] = ms
        best_s, best_i = out_s, out_i
    if not seen:
        raise ValueError("topk_streaming: the bank has no rows")
    by_index = best_i.argsort(dim=1)
    best_s, best_i = torch.gather(best_s, 1, by_index), torch.gather(best_i, 1, by_index)
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
