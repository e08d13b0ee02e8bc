"""The public API for your own loop: `OnDiskBank` and `NPIDLoss` (oocid/api.py), and the
example that uses them (examples/own_loop.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import oocid
from oocid.bank.store import open_store
from oocid.errors import DataError, InputError
from oocid.method.npid import momentum_update

ROOT = Path(__file__).resolve().parents[1]


def test_public_names_import_lazily() -> None:
    from oocid.api import NPIDLoss, OnDiskBank
    from oocid.method.knn import weighted_knn

    assert oocid.OnDiskBank is OnDiskBank and oocid.NPIDLoss is NPIDLoss
    assert oocid.weighted_knn is weighted_knn and oocid.momentum_update is momentum_update
    with pytest.raises(AttributeError):
        _ = oocid.no_such_name


@pytest.mark.parametrize("kind", ["infonce", "nce", "softmax"])
def test_loss_then_update_moves_exactly_the_batch_rows(tmp_path: Path, kind: str) -> None:
    """One step of your own loop: the loss is finite and has a gradient; `update` writes
    normalize(m v + (1 - m) f) into the batch's rows only, from their values before the step."""
    with oocid.OnDiskBank.open(tmp_path / "b.npy", n_rows=300, dim=8, chunk_rows=50) as bank:
        before = bank.all_rows().clone()
        crit = oocid.NPIDLoss(bank, kind=kind, k=20, momentum=0.5)
        index = torch.tensor([3, 77, 150, 299])
        f = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
        loss = crit(f, index)
        loss.backward()
        assert torch.isfinite(loss) and f.grad is not None and bool(f.grad.abs().sum() > 0)
        crit.update(f, index)
        after = bank.all_rows().clone()
        want = momentum_update(before[index], f.detach(), 0.5)
        assert torch.equal(after[index], want)
        rest = torch.ones(300, dtype=torch.bool)
        rest[index] = False
        assert torch.equal(after[rest], before[rest])
        bank.commit(1)
    store = open_store(tmp_path / "b.npy")
    assert store.meta.committed_step == 1
    assert np.array_equal(store.read_rows(0, 300), after.numpy())
    store.close()


def test_open_refuses_a_bank_of_another_size(tmp_path: Path) -> None:
    oocid.OnDiskBank.open(tmp_path / "b.npy", n_rows=100, dim=4, chunk_rows=50).close()
    with pytest.raises(InputError, match="holds 100 rows, not 90"):
        oocid.OnDiskBank.open(tmp_path / "b.npy", n_rows=90)
    with pytest.raises(InputError, match="no bank here"):
        oocid.OnDiskBank.open(tmp_path / "none.npy")


def test_rows_that_are_not_unit_vectors_are_refused_when_read_back(tmp_path: Path) -> None:
    """What the class says: a raw `update` of rows of norm 2, committed, stops the next read of
    their chunk with the damage error, not a silent use (the only check: the update itself is
    not checked, to keep a device sync out of every step)."""
    path = tmp_path / "b.zarr"
    with oocid.OnDiskBank.open(path, n_rows=64, dim=8, chunk_rows=16) as bank:
        idx = torch.arange(4)
        bank.update(idx, 2 * bank.gather(idx))
        bank.commit(0)
    with pytest.raises(DataError, match=r"b\.zarr: row 0 has norm 2, not 1"):
        oocid.OnDiskBank.open(path)  # the whole bank fits the cache: read as it opens


def test_commit_refuses_a_step_that_goes_back(tmp_path: Path) -> None:
    """A second run that counts its steps from 0 again: commit(9) on a bank committed at step 18
    is refused, naming the bank and both steps, and leaves the bank at 18; so is step 18 again
    with rows updated since; step 18 with nothing updated since, and a later step, commit."""
    path = tmp_path / "b.zarr"
    idx = torch.arange(4)
    with oocid.OnDiskBank.open(path, n_rows=64, dim=8, chunk_rows=16) as bank:
        assert bank.committed_step == -1
        bank.update(idx, bank.gather(idx).flip(0))
        bank.commit(18)
        assert bank.committed_step == 18
        assert repr(bank) == (f"OnDiskBank('{path}', rows=64, dim=8, committed_step=18, "
                              "cache_rows=64)")
    with oocid.OnDiskBank.open(path) as bank:
        assert bank.committed_step == 18
        bank.commit(18)  # nothing updated since: nothing new
        bank.update(idx, bank.gather(idx).flip(0))
        with pytest.raises(InputError, match=r"b\.zarr: cannot commit step 9: the bank is "
                                             r"committed at step 18 \("):
            bank.commit(9)
        with pytest.raises(InputError, match="cannot commit step 18: .* at step 18 already"):
            bank.commit(18)
        assert bank.committed_step == 18
        bank.commit(19)
    with open_store(path, read_only=True) as store:
        assert store.meta.committed_step == 19


def test_example_own_loop_runs(tmp_path: Path) -> None:
    """examples/own_loop.py as a user runs it: trains an epoch and commits the bank; run again
    on the same bank, it continues the step count (8 steps an epoch: 8, then 16)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bank = tmp_path / "bank.zarr"
    for _ in range(2):
        out = subprocess.run([sys.executable, str(ROOT / "examples" / "own_loop.py"), str(bank),
                              "1"], capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("epoch 1: loss ")
    store = open_store(bank)
    assert store.meta.committed_step == 2 * 512 // 64
    rows = store.read_rows(0, store.n_rows)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-4)
    store.close()
