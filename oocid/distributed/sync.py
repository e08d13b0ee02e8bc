"""The per-step agreements of a multi-process run (`oocid.method.npid.StepSync`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from oocid.distributed.world import World


@dataclass
class DistSync:
    """Collectives of one step; each moves a few bytes (cost: docs/distributed.md)."""

    world: World
    device: torch.device

    def batch_weight(self, n: int) -> float | None:
        total = self.world.all_sum([float(n)], self.device)[0]
        return self.world.size * n / total if total > 0 else None

    def all_finite(self, ok: bool) -> bool:
        return self.world.all_sum([0.0 if ok else 1.0], self.device)[0] == 0.0

    def agree_z(self, estimate: Tensor, weight: float) -> Tensor:
        """The weighted mean of the processes' Z estimates (`ZEstimator.agree`): 0-d float64
        tensors, all-reduced on the device, never read back to the host."""
        est = estimate.to(self.device, torch.float64)
        s, w = self.world.all_sum_tensor(torch.stack([est * weight, torch.full_like(est, weight)]))
        return torch.where(w > 0, s / w, est)
