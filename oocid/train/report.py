"""What a run says about itself: the result of `train` (`RunResult`), the note when a resume
changes the epoch count (the lr schedule is recomputed for it), and the one human line at the
end of `oocid train` (`summary`), printed before the JSON line that scripts parse."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oocid.config import Config
from oocid.train.setup import lr_at


@dataclass
class RunResult:
    run_dir: Path
    epochs: int
    step: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    quiet: bool = False  # a process other than rank 0: it reports nothing
    total_epochs: int = 0  # optim.epochs, the schedule's length
    first_step: int = 0  # the step this call started at
    seconds: float = 0.0  # this call's time in the loop
    stopped: str | None = None  # the limit that stopped this call before the schedule's end


def schedule_note(saved: Config, cfg: Config, epoch: int, step_in_epoch: int, spe: int,
                  step: int) -> str | None:
    """One line when a resume changes optim.epochs to a count still ahead of the checkpoint:
    the schedule is recomputed for it; the next step's lr under the new schedule, and the lr of
    the checkpoint's last step under the old one (not the old schedule's next step: past the end
    of a cosine that is 0). None otherwise (an equal count finishes at once: `summary` says the
    run is complete)."""
    old, new = saved.optim.epochs, cfg.optim.epochs
    if old == new or new <= epoch:
        return None
    now = lr_at(cfg, epoch, step_in_epoch, spe)
    last = (epoch, step_in_epoch - 1) if step_in_epoch > 0 else (epoch - 1, spe - 1)
    before = lr_at(saved, *last, spe) if last[0] >= 0 else lr_at(saved, 0, 0, spe)
    return (f"oocid: optim.epochs {old} -> {new}: the lr schedule is recomputed for {new} "
            f"epochs; lr {now:.3g} now, {before:.3g} at the checkpoint (step {step})")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def summary(res: RunResult) -> str:
    """The end of a run in words: stopped by a limit, already complete, or what was trained."""
    if res.stopped is not None:
        return f"stopped at step {res.step} ({res.stopped}); continue with --resume"
    steps = res.step - res.first_step
    if steps == 0 and not res.metrics:
        return f"run already complete at epoch {res.epochs} (step {res.step}); nothing to do"
    first = res.metrics[0]["epoch"] if res.metrics else res.epochs
    span = f"epoch {first}" if first == res.epochs else f"epochs {first}-{res.epochs}"
    knn = next((m for m in reversed(res.metrics) if "knn_top1" in m), None)
    acc = f"; kNN top-1 {knn['knn_top1']:.4f} (epoch {knn['epoch']})" if knn else ""
    return (f"done: {span} of {res.total_epochs} ({steps} steps, {_duration(res.seconds)})"
            f"{acc}; checkpoint {res.run_dir / 'last.pt'}")
