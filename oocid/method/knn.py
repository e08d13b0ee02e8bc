"""Weighted kNN over the memory bank (docs/method.md, "Weighted kNN"), as pure functions.

Dimension letters: Q queries, N bank rows, D feature dim, C classes, k neighbours.
Top-k is computed once at the largest k and reused for smaller k (as DINO's eval does);
`topk_streaming` merges the top-k of bank chunks so the bank never has to be in memory whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from oocid.method.kernels import matmul_nt

BLOCK_ROWS = 65536  # bank rows scored per GEMM: large enough for torch.topk's fast path
QUERY_BLOCK = 512  # queries per GEMM: a (512, 65536) float32 score buffer is 128 MB
TILE = 1024  # queries and rows per GEMM once the top-k is full: a 4 MB score tile stays in cache
SAMPLE = 4096  # rows of a first block from which each query's bar is estimated
GROUP = 64  # scores per group maximum in the thresholded scan (one amax, 1/64 the compares)


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
                   block_rows: int = BLOCK_ROWS, query_block: int = QUERY_BLOCK, tile: int = TILE,
                   group: int = GROUP, sample: int = SAMPLE) -> tuple[Tensor, Tensor]:
    """Running top-k of cosine similarity over bank chunks.

    queries (Q, D) unit rows; chunks yields (start_row, rows (n, D)) in any order.
    Returns (sims (Q, k'), index (Q, k')) sorted by decreasing similarity, k' = min(k, N seen).
    Which of several rows of exactly the same score is kept at the k-th place is not specified
    (as with the official code's `torch.topk`); the rows kept are listed by increasing index
    among equal scores. Chunks are regrouped into blocks of `block_rows` rows; each
    block is scored `query_block` queries at a time, S = q @ rows^T (query_block, n), and its
    top-k merged in place with those queries' running top-k by one topk over [running | block]
    (query_block, 2k). Once every query holds k scores, a block is scored in (tile, tile) GEMMs
    scanned against each query's k-th score (`_merge_above`): on the CPU that scan
    costs a few % of the GEMM where a top-k per block cost as much as the GEMM itself. Memory:
    one block of rows, one (query_block, block_rows) score buffer, the (Q, k) running top-k and
    the block's candidates."""
    q = queries.float()
    nq = q.shape[0]
    best_s = torch.empty(nq, 0, dtype=torch.float32, device=q.device)  # (Q, k') running top-k
    best_i = torch.empty(nq, 0, dtype=torch.int64, device=q.device)
    scores = torch.empty(0, dtype=torch.float32, device=q.device)  # reused score buffer
    seen = 0
    for where, rows in _blocks(chunks, block_rows, q.device):
        n = rows.shape[0]
        seen += n
        if 0 < k == best_s.shape[1]:  # full: only scores above each query's k-th can enter
            _merge_above(q, rows, where, best_s, best_i, None, tile, group)
            continue
        if nq and k and not best_s.shape[1] and n >= max(8 * k, 2 * tile, sample):  # a large first block
            best_s, best_i = _first_block(q, rows, where, k, query_block, tile, group, sample)
            continue
        width = min(k, best_s.shape[1] + n)  # k' after this block
        out_s, out_i = (best_s, best_i) if width == best_s.shape[1] else (
            torch.empty(nq, width, dtype=torch.float32, device=q.device),
            torch.empty(nq, width, dtype=torch.int64, device=q.device))
        if scores.numel() < min(query_block, nq) * n:
            scores = torch.empty(min(query_block, nq) * n, dtype=torch.float32, device=q.device)
        for a in range(0, nq, query_block):
            b = min(a + query_block, nq)
            s = torch.mm(q[a:b], rows.t(), out=scores[:(b - a) * n].view(b - a, n))  # (q, n)
            s.nan_to_num_(nan=float("-inf"))  # a NaN row never enters (nor beats any bar below)
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


def _first_block(q: Tensor, rows: Tensor, where: int | Tensor, k: int, query_block: int, tile: int,
                 group: int, sample: int) -> tuple[Tensor, Tensor]:
    """The top-k (Q, k) of a first block of n >= 8k rows without a top-k over all its scores.

    Each query's bar is estimated from the block's first `sample` rows: the score that about 2k of
    the block's n rows should beat. The block then goes through the thresholded scan; a query
    that found fewer than k scores above its estimate (rare: the estimate is generous) is
    computed again exactly. Either way the result is the block's exact top-k: when k scores
    beat the bar, every score left out is below all k of them."""
    nq, n, dev = q.shape[0], rows.shape[0], q.device
    head = rows[:sample]
    j = max(1, min(head.shape[0], math.ceil(2 * k * head.shape[0] / n)))
    bar = torch.cat([(q[a:a + tile] @ head.t()).nan_to_num_(nan=float("-inf")).topk(j, dim=1).values[:, -1]
                     for a in range(0, nq, tile)])  # (Q,)
    best_s = torch.full((nq, k), float("-inf"), dtype=torch.float32, device=dev)
    best_i = torch.full((nq, k), -1, dtype=torch.int64, device=dev)
    _merge_above(q, rows, where, best_s, best_i, bar, tile, group)
    short = (best_i < 0).any(dim=1).nonzero().squeeze(1)  # fewer than k above the estimate
    for a in range(0, short.numel(), query_block):
        sq = short[a:a + query_block]
        cs, ci = (q[sq] @ rows.t()).nan_to_num_(nan=float("-inf")).topk(k, dim=1, sorted=False)
        best_s[sq], best_i[sq] = cs, ci + where if isinstance(where, int) else where[ci]
    return best_s, best_i


def _nonzero2(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(row, column) of the True entries of a 2-D bool mask, row-major (numpy's flatnonzero on
    the CPU: several times faster than torch's nonzero on sparse masks)."""
    if mask.device.type != "cpu":
        r, c = mask.nonzero(as_tuple=True)
        return r, c
    flat = torch.from_numpy(np.flatnonzero(mask.contiguous().numpy()))
    return flat // mask.shape[1], flat % mask.shape[1]


def _merge_above(q: Tensor, rows: Tensor, where: int | Tensor, best_s: Tensor, best_i: Tensor,
                 bar: Tensor | None, tile: int = TILE, group: int = GROUP) -> None:
    """Merge one block of rows into the running top-k (Q, k), in place, looking only at the
    scores above each query's bar: the k-th score held, or above an estimate `bar` (Q,).

    A row can only enter a query's top-k if its score beats the query's k-th score (strictly: an
    equal score from a later row loses the tie to the row already held). The block is scored in
    (tile, tile) GEMMs that stay in cache; each tile is scanned by the maximum of every `group`
    consecutive scores, and only groups whose maximum beats the bar are gathered and filtered
    score by score. Past the first block few scores pass, so the scan costs a few % of the GEMM
    where a top-k over every score cost as much as the GEMM. The candidates of a tile of queries
    are merged per query by one top-k over [running | candidates] at the end of the block, or
    sooner once they number k per query (the bar then rises)."""
    nq, n, dev = q.shape[0], rows.shape[0], q.device
    buf = torch.empty(min(tile, nq) * min(tile, n), dtype=torch.float32, device=dev)
    for a in range(0, nq, tile):
        b = min(a + tile, nq)
        t = best_s[a:b].min(dim=1).values  # (q,) the k-th score held
        if bar is not None:
            t = torch.maximum(t, bar[a:b])
        found: list[tuple[Tensor, Tensor, Tensor]] = []  # (query in tile, row in block, score)
        held = 0
        for c in range(0, n, tile):
            if held >= best_s.shape[1] * (b - a):  # k per query found: merge, raise the bar
                _merge_found(best_s[a:b], best_i[a:b], found, where)
                t, found, held = torch.maximum(t, best_s[a:b].min(dim=1).values), [], 0
            d = min(c + tile, n)
            w = d - c
            s = matmul_nt(q[a:b], rows[c:d], buf[:(b - a) * w].view(b - a, w))  # (q, w)
            if w % group == 0:
                g = s.view(b - a, w // group, group)
                gm = g.amax(dim=2)  # (q, w / group); NaN where a group holds a NaN score
                hq, hg = _nonzero2((gm > t[:, None]) | gm.isnan())  # (m,) groups to look into
                if not hq.numel():
                    continue
                vals = g[hq, hg]  # (m, group)
                kr, kc = _nonzero2(vals > t[hq, None])
                found.append((hq[kr], hg[kr] * group + kc + c, vals[kr, kc]))
            else:
                qs, cols = _nonzero2(s > t[:, None])
                found.append((qs, cols + c, s[qs, cols]))
            held += found[-1][0].numel()
        _merge_found(best_s[a:b], best_i[a:b], found, where)


def _merge_found(best_s: Tensor, best_i: Tensor, found: list[tuple[Tensor, Tensor, Tensor]],
                 where: int | Tensor) -> None:
    if found:
        cq, cr, cs = (torch.cat([f[j] for f in found]) for j in range(3))
        _merge_candidates(best_s, best_i, cq, cr, cs, where)


def _merge_candidates(best_s: Tensor, best_i: Tensor, cq: Tensor, cr: Tensor, cs: Tensor,
                      where: int | Tensor) -> None:
    """best_s, best_i (q, k) <- the top-k of [best | candidates] per query, in place; candidate j
    is (query cq[j], row cr[j] of the block whose row 0 is `where`, score cs[j]). Each query's
    candidates are cut to its best k first (two stable sorts), so the padded (queries, width)
    merge is at most k wide however unevenly the candidates fall."""
    if not cq.numel():
        return
    nq, k, dev = best_s.shape[0], best_s.shape[1], best_s.device
    ci = cr + where if isinstance(where, int) else where[cr]
    order = torch.argsort(cs, descending=True, stable=True)
    cq, ci, cs = cq[order], ci[order], cs[order]
    order = torch.argsort(cq, stable=True)  # by query, each query's by decreasing score
    cq, ci, cs = cq[order], ci[order], cs[order]
    counts = torch.bincount(cq, minlength=nq)  # (q,) candidates per query
    pos = torch.arange(cq.numel(), device=dev) - (counts.cumsum(0) - counts)[cq]
    if int(counts.max()) > k:
        keep = pos < k
        cq, ci, cs, pos = cq[keep], ci[keep], cs[keep], pos[keep]
        counts = counts.clamp(max=k)
    hit = counts.nonzero().squeeze(1)  # the queries with any
    slot = torch.empty(nq, dtype=torch.int64, device=dev)
    slot[hit] = torch.arange(hit.numel(), device=dev)
    width = int(counts.max())
    pad_s = torch.full((hit.numel(), width), float("-inf"), dtype=torch.float32, device=dev)
    pad_i = torch.full((hit.numel(), width), -1, dtype=torch.int64, device=dev)  # -1: no row
    pad_s[slot[cq], pos] = cs
    pad_i[slot[cq], pos] = ci
    ms, p = torch.cat([best_s[hit], pad_s], dim=1).topk(k, dim=1, sorted=False)
    best_i[hit] = torch.gather(torch.cat([best_i[hit], pad_i], dim=1), 1, p)
    best_s[hit] = ms


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
    for q in queries.split(query_chunk):  # type: ignore[no-untyped-call]
        sims, idx = (q.float() @ bank.float().t()).topk(k, dim=1)  # (q, k)
        out.append(knn_scores_from_topk(sims, labels[idx], k, temperature, num_classes))
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def topk_accuracy(scores: Tensor, targets: Tensor, ks: tuple[int, ...] = (1, 5)
                  ) -> dict[int, float]:
    """Fraction of rows whose target is among the `k` best classes, for each k."""
    res: dict[int, float] = {}
    if scores.shape[0] == 0:
        return {k: float("nan") for k in ks}
    for k, hit in _topk_hit_rows(scores, targets, ks).items():
        res[k] = float(hit.float().mean().item())
    return res


def topk_hits(scores: Tensor, targets: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of rows whose target is among the `k` best classes, for each k."""
    if scores.shape[0] == 0:
        return dict.fromkeys(ks, 0)
    return {k: int(hit.sum().item()) for k, hit in _topk_hit_rows(scores, targets, ks).items()}


def _topk_hit_rows(scores: Tensor, targets: Tensor, ks: tuple[int, ...]) -> dict[int, Tensor]:
    order = scores.argsort(dim=1, descending=True, stable=True)
    out: dict[int, Tensor] = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        out[k] = (order[:, :kk] == targets.view(-1, 1).to(order.device)).any(dim=1)  # (Q,) bool
    return out
