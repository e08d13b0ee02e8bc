"""Bringing a node-local bank to the run's committed step (`BankStore.settle`): each machine's
bank of a run started with `--node-local-bank` commits after rank 0's, so a kill in between
leaves it one commit behind; and it takes rank 0's bank id, so that every part of the run
carries the id its checkpoints record."""

from __future__ import annotations

from typing import TYPE_CHECKING

from oocid.bank.journal import read_journal, write_journal
from oocid.errors import DataError

if TYPE_CHECKING:
    from oocid.bank.store import BankStore


def settle_store(store: BankStore, step: int, previous: int | None = None,
                 bank_id: str | None = None) -> None:
    """Bring `store` (opened with `recover=False`) to the run's committed `step` (rank 0's
    bank's; `previous`: the one before, None if unknown): replay its own record, then, one
    commit behind (killed between rank 0's commit and its own), commit its parts, all of that
    step, or else discard them. At any other step: DataError. Then it takes rank 0's `bank_id`
    (None: keep its own): a bank not trained yet, or one of a version without an id, adopts it;
    a trained bank with another id is another run's (DataError)."""
    s = store
    s._check_writable()
    with s._lock:
        s._journal_tmp.unlink(missing_ok=True)
        journals = s._committed()
        if journals is not None:
            s._apply(journals)
        have, mine = s.meta.committed_step, s.meta.bank_id
        if bank_id is not None and mine not in (None, bank_id) and have >= 0:
            raise DataError(f"{s.path}: is bank {mine}, but the run's (rank 0's) is bank "
                            f"{bank_id}: another run's bank")
        if have > step:
            raise DataError(f"{s.path}: holds step {have}, ahead of the run's last commit (step "
                            f"{step}): another run's bank")
        if previous is not None and have not in (step, previous):
            raise DataError(f"{s.path}: holds step {have}, but the run's last two commits are "
                            f"steps {previous} and {step}: an older copy of this machine's bank, "
                            "or another run's")
        files = s._part_files()
        if have < step and files:
            parts = [read_journal(p, s.meta) for p in files]  # in writer, seq order
            record = write_journal(s._journal_tmp, s._journal, [], s.meta.dtype, s.dim, step,
                                   s.path, tuple(p.name for p in files))
            s._apply([*parts, record])
        elif have < step:
            s._set_step(step)
        s._rows.cleanup()
        s._recover()  # discards the parts still here: of a step rank 0 never committed
        s._upgrade(bank_id)  # a kill cannot leave it trained under an id of its own
