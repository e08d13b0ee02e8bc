"""The NCE normalising constant Z = N * E[exp(v.f / t)], estimated by Monte Carlo."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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
    # Several processes: (this process's estimate, its weight) -> the estimate all agree on
    # (the weighted mean over processes; a collective, so every process calls it together).
    agree: Callable[[float, float], float] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in ("oneshot", "ema"):
            raise ValueError(f"Z mode must be 'oneshot' or 'ema', got {self.mode!r}")

    def __call__(self, scores: Tensor, n_data: int, temperature: float) -> Tensor:
        """Z to use for this batch's scores (B, K+1); updates the state."""
        if self.updates():
            est = float((torch.exp(scores.detach().float() / temperature).mean() * n_data).item())
            self._update(est if self.agree is None else self.agree(est, 1.0))
        assert self.value is not None
        return torch.tensor(self.value, dtype=torch.float32, device=scores.device)

    def updates(self) -> bool:
        """Whether the next batch updates Z (the first one; every one with "ema")."""
        return self.value is None or self.mode == "ema"

    def idle(self) -> None:
        """A process with no batch this step takes part in the agreement with weight 0."""
        if self.agree is not None and self.updates():
            self._update(self.agree(0.0, 0.0))

    def _update(self, est: float) -> None:
        if self.value is None:
            self.value = est
            self.first = est
        else:
            self.value = self.momentum * self.value + (1.0 - self.momentum) * est

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
