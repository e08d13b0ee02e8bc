"""Negatives drawn by each rank from its own rows keep the paper's math in expectation.

With several processes, a rank draws its K negatives from the rows of its own shards, not from
the whole bank, and a draw of the sample's own row is thinned to the whole bank's rate 1/N
(`oocid.method.own_draws`); the NCE constants stay those of the whole bank (P_n = 1/N with the global N, so
c = K / N, and Z = N E[exp(v.f / t)]). `oocid shard` writes samples in a seeded random order, so
a rank's shards are a uniform random subset of the rows; over that randomness each negative is
uniform over the whole bank. These tests check it statistically on clustered data (where a
biased subset would show): Z's estimate, the NCE loss and the InfoNCE loss averaged over deals
and draws agree with one process drawing from the whole bank, within 4 standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from oocid.data.manifest import Manifest, ShardInfo
from oocid.distributed.partition import deal_shards
from oocid.method.npid import infonce_from_scores, nce_criterion, nce_probs
from oocid.method.own_draws import thin_own

N, D, SHARD, K, B, TRIALS, T = 2400, 16, 100, 64, 16, 300, 0.1


def bank_and_queries(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centres = F.normalize(torch.randn(6, D, generator=g), dim=1) * 3
    rows = F.normalize(centres[torch.arange(N) % 6] + torch.randn(N, D, generator=g), dim=1)
    queries = F.normalize(centres[torch.arange(B) % 6] + torch.randn(B, D, generator=g), dim=1)
    return rows, queries


def rank_rows(g: torch.Generator, world: int) -> torch.Tensor:
    """Rank 0's rows after a random shard order (as `oocid shard` writes) and the deal."""
    order = torch.randperm(N, generator=g)
    shards = tuple(ShardInfo(f"s{i}", i * SHARD, (i + 1) * SHARD, "0" * 64, 0)
                   for i in range(N // SHARD))
    m = Manifest(None, N, SHARD, shards, None, {}, "", 0, (), "")  # type: ignore[arg-type]
    mine = deal_shards(m, world)[0]
    return torch.cat([order[i * SHARD:(i + 1) * SHARD] for i in mine])


def losses(rows: torch.Tensor, q: torch.Tensor, pool: torch.Tensor, g: torch.Generator
           ) -> tuple[float, float, float]:
    """(Z estimate, NCE loss, InfoNCE loss) of B queries whose positives are rows of `pool`
    (as a rank's samples are its own rows), with K negatives per query drawn from `pool`, a
    draw of the query's own row thinned to the whole bank's rate (as the cache does)."""
    pos = pool[torch.randint(0, len(pool), (B,), generator=g)]
    pick = torch.randint(0, len(pool), (B, K), generator=g)
    pick = thin_own(pick, pool, pos, len(pool), len(pool) / N, g)
    neg = pool[pick]
    scores = torch.cat([(q * rows[pos]).sum(1, keepdim=True),
                        torch.bmm(rows[neg], q.unsqueeze(2)).squeeze(2)], dim=1)  # (B, K+1)
    probs, z = nce_probs(scores, N, T)  # Z = N * mean exp(s / t): the one-shot estimate
    nce = nce_criterion(probs, N)
    return float(z), float(nce), float(infonce_from_scores(scores, T))


def test_rank_local_negatives_equal_whole_bank_negatives_in_expectation() -> None:
    g = torch.Generator().manual_seed(0)
    rows, q = bank_and_queries(g)
    every = torch.arange(N)
    one = torch.tensor([losses(rows, q, every, g) for _ in range(TRIALS)], dtype=torch.float64)
    two = torch.tensor([losses(rows, q, rank_rows(g, 2), g) for _ in range(TRIALS)],
                       dtype=torch.float64)
    for col, name in enumerate(("Z", "NCE", "InfoNCE")):
        a, b = one[:, col], two[:, col]
        se = math.sqrt(a.var().item() / TRIALS + b.var().item() / TRIALS)
        assert abs(a.mean().item() - b.mean().item()) < 4 * se, (name, a.mean(), b.mean(), se)
    # the exact Z over the whole bank, for scale: both estimates centre on it
    z_true = N * torch.exp(q @ rows.T / T).mean().item()
    assert abs(two[:, 0].mean().item() - z_true) < 4 * two[:, 0].std().item() / math.sqrt(TRIALS)


@pytest.mark.parametrize("full", [True, False])
def test_own_row_is_drawn_at_the_whole_bank_rate(full: bool) -> None:
    """A rank of n = N / 4 rows: without thinning a sample's own row is 1 in n of its draws;
    thinned, 1 in N, and each other candidate keeps an equal share of the rest."""
    g = torch.Generator().manual_seed(2)
    n, b, k = N // 4, 64, 4096
    # full: candidates are the rank's rows 0..n-1; a window: candidates map to scattered rows
    row_of = None if full else torch.randperm(N, generator=g)[:n]
    own_at = torch.randint(0, n, (b,), generator=g)
    own = own_at if row_of is None else row_of[own_at]
    hits_raw = hits_thin = 0
    other = torch.zeros(n)
    for _ in range(20):
        pick = torch.randint(0, n, (b, k), generator=g)
        thin = thin_own(pick, row_of, own, n, n / N, g)
        hits_raw += int((pick == own_at[:, None]).sum())
        hits_thin += int((thin == own_at[:, None]).sum())
        other += torch.bincount(thin[0][thin[0] != own_at[0]], minlength=n).float()
    draws = 20 * b * k
    for hits, p in ((hits_raw, 1 / n), (hits_thin, 1 / N)):
        assert abs(hits - draws * p) < 4 * math.sqrt(draws * p), (hits, draws * p)
    counts = torch.cat([other[: own_at[0]], other[own_at[0] + 1:]])  # uniform over the others
    assert counts.std() < 1.5 * counts.mean().sqrt()


def test_a_biased_deal_would_be_caught() -> None:
    """The check has power: ranks holding one half of the clusters each (shards cut in class
    order, not shuffled) give a Z estimate far from the whole bank's."""
    g = torch.Generator().manual_seed(1)
    rows, q = bank_and_queries(g)
    by_class = torch.argsort(torch.arange(N) % 6, stable=True)[: N // 2]  # classes 0, 1, 2
    one = torch.tensor([losses(rows, q, torch.arange(N), g)[0] for _ in range(TRIALS)])
    half = torch.tensor([losses(rows, q, by_class, g)[0] for _ in range(TRIALS)])
    se = math.sqrt(one.var().item() / TRIALS + half.var().item() / TRIALS)
    assert abs(one.mean().item() - half.mean().item()) > 4 * se
