"""The NCE normalising constant Z = N * E[exp(v.f / t)], estimated by Monte Carlo."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from oocid.config import ZMode


@dataclass
class ZEstimator:
    """The NCE normalising constant Z.

    mode "oneshot": estimated once from the first batch, then fixed (official code, paper default).
    mode "ema": z <- momentum * z + (1 - momentum) * estimate(batch), starting from the first
    batch's estimate (the common fix for the fragile one-shot Z on small data)."""

    mode: ZMode = "oneshot"
    momentum: float = 0.99
    value: float | None = None
    first: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("oneshot", "ema"):
            raise ValueError(f"Z mode must be 'oneshot' or 'ema', got {self.mode!r}")

    def __call__(self, scores: Tensor, n_data: int, temperature: float) -> Tensor:
        """Z to use for this batch's scores (B, K+1); updates the state."""
        if self.value is None or self.mode == "ema":
            est = float((torch.exp(scores.detach().float() / temperature).mean() * n_data).item())
            if self.value is None:
                self.value = est
                self.first = est
            else:
                self.value = self.momentum * self.value + (1.0 - self.momentum) * est
        return torch.tensor(self.value, dtype=torch.float32, device=scores.device)

    def drift(self) -> float:
        """Current Z over the first estimate (1.0 before the first batch)."""
        if self.value is None or not self.first:
            return 1.0
        return self.value / self.first

    def state_dict(self) -> dict[str, float | str | None]:
        return {"mode": self.mode, "momentum": self.momentum, "value": self.value,
                "first": self.first}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"checkpoint Z mode {state.get('mode')!r} != config {self.mode!r}")
        self.momentum = float(state["momentum"])
        self.value = None if state["value"] is None else float(state["value"])
        self.first = None if state["first"] is None else float(state["first"])
