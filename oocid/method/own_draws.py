"""A sample's own row among its negatives, at the rate of one process drawing from the whole
bank, when a process draws from its own part of the bank only.

Drawing K negatives per sample uniformly from all N rows, a draw is the sample's own row with
probability 1/N (the official code does not exclude it). A process of a multi-process run draws
from its own n rows, and a sample's own row is always among them, so it would be drawn with
probability 1/n: N/n times as often (docs/distributed.md). Keeping such a draw with probability
n/N and redrawing it otherwise, uniformly among the other candidates, restores both rates: the
own row 1/N, every other candidate the same share of the rest. With one process n = N and
nothing changes (no random numbers are drawn).
"""

from __future__ import annotations

import torch
from torch import Tensor


def thin_own(pick: Tensor, row_of: Tensor | None, own: Tensor, n: int, keep: float,
             generator: torch.Generator) -> Tensor:
    """Per-sample draws `pick` (B, K) among n candidates; `row_of` (n,) the bank row of each
    candidate (None: candidate = row); `own` (B,) each sample's row. Returns `pick` with each
    draw of the sample's own row kept with probability `keep`, else replaced by a uniform draw
    among the other n - 1 candidates."""
    if keep >= 1.0 or n < 2:
        return pick
    rows = pick if row_of is None else row_of[pick]
    b, k = torch.nonzero(rows == own.to(rows.device).unsqueeze(1), as_tuple=True)
    m = int(b.numel())
    if m == 0:
        return pick
    dev = generator.device
    redraw = (torch.rand(m, generator=generator, device=dev) >= keep).to(pick.device)
    u = torch.randint(0, n - 1, (m,), generator=generator, device=dev).to(pick.device)
    at = pick[b, k]
    out = pick.clone()
    out[b, k] = torch.where(redraw, u + (u >= at).to(u.dtype), at)  # skip the own candidate
    return out
