"""oocid's building blocks for your own model and training loop (`examples/own_loop.py`).

    bank = OnDiskBank.open("bank.zarr", n_rows=len(dataset), steps_per_epoch=len(loader))
    criterion = NPIDLoss(bank, kind="infonce", k=4096)
    for images, index in loader:                    # index: each image's id in [0, N)
        f = F.normalize(model(images), dim=1)       # (B, 128) unit features
        loss = criterion(f, index)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        criterion.update(f, index)                  # the bank's momentum update, after the step
    bank.commit(step)                               # all of the step's rows durable, or none

`step` counts on across runs on one bank: a second run starts from `bank.committed_step`
(and the model and optimiser saved with it); `commit` refuses a step that goes back.

The bank is the trainer's own: rows on disk, a device cache of whole chunks, crash-safe
commits. The loss is the trainer's too (`oocid.method.npid.bank_loss`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from oocid.bank.cache import ChunkCache
from oocid.bank.create import create_store
from oocid.bank.sizing import cache_rows
from oocid.bank.store import BankStore, open_store
from oocid.config import BankDtype, LossConfig, LossKind, Negatives, ZMode
from oocid.data.batch import mix_seed
from oocid.errors import InputError
from oocid.method.npid import bank_loss, momentum_update
from oocid.method.protocol import Bank
from oocid.method.zest import ZEstimator


class OnDiskBank(ChunkCache):
    """A memory bank of N rows of D floats on disk (`*.zarr` or `*.npy`), cached on `device`.

    Its rows are unit vectors, as `NPIDLoss.update` writes them; a row written otherwise through
    `update` is taken for damage when its chunk is next read from disk (DataError naming the bank
    and the row), as a row damaged on disk is."""

    @classmethod
    def open(cls, path: Path | str, n_rows: int | None = None, dim: int = 128, *,
             device: str | torch.device = "cpu", cache_mb: float = 0.0, steps_per_epoch: int = 1,
             chunk_rows: int = 4096, dtype: BankDtype = "float32", seed: int = 0) -> OnDiskBank:
        """Open the bank at `path`, or create it with `n_rows` random unit rows if absent.
        cache_mb: the device cache's budget (0: the whole bank if it fits a quarter of free
        memory); steps_per_epoch: how fast the window of negatives cycles through the bank."""
        path, dev = Path(path), torch.device(device)
        if path.exists():
            store = open_store(path)
            if n_rows is not None and store.n_rows != n_rows:
                store.close()
                raise InputError(f"{path}: holds {store.n_rows} rows, not {n_rows}")
        elif n_rows is None:
            raise InputError(f"{path}: no bank here; pass n_rows to create one")
        else:
            store = create_store(path, n_rows, dim, dtype=dtype, chunk_rows=chunk_rows,
                                 seed=seed, progress=False)
        budget = cache_rows(cache_mb, store.n_rows, store.dim, dev)
        return cls(store, budget, dev, steps_per_epoch=steps_per_epoch)

    def __init__(self, store: BankStore, budget_rows: int, device: torch.device, *,
                 steps_per_epoch: int = 1) -> None:
        super().__init__(store, budget_rows, device, steps_per_epoch=steps_per_epoch)
        self._updated = False  # rows updated since the last commit

    @property
    def committed_step(self) -> int:
        """The step of the bank's last commit (-1: never committed). A second run on the bank
        continues its step count from here."""
        return self.store.meta.committed_step

    def __repr__(self) -> str:
        cached = min(self.n_slots * self.r, self.n)
        return (f"OnDiskBank('{self.store.path}', rows={self.n}, dim={self.dim}, "
                f"committed_step={self.committed_step}, cache_rows={cached})")

    def update(self, index: Tensor, rows: Tensor) -> None:
        super().update(index, rows)
        self._updated = True

    def commit(self, step: int) -> None:
        """Make every row updated since the last commit durable, all or none, as step `step`.
        Steps count on across runs: a step below `committed_step` is refused (InputError), and
        so is the same step with rows updated since (a second run that counted from 0 again);
        the same step with nothing updated since commits nothing new."""
        have = self.committed_step
        if step < have or (step == have and self._updated):
            since = " already, with rows updated since" if step == have else ""
            raise InputError(f"{self.store.path}: cannot commit step {step}: the bank is "
                             f"committed at step {have}{since} (a later run continues the "
                             "count from bank.committed_step)")
        super().commit(step)
        self._updated = False

    def close(self, raise_errors: bool = True) -> None:
        """Stop the cache's I/O and close the store, always (uncommitted rows are dropped);
        `raise_errors=False` (while another exception propagates) keeps a stored I/O error
        from replacing it."""
        try:
            super().close(raise_errors)
        finally:
            self.store.close()

    def __enter__(self) -> OnDiskBank:
        return self

    def __exit__(self, et: type[BaseException] | None, *exc: object) -> None:
        self.close(raise_errors=et is None)


class NPIDLoss:
    """NPID's loss of unit features against a bank, and the bank's momentum update.

    kind: "infonce" (softmax over the positive and K negatives), "nce" (the paper's NCE; its Z
    `z` = "oneshot" as the official code, or "ema"), or "softmax" (the exact non-parametric
    softmax over all N rows; only where the bank fits the device). negatives: "per-sample"
    (the paper) or "shared" by the batch. momentum: the weight on a row's old value."""

    def __init__(self, bank: Bank, *, kind: LossKind = "infonce", k: int = 4096,
                 temperature: float = 0.07, negatives: Negatives = "per-sample",
                 z: ZMode = "oneshot", momentum: float = 0.5, seed: int = 0) -> None:
        if kind == "auto":
            raise ValueError('NPIDLoss: choose kind "infonce", "nce" or "softmax"')
        self.bank, self.momentum, self.seed, self.calls = bank, momentum, seed, 0
        self.cfg = LossConfig(kind=kind, nce_k=k, temperature=temperature, z=z,
                              negatives=negatives)
        self.zest = ZEstimator(z) if kind == "nce" else None
        self.n_data = bank.n
        self._positives: Tensor | None = None

    def __call__(self, features: Tensor, index: Tensor) -> Tensor:
        """The loss of features (B, D) of the images `index` (B,); remembers their bank rows
        (before this step's update) for `update`."""
        g = torch.Generator(device=self.bank.device)
        g.manual_seed(mix_seed(self.seed, 6, self.calls))
        self.calls += 1
        loss, _, self._positives = bank_loss(features, index, self.bank, self.cfg, self.n_data,
                                             self.zest, g)
        return loss

    @torch.no_grad()
    def update(self, features: Tensor, index: Tensor) -> None:
        """v_i <- normalize(m v_i + (1 - m) f_i) for the batch, after the optimiser step."""
        old = self._positives if self._positives is not None else self.bank.gather(index)
        self.bank.update(index, momentum_update(old, features.detach(), self.momentum))
        self._positives = None
        self.bank.end_step()
