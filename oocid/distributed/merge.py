"""The kNN of queries against a bank split across ranks: each rank scores its own rows, then
the ranks exchange k candidates per query (similarity and label) and keep the best k of all.

No rank gathers the bank: what crosses the wire is 2 x Q x k numbers per rank and block."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from oocid.distributed.world import World
from oocid.method.knn import topk_streaming


def topk_across(world: World, queries: Tensor, chunks: Iterator[tuple[int, Tensor]],
                bank_labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(Q, k) similarities and labels of the k nearest rows over every rank's part; `chunks`
    are this rank's rows, `bank_labels` their labels (row numbers as `chunks` gives them)."""
    s, i = topk_streaming(queries, chunks, k)  # (Q, min(k, this rank's rows))
    lab = bank_labels.to(i.device)[i]
    have = s.shape[1]
    # every rank sends (Q, k): a rank with fewer than k rows pads with -inf (never chosen
    # while real candidates remain) and label 0; the merge keeps min(k, all ranks' rows)
    s = torch.nn.functional.pad(s.float(), (0, k - have), value=float("-inf"))
    lab = torch.nn.functional.pad(lab, (0, k - have), value=0)
    total = int(world.all_sum([float(have)], s.device)[0])
    s_all = torch.cat(world.all_gather_tensor(s.contiguous()), dim=1)
    l_all = torch.cat(world.all_gather_tensor(lab.contiguous()), dim=1)
    best, at = s_all.topk(min(k, total), dim=1)
    return best, l_all.gather(1, at)
