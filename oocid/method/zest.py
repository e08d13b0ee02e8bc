"""The NCE normalising constant Z = N * E[exp(v.f / t)], estimated by Monte Carlo."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from oocid.config import ZMode

# (Z, its first estimate): the state `ZEstimator.snapshot` hands out and `restore` takes back
ZState = tuple[Tensor | None, Tensor | None]


@dataclass
class ZEstimator:
    """The NCE normalising constant Z.

    mode "oneshot": estimated once from the first batch, then fixed (official code, paper default).
    mode "ema": z <- momentum * z + (1 - momentum) * estimate(batch), starting from the first
    batch's estimate (the common fix for the fragile one-shot Z on small data).

    Z and its first estimate live on the scores' device as 0-d float64 tensors (the arithmetic
    of Python floats, so the numbers are those of a host-side average): a step reads nothing
    back to the host. `value`, `first`, `drift` and `state_dict` read them back, each a host
    sync on a GPU: for epoch ends, checkpoints and occasional checks, not for every step."""

    mode: ZMode = "oneshot"
    momentum: float = 0.99
    # Several processes: (this process's estimate, its weight) -> the estimate all agree on
    # (the weighted mean over processes, 0-d float64 tensors on the device; a collective, so
    # every process calls it together).
    agree: Callable[[Tensor, float], Tensor] | None = field(default=None, repr=False,
                                                             compare=False)
    _z: Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _first: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in ("oneshot", "ema"):
            raise ValueError(f"Z mode must be 'oneshot' or 'ema', got {self.mode!r}")

    def __call__(self, scores: Tensor, n_data: int, temperature: float) -> Tensor:
        """Z to use for this batch's scores (B, K+1), 0-d float32 on their device; updates the
        state without reading anything back to the host."""
        self._move(scores.device)
        if self.updates():
            est = (torch.exp(scores.detach().float() / temperature).mean() * n_data).double()
            self._update(est if self.agree is None else self.agree(est, 1.0))
        assert self._z is not None
        return self._z.to(torch.float32)

    @property
    def z(self) -> Tensor | None:
        """Z as a 0-d float64 tensor on the device (None before the first batch)."""
        return self._z

    @property
    def value(self) -> float | None:
        """Z as a Python float (a host sync on a GPU)."""
        return None if self._z is None else float(self._z)

    @property
    def first(self) -> float | None:
        """The first batch's estimate as a Python float (a host sync on a GPU)."""
        return None if self._first is None else float(self._first)

    def updates(self) -> bool:
        """Whether the next batch updates Z (the first one; every one with "ema")."""
        return self._z is None or self.mode == "ema"

    def idle(self, device: torch.device | None = None) -> None:
        """A process with no batch this step takes part in the agreement with weight 0
        (`device`: where its estimate would have been; by default where Z is)."""
        if self.agree is not None and self.updates():
            if device is None:
                device = self._z.device if self._z is not None else torch.device("cpu")
            self._update(self.agree(torch.zeros((), dtype=torch.float64, device=device), 0.0))

    def _update(self, est: Tensor) -> None:
        if self._z is None:
            self._z = est
            self._first = est
        else:  # the same operations, in the same order, as on Python floats
            self._z = self.momentum * self._z + (1.0 - self.momentum) * est

    def _move(self, device: torch.device) -> None:
        """A loaded state starts on the CPU: to the scores' device, once."""
        if self._z is not None and self._z.device != device:
            self._z = self._z.to(device)
        if self._first is not None and self._first.device != device:
            self._first = self._first.to(device)

    def drift_tensor(self) -> Tensor | None:
        """Z over the first estimate as a 0-d tensor on the device (1 where the first is 0);
        None before the first batch."""
        if self._z is None or self._first is None:
            return None
        return torch.where(self._first != 0, self._z / self._first, torch.ones_like(self._z))

    def drift(self) -> float:
        """Current Z over the first estimate (1.0 before the first batch; a host sync)."""
        d = self.drift_tensor()
        return 1.0 if d is None else float(d)

    def snapshot(self) -> ZState:
        """The state, to `restore` if the step is undone (no host sync: updates rebind)."""
        return self._z, self._first

    def restore(self, state: ZState) -> None:
        self._z, self._first = state

    def state_dict(self) -> dict[str, float | str | None]:
        return {"mode": self.mode, "momentum": self.momentum, "value": self.value,
                "first": self.first}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"checkpoint Z mode {state.get('mode')!r} != config {self.mode!r}")
        self.momentum = float(state["momentum"])
        self._z = _tensor(state["value"])
        self._first = _tensor(state["first"])


def _tensor(v: float | None) -> Tensor | None:
    return None if v is None else torch.tensor(float(v), dtype=torch.float64)
