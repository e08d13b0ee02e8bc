"""Which node-local bank may be brought to the run's committed step (`BankStore.settle`): each
machine's bank of a run started with `--node-local-bank` commits after rank 0's, so a kill in
between leaves it one commit behind; and it takes rank 0's bank id, so that every part of the
run carries the id its checkpoints record."""

from __future__ import annotations

from pathlib import Path

from oocid.errors import DataError


def check_settle(path: Path, have: int, mine: str | None, step: int, previous: int | None,
                 bank_id: str | None) -> None:
    """DataError unless the bank at `path`, committed at step `have` with id `mine`, is this
    run's: at the run's last committed `step` or the one before (`previous`, None if unknown),
    and of rank 0's `bank_id` (None: unknown) unless it has no id or was never trained (it then
    adopts the run's)."""
    if bank_id is not None and mine not in (None, bank_id) and have >= 0:
        raise DataError(f"{path}: is bank {mine}, but the run's (rank 0's) is bank {bank_id}: "
                        "another run's bank")
    if have > step:
        raise DataError(f"{path}: holds step {have}, ahead of the run's last commit (step "
                        f"{step}): another run's bank")
    if previous is not None and have not in (step, previous):
        raise DataError(f"{path}: holds step {have}, but the run's last two commits are steps "
                        f"{previous} and {step}: an older copy of this machine's bank, or "
                        "another run's")
