"""Weighted kNN on hand-built banks with exact expected answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from oocid.method.knn import knn_scores_from_topk, topk_accuracy, topk_streaming, weighted_knn


def test_weighted_knn_hand_built_bank() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1, 0])
    q = torch.tensor([[1.0, 0.0]])
    scores = weighted_knn(q, bank, labels, k=3, temperature=0.5, num_classes=2)
    # top-3 sims: 1.0 (label 0), 0.6 (label 0), 0.0 (label 1)
    expected = torch.tensor([[math.exp(2.0) + math.exp(1.2), math.exp(0.0)]])
    assert torch.allclose(scores, expected)


def test_weighted_knn_k_larger_than_bank_is_clamped() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = weighted_knn(torch.tensor([[1.0, 0.0]]), bank, torch.tensor([0, 1]), 200, 1.0, 3)
    assert torch.allclose(s, torch.tensor([[math.e, 1.0, 0.0]]))


def test_weighted_knn_matches_official_code() -> None:
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    labels = torch.randint(0, 5, (300,), generator=g)
    q = F.normalize(torch.randn(20, 16, generator=g), dim=1)
    k, sigma, c = 50, 0.07, 5
    # lemniscate test.py kNN
    dist = torch.mm(q, bank.t())
    yd, yi = dist.topk(k, dim=1, largest=True, sorted=True)
    candidates = labels.view(1, -1).expand(20, -1)
    retrieval = torch.gather(candidates, 1, yi)
    one_hot = torch.zeros(20 * k, c).scatter_(1, retrieval.view(-1, 1), 1)
    yd_t = yd.clone().div_(sigma).exp_()
    ref = torch.sum(torch.mul(one_hot.view(20, -1, c), yd_t.view(20, -1, 1)), 1)
    assert torch.allclose(weighted_knn(q, bank, labels, k, sigma, c), ref, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 60), st.integers(1, 17), st.integers(1, 25), st.integers(0, 10**6))
@example(n=34, chunk=1, k=15, seed=4)  # a similarity near 0 differed by 6e-8
def test_topk_streaming_equals_in_memory(n: int, chunk: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(n, 8, generator=g), dim=1)
    q = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    chunks = [(s, bank[s:s + chunk]) for s in range(0, n, chunk)]
    s, i = topk_streaming(q, iter(chunks), k)
    rs, ri = (q @ bank.t()).topk(min(k, n), dim=1)
    # a (Q, n) GEMM per chunk and one over the whole bank may round the last bit differently
    assert torch.allclose(s, rs, rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.sort(i, 1).values, torch.sort(ri, 1).values)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 80), st.integers(1, 30), st.integers(1, 40), st.integers(1, 20),
       st.integers(1, 9), st.booleans(), st.integers(0, 10**6))
def test_topk_streaming_blocks_and_query_blocks(n: int, chunk: int, k: int, block_rows: int,
                                                query_block: int, shuffled: bool, seed: int
                                                ) -> None:
    """Chunks regrouped into blocks (copied, split, or not consecutive) and queries scored in
    blocks give the in-memory top-k."""
    g = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(n, 8, generator=g), dim=1)
    q = F.normalize(torch.randn(11, 8, generator=g), dim=1)
    chunks = [(s, bank[s:s + chunk]) for s in range(0, n, chunk)]
    if shuffled:
        chunks = [chunks[j] for j in torch.randperm(len(chunks), generator=g).tolist()]
    s, i = topk_streaming(q, iter(chunks), k, block_rows=block_rows, query_block=query_block)
    rs, ri = (q @ bank.t()).topk(min(k, n), dim=1)
    assert s.shape == i.shape == (11, min(k, n))
    assert torch.allclose(s, rs, rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.sort(i, 1).values, torch.sort(ri, 1).values)
    assert torch.allclose(bank[i].mul(q[:, None]).sum(-1), s, atol=1e-6)  # index and sim agree


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 160), st.integers(1, 40), st.integers(1, 12), st.integers(1, 100),
       st.integers(1, 13), st.sampled_from([1, 2, 4, 8]), st.integers(1, 16), st.booleans(),
       st.booleans(), st.integers(0, 10**6))
def test_topk_streaming_thresholded_tiles(n: int, chunk: int, k: int, block_rows: int, tile: int,
                                          group: int, sample: int, shuffled: bool, ties: bool,
                                          seed: int) -> None:
    """Blocks after the first k rows go through the thresholded scan, and a large first block
    through a bar estimated from its first `sample` rows (tiles whose width is or is not a
    multiple of the group, groups with and without a candidate, queries with fewer than k
    scores above their estimate, rows out of order, many equal scores): the same top-k as in
    memory, and each index carries its own score."""
    g = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(n, 4, generator=g), dim=1)
    if ties:  # few distinct rows: equal scores everywhere, at the k-th place too
        palette = F.normalize(torch.randn(3, 4, generator=g), dim=1)
        bank = palette[torch.randint(0, 3, (n,), generator=g)]
    q = F.normalize(torch.randn(7, 4, generator=g), dim=1)
    chunks = [(s, bank[s:s + chunk]) for s in range(0, n, chunk)]
    if shuffled:
        chunks = [chunks[j] for j in torch.randperm(len(chunks), generator=g).tolist()]
    s, i = topk_streaming(q, iter(chunks), k, block_rows=block_rows, query_block=3, tile=tile,
                          group=group, sample=sample)
    full = q @ bank.t()
    rs = full.topk(min(k, n), dim=1).values
    assert s.shape == i.shape == (7, min(k, n))
    assert torch.allclose(s, rs, rtol=1e-6, atol=1e-6)
    assert torch.allclose(torch.gather(full, 1, i), s, atol=1e-6)  # index and sim agree
    assert all(len(set(r)) == len(r) for r in i.tolist())  # no row twice
    if not ties:
        ri = full.topk(min(k, n), dim=1).indices
        assert torch.equal(torch.sort(i, 1).values, torch.sort(ri, 1).values)


@pytest.mark.parametrize("onednn", [True, False])
def test_topk_streaming_gemm_paths(monkeypatch: pytest.MonkeyPatch, onednn: bool) -> None:
    """The scan's tiles scored by oneDNN (where torch has it) or by torch.mm: the in-memory
    top-k either way, at the real tile and group sizes."""
    import oocid.method.kernels as gemm_mod

    if onednn and not gemm_mod.onednn_gemm():
        pytest.skip("this torch build has no usable oneDNN linear; torch.mm is the path")
    monkeypatch.setattr(gemm_mod, "onednn_gemm", lambda: onednn)
    g = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(9000, 16, generator=g), dim=1)
    q = F.normalize(torch.randn(1100, 16, generator=g), dim=1)
    chunks = [(s, bank[s:s + 1500]) for s in range(0, 9000, 1500)]
    s, i = topk_streaming(q, iter(chunks), 20, block_rows=4096, sample=512)
    full = q @ bank.t()
    rs, ri = full.topk(20, dim=1)
    assert torch.allclose(s, rs, atol=1e-6)
    assert torch.equal(torch.sort(i, 1).values, torch.sort(ri, 1).values)


@pytest.mark.parametrize("nan_rows", [[0], [5000], [70, 4100, 8000]])
def test_topk_streaming_skips_nan_rows(nan_rows: list[int]) -> None:
    """A row whose score is NaN (a corrupt bank row) never enters the top-k, and neither it nor
    its group hides the other rows: the top-k of the finite rows, through every path."""
    g = torch.Generator().manual_seed(5)
    bank = F.normalize(torch.randn(9000, 16, generator=g), dim=1)
    bank[nan_rows] = float("nan")
    q = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    chunks = [(s, bank[s:s + 1000]) for s in range(0, 9000, 1000)]
    s, i = topk_streaming(q, iter(chunks), 12, block_rows=4096, sample=512, tile=256)
    full = (q @ bank.t()).nan_to_num(nan=float("-inf"))
    rs, ri = full.topk(12, dim=1)
    assert torch.allclose(s, rs, atol=1e-6)
    assert torch.equal(torch.sort(i, 1).values, torch.sort(ri, 1).values)


@pytest.mark.parametrize("nq, k", [(0, 5), (3, 0)])
def test_topk_streaming_no_queries_or_k_zero(nq: int, k: int) -> None:
    s, i = topk_streaming(torch.randn(nq, 8), iter([(0, torch.randn(5000, 8))]), k)
    assert s.shape == i.shape == (nq, k)


def test_topk_streaming_candidates_skewed_to_one_query(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows sorted by increasing similarity to query 0: that query gains candidates in every
    tile while the others gain few. The merge's padding stays at most k wide (it used to grow
    with the busiest query) and the result is the in-memory top-k."""
    import oocid.method.knn as knn_mod

    g = torch.Generator().manual_seed(7)
    q = F.normalize(torch.randn(64, 8, generator=g), dim=1)
    bank = F.normalize(torch.randn(6000, 8, generator=g), dim=1)
    bank = bank[(bank @ q[0]).argsort()]
    pads: list[int] = []
    real_full = torch.full

    def full(size: tuple[int, ...], fill: float, **kw: object) -> torch.Tensor:
        if len(size) == 2 and kw.get("dtype") == torch.int64:
            pads.append(size[1])  # an index pad (queries, width)
        return real_full(size, fill, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(knn_mod.torch, "full", full)
    chunks = [(s, bank[s:s + 500]) for s in range(0, 6000, 500)]
    s, i = topk_streaming(q, iter(chunks), 10, block_rows=500, tile=64, group=4)
    monkeypatch.undo()
    rs, ri = (q @ bank.t()).topk(10, dim=1)
    assert torch.allclose(s, rs, atol=1e-6)
    assert torch.equal(torch.sort(i, 1).values, torch.sort(ri, 1).values)
    assert pads and max(pads) <= 10, pads


def test_topk_streaming_threshold_keeps_earlier_row_on_a_tie() -> None:
    """With rows in order, a later row whose score equals the k-th does not displace it."""
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    chunks = [(0, bank[:2]), (2, bank[2:4]), (4, bank[4:])]
    s, i = topk_streaming(torch.tensor([[0.6, 0.8]]), iter(chunks), 2, block_rows=2, tile=1, group=1)
    assert i.tolist() == [[1, 2]]
    assert torch.allclose(s, torch.tensor([[0.8, 0.8]]))


def test_topk_streaming_ties_by_index() -> None:
    """Equal similarities inside the top-k come out by increasing row index."""
    bank = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [0.0, -1.0],
                         [1.0, 0.0], [0.8, 0.6], [1.0, 0.0], [-1.0, 0.0]])
    chunks = [(6, bank[6:]), (0, bank[:3]), (3, bank[3:6])]
    s, i = topk_streaming(torch.tensor([[1.0, 0.0]]), iter(chunks), 4, block_rows=2, query_block=1)
    assert i.tolist() == [[1, 4, 6, 5]]
    assert torch.allclose(s, torch.tensor([[1.0, 1.0, 1.0, 0.8]]))


def test_scores_and_accuracy() -> None:
    sims = torch.tensor([[0.9, 0.5], [0.8, 0.1]])
    nl = torch.tensor([[2, 0], [1, 1]])
    sc = knn_scores_from_topk(sims, nl, 2, 1.0, 3)
    assert torch.allclose(sc[0], torch.tensor([math.exp(0.5), 0.0, math.exp(0.9)]))
    acc = topk_accuracy(sc, torch.tensor([2, 0]), (1, 2))
    assert acc[1] == pytest.approx(0.5)
    assert acc[2] == pytest.approx(1.0)
