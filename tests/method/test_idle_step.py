"""A step in which no process has a sample (every one of its batches was bad): all processes
skip it alike, with no update of any kind; weight decay and momentum would otherwise move the
weights, and Z's agreement would average in a zero."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import tiny_nce_step

from oocid.data.batch import Batch
from oocid.distributed.sync import DistSync
from oocid.distributed.world import World


class NobodyHasASample:
    """The step's agreements as the other processes would answer when none has a sample."""

    def batch_weight(self, n: int) -> float | None:
        return None if n == 0 else 1.0

    def all_finite(self, ok: bool) -> bool:
        return ok


def test_no_sample_anywhere_means_no_update(tmp_path: Path) -> None:
    step, zest, store = tiny_nce_step(tmp_path / "b.npy")
    model, bank = step.model, step.bank
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    step(Batch(x, torch.arange(16), torch.zeros(16)), 0, 0.03)  # momentum buffers exist now
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = [s["momentum_buffer"].clone() for s in step.optimizer.state.values()]
    rows, z = bank.all_rows().clone(), zest.value
    step.sync, step.idle_input = NobodyHasASample(), torch.zeros(2, 1, 16, 16)
    out = step(None, 1, 0.03)
    assert not out.skipped and out.z is None
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(s["momentum_buffer"], b)
               for s, b in zip(step.optimizer.state.values(), buffers, strict=True))
    assert torch.equal(bank.all_rows(), rows) and zest.value == z
    store.close()


def test_the_agreement_says_when_no_process_has_a_sample() -> None:
    sync = DistSync(World(), torch.device("cpu"))
    assert sync.batch_weight(0) is None
    assert sync.batch_weight(5) == 1.0
