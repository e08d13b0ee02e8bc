"""Warnings, once per cause, when training collapses: the loss exploding, NCE's Z drifting, or
the features collapsing to one direction; each with its likely cause and a remedy."""

from __future__ import annotations

from oocid.config import Config
from oocid.method.npid import NPIDStep, StepOut
from oocid.train.setup import Say


class CollapseWatch:
    """Warns once per cause when training is collapsing, with the likely cause and a remedy:
    the loss exploding (10x the median of its first EARLY_STEPS steps: the paper's NCE on small
    data explodes within tens of steps, so a later or longer baseline would already hold the
    exploded values), Z drifting 100x from its first estimate, or the batch's features
    collapsing to one direction (mean pairwise cosine > 0.95)."""

    EARLY_STEPS = 5
    # the features' check reads a number back from the device: on a GPU a host sync that
    # stalls the queued work, so done every this many steps there (every step on the CPU)
    FEATURE_CHECK_EVERY = 50

    def __init__(self, cfg: Config, say: Say) -> None:
        self.cfg = cfg
        self.say = say
        self.early: list[float] = []
        self.fired: set[str] = set()

    def _fire(self, cause: str, msg: str) -> None:
        if cause not in self.fired:
            self.fired.add(cause)
            self.say(f"oocid: warning: {msg}")

    def check(self, step: int, out: StepOut, npid: NPIDStep) -> None:
        lc = self.cfg.loss
        remedy = ("NCE with a one-shot Z is fragile on small data (docs/method.md): use "
                  "--set loss.z=ema, or loss.kind = \"softmax\" when the bank fits")
        if out.skipped:
            return
        if len(self.early) < self.EARLY_STEPS:
            self.early.append(out.loss)
        elif out.loss > 10 * max(1e-6, base := sorted(self.early)[len(self.early) // 2]):
            self._fire("loss", f"loss exploded to {out.loss:.4g} at step {step} (median of the "
                               f"first {len(self.early)} steps {base:.4g}); "
                               + (remedy if lc.kind == "nce" else "lower optim.lr"))
        if npid.zest is not None and npid.zest.value is not None:
            d = npid.zest.drift()
            if d > 100 or d < 0.01:
                self._fire("z", f"NCE normaliser Z drifted {d:.3g}x from its first estimate at "
                                f"step {step}; {remedy}")
        f = npid.last_features
        every = 1 if f is None or f.device.type == "cpu" else self.FEATURE_CHECK_EVERY
        if f is not None and f.shape[0] > 1 and step % every == 0:
            b = f.shape[0]
            m = f.mean(0)
            sim = float((b * b * (m @ m) - b) / (b * (b - 1)))  # mean pairwise cosine
            if sim > 0.95:
                self._fire("features", f"features collapsed (mean pairwise cosine {sim:.3f}) at "
                                       f"step {step}; " + (remedy if lc.kind == "nce"
                                                           else "lower optim.lr"))
