"""The memory bank's math (METHOD.md section 3) as pure functions.

N rows, D dims. The bank itself lives on disk (`oocid.store`); these functions act on tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor


def momentum_update(old: Tensor, new: Tensor, momentum: float) -> Tensor:
    """v <- normalize(m * v_old + (1 - m) * f), weight m on the OLD row (official: m = 0.5).

    old, new: (B, D). Returns (B, D) unit rows in old's dtype. Computed as the official code
    does (mul, add, divide by the L2 norm); the norm is clamped at 1e-12 only to keep an exactly
    cancelling pair finite."""
    mixed = old.float() * momentum + new.detach().float() * (1.0 - momentum)  # (B, D)
    norm = mixed.pow(2).sum(1, keepdim=True).pow(0.5).clamp_min(1e-12)  # (B, 1)
    return (mixed / norm).to(old.dtype)


def random_unit_rows(n: int, d: int, generator: torch.Generator | None = None) -> Tensor:
    """(n, d) float32 rows drawn i.i.d. standard normal, L2-normalised (uniform on the sphere)."""
    rows = torch.randn(n, d, generator=generator)
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
