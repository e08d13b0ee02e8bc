"""What a run says about itself (oocid/train/report.py)."""

from __future__ import annotations

import copy

import pytest
from helpers import tiny_config

from oocid.train.report import schedule_note


@pytest.mark.parametrize(("epoch", "steps_done", "want"), [
    (1, 0, "lr 0.015 now, 5.71e-05 at the checkpoint (step 36)"),  # the old schedule's end
    (0, 18, "lr 0.0256 now, 0.0163 at the checkpoint (step 18)"),  # mid-epoch
])
def test_a_recomputed_schedule_names_the_checkpoints_own_lr(epoch: int, steps_done: int,
                                                             want: str) -> None:
    """Cosine over 1 epoch of 36 steps, resumed with 2 epochs: the checkpoint's last step ran at
    lr 5.71e-05, not the 0 that the old schedule gives past its end (what a user read as
    "0 at the checkpoint")."""
    saved = tiny_config()
    saved.optim.schedule, saved.optim.lr, saved.optim.epochs = "cosine", 0.03, 1
    cfg = copy.deepcopy(saved)
    cfg.optim.epochs = 2
    step = epoch * 36 + steps_done
    note = schedule_note(saved, cfg, epoch, steps_done, 36, step)
    assert note == f"oocid: optim.epochs 1 -> 2: the lr schedule is recomputed for 2 epochs; {want}"


def test_no_note_when_the_epoch_count_is_unchanged() -> None:
    cfg = tiny_config()
    assert schedule_note(cfg, copy.deepcopy(cfg), 1, 0, 36, 36) is None
