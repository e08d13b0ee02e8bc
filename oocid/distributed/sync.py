"""The per-step agreements of a multi-process run (`oocid.method.npid.StepSync`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oocid.distributed.world import World


@dataclass
class DistSync:
    """Collectives of one step; each moves a few bytes (cost: docs/distributed.md)."""

    world: World
    device: torch.device

    def batch_weight(self, n: int) -> float:
        total = self.world.all_sum([float(n)], self.device)[0]
        return self.world.size * n / total if total > 0 else 0.0

    def all_finite(self, ok: bool) -> bool:
        return self.world.all_sum([0.0 if ok else 1.0], self.device)[0] == 0.0

    def agree_z(self, estimate: float, weight: float) -> float:
        """The weighted mean of the processes' Z estimates (`ZEstimator.agree`)."""
        s, w = self.world.all_sum([estimate * weight, weight], self.device)
        return s / w if w > 0 else estimate
