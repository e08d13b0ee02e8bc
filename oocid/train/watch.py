"""Warnings, once per cause, when training collapses: the loss exploding, NCE's Z drifting, or
the features collapsing to one direction; each with its likely cause and a remedy."""

from __future__ import annotations

import torch
from torch import Tensor

from oocid.config import Config
from oocid.method.npid import NPIDStep, StepOut
from oocid.train.setup import Say


class CollapseWatch:
    """Warns once per cause when training is collapsing, with the likely cause and a remedy:
    the loss exploding (10x the median of its first EARLY_STEPS steps: the paper's NCE on small
    data explodes within tens of steps, so a later or longer baseline would already hold the
    exploded values), Z drifting 100x from its first estimate, or the batch's features
    collapsing to one direction (mean pairwise cosine > 0.95 after a check below it). An
    untrained network's features may start above 0.95: that is a warning of its own ("stuck")
    only if they have not spread apart STUCK_STEPS steps on."""

    EARLY_STEPS = 5
    STUCK_STEPS = 100
    # the checks of Z and the features read numbers back from the device: on a GPU a host
    # sync that stalls the queued work, so done every this many steps there (every step on
    # the CPU)
    CHECK_EVERY = 50

    def __init__(self, cfg: Config, say: Say) -> None:
        self.cfg = cfg
        self.say = say
        self.early: list[float] = []
        self.fired: set[str] = set()
        self.first_step: int | None = None
        self.spread = False  # a check has seen the features spread apart (mean cosine <= 0.95)

    def _fire(self, cause: str, msg: str) -> None:
        if cause not in self.fired:
            self.fired.add(cause)
            self.say(f"oocid: warning: {msg}")

    def check(self, step: int, out: StepOut, npid: NPIDStep) -> None:
        lc = self.cfg.loss
        remedy = ("NCE with a one-shot Z is fragile on small data (docs/method.md): use "
                  "--set loss.z=ema, or --loss softmax when the bank fits")
        if out.skipped:
            return
        self.first_step = step if self.first_step is None else self.first_step
        if len(self.early) < self.EARLY_STEPS:
            self.early.append(out.loss)
        elif out.loss > 10 * max(1e-6, base := sorted(self.early)[len(self.early) // 2]):
            self._fire("loss", f"loss exploded to {out.loss:.4g} at step {step} (median of the "
                               f"first {len(self.early)} steps {base:.4g}); "
                               + (remedy if lc.kind == "nce" else "lower optim.lr"))
        # Z's drift and the features' mean cosine are read back from the device together: on
        # a GPU one host sync that stalls the queued work, so every CHECK_EVERY steps there
        # (and at the first step, so that a collapse is told from features that start together)
        f = npid.last_features
        on = f if f is not None else (npid.zest.z if npid.zest is not None else None)
        every = 1 if on is None or on.device.type == "cpu" else self.CHECK_EVERY
        if step % every != 0 and step != self.first_step:  # the first: where the features start
            return
        z = npid.zest.drift_tensor() if npid.zest is not None else None
        checks: dict[str, Tensor] = {} if z is None else {"z": z.double()}
        if f is not None and f.shape[0] > 1:
            b = f.shape[0]
            m = f.mean(0)
            checks["features"] = ((b * b * (m @ m) - b) / (b * (b - 1))).double()  # mean cosine
        if not checks:
            return
        got = dict(zip(checks, torch.stack(list(checks.values())).tolist(), strict=True))
        if "z" in got and (got["z"] > 100 or got["z"] < 0.01):
            self._fire("z", f"NCE normaliser Z drifted {got['z']:.3g}x from its first estimate "
                            f"at step {step}; {remedy}")
        cos = got.get("features")
        if cos is None:
            return
        if cos <= 0.95:
            self.spread = True
        elif self.spread:
            self._fire("features", f"features collapsed (mean pairwise cosine {cos:.3f}) at step "
                                   f"{step}; " + (remedy if lc.kind == "nce" else "lower optim.lr"))
        elif step - self.first_step >= self.STUCK_STEPS:
            self._fire("stuck", f"features have not spread apart in {step - self.first_step} "
                                f"steps (mean pairwise cosine {cos:.3f}): the network is not "
                                "learning yet; if it stays so, raise optim.lr or train a smaller "
                                "model (--arch small)")
