"""Training: the loss goes down, the bank stays unit, a run resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import tiny_config, tiny_nce_step, tiny_npz

import oocid.train.loop as loop_mod
from oocid.bank.cache import ChunkCache
from oocid.bank.create import create_store
from oocid.bank.incore import InCoreBank
from oocid.bank.store import open_store
from oocid.bank.verify import verify_store
from oocid.data.batch import Batch
from oocid.data.writer import write_shards
from oocid.errors import DataError, InputError
from oocid.method.npid import NPIDStep
from oocid.method.zest import ZEstimator
from oocid.models import build_model
from oocid.train.loop import train
from oocid.train.setup import build_optimizer


@pytest.fixture()
def shards(tmp_path: Path) -> tuple[Path, Path]:
    npz = tiny_npz(tmp_path / "tiny.npz")
    tr, va = tmp_path / "train", tmp_path / "val"
    write_shards(npz, tr, shard_size=32, seed=0, progress=False)
    write_shards(tiny_npz(tmp_path / "tiny_val.npz", n=40, seed=1), va, shard_size=32,
                 progress=False)
    return tr, va


@pytest.mark.parametrize("kind", ["softmax", "nce", "infonce"])
def test_loss_goes_down_on_a_fixed_batch(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    # NCE needs N well above K (docs/method.md: one-shot Z is fragile on small data; EMA Z here)
    n = 1024
    cfg = tiny_config(kind=kind, nce_k=64, z="ema", temperature=0.1)
    store = create_store(tmp_path / "b.npy", n, 128, chunk_rows=256)
    bank = InCoreBank(store, torch.device("cpu"))
    model = build_model("small", 1, 128)
    opt = build_optimizer(cfg, model)
    step = NPIDStep(cfg, model, opt, bank, n, ZEstimator("ema") if kind == "nce" else None, 0)
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(32, 1, 16, 16, generator=g), torch.arange(32), torch.zeros(32))
    losses = [step(batch, i, 0.05).loss for i in range(30)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
    rows = bank.all_rows()
    assert torch.allclose(rows.norm(dim=1), torch.ones(n), atol=1e-5)
    store.close()


def test_val_every_tenth_of_the_run_follows_the_epochs_given(tmp_path: Path,
                                                             shards: tuple[Path, Path]) -> None:
    """train.eval_every = -1 (a recipe's): 20 epochs check --val every 2nd epoch."""
    tr, va = shards
    cfg = tiny_config()
    cfg.optim.epochs, cfg.train.eval_every = 20, -1
    train(cfg, tr, tmp_path / "bank.zarr", tmp_path / "run", val=va, progress=False,
          log=lambda m: None)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if "knn_top1" in r] == list(range(2, 21, 2))


def test_a_resume_without_the_runs_val_says_so(tmp_path: Path, shards: tuple[Path, Path]
                                               ) -> None:
    tr, va = shards
    args = (tiny_config(), tr, tmp_path / "bank.zarr", tmp_path / "run")
    train(*args, val=va, max_steps=2, progress=False, log=lambda m: None)
    said: list[str] = []
    train(*args, resume=True, max_steps=1, progress=False, log=said.append)
    warn = [s for s in said if "--val" in s]
    assert warn == [f"oocid: warning: the run checked --val {va.resolve()}; this resume has no "
                    f"--val, so it checks nothing (pass --val {va.resolve()} to keep the "
                    "checks)"], said
    said.clear()
    train(*args, val=va, resume=True, max_steps=1, progress=False, log=said.append)
    assert not [s for s in said if "warning" in s], said


def test_train_writes_run_and_bank(tmp_path: Path, shards: tuple[Path, Path]) -> None:
    tr, va = shards
    res = train(tiny_config(), tr, tmp_path / "bank.zarr", tmp_path / "run", val=va,
                progress=False, log=lambda m: None)
    assert res.epochs == 3 and res.step == 3 * 3
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert 0.0 <= lines[-1]["knn_top1"] <= 1.0
    assert (tmp_path / "run" / "last.pt").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["loss"]["kind"] == "softmax"
    rep = verify_store(tmp_path / "bank.zarr")
    assert rep.ok, rep.problems
    with open_store(tmp_path / "bank.zarr") as st:
        assert st.meta.committed_step == 9


def assert_same_run(tmp_path: Path, full: Any, pieces: list[Any]) -> None:
    """Run a/ (uninterrupted) and run b/ (stopped and resumed): same losses, bank and weights."""
    assert [m["loss"] for m in full.metrics] == [m["loss"] for p in pieces for m in p.metrics]
    with open_store(tmp_path / "a.npy") as a, open_store(tmp_path / "b.npy") as b:
        assert np.array_equal(a.read_rows(0, a.n_rows), b.read_rows(0, b.n_rows))
    sa = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    sb = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_equals_uninterrupted(tmp_path: Path, shards: tuple[Path, Path]) -> None:
    tr, _ = shards
    cfg = tiny_config(kind="nce", nce_k=8, z="ema")
    full = train(cfg, tr, tmp_path / "a.npy", tmp_path / "a", progress=False, log=lambda m: None)
    part = train(cfg, tr, tmp_path / "b.npy", tmp_path / "b", progress=False, max_epochs=1,
                 log=lambda m: None)
    assert part.epochs == 1
    rest = train(cfg, tr, tmp_path / "b.npy", tmp_path / "b", progress=False, resume=True,
                 log=lambda m: None)
    assert rest.epochs == 3
    assert_same_run(tmp_path, full, [part, rest])


def test_bad_inputs(tmp_path: Path, shards: tuple[Path, Path]) -> None:
    tr, _ = shards
    with pytest.raises(InputError, match="nce_k"):
        train(tiny_config(kind="nce", nce_k=4096), tr, tmp_path / "b.zarr", tmp_path / "r",
              progress=False)
    create_store(tmp_path / "wrong.zarr", 50, 128).close()
    with pytest.raises(DataError, match="wrong.zarr"):
        train(tiny_config(), tr, tmp_path / "wrong.zarr", tmp_path / "r2", progress=False)
    create_store(tmp_path / "wrongd.npy", 96, 64).close()
    with pytest.raises(DataError, match="wrongd.npy"):
        train(tiny_config(), tr, tmp_path / "wrongd.npy", tmp_path / "r3", progress=False)
    with pytest.raises(InputError, match="no bank to resume"):
        train(tiny_config(), tr, tmp_path / "none.zarr", tmp_path / "r4", progress=False,
              resume=True)


def test_resume_mid_epoch_equals_uninterrupted(tmp_path: Path, shards: tuple[Path, Path]) -> None:
    """Stop inside an epoch at a step checkpoint, resume: same losses, bank and weights."""
    tr, _ = shards
    cfg = tiny_config(kind="nce", nce_k=8, z="ema")
    cfg.train.checkpoint_every = 2
    full = train(cfg, tr, tmp_path / "a.npy", tmp_path / "a", progress=False, log=lambda m: None)
    part = train(cfg, tr, tmp_path / "b.npy", tmp_path / "b", progress=False, max_steps=4,
                 log=lambda m: None)
    assert part.step == 4 and part.epochs == 1  # 3 steps per epoch: stopped inside epoch 2
    rest = train(cfg, tr, tmp_path / "b.npy", tmp_path / "b", progress=False, resume=True,
                 log=lambda m: None)
    assert rest.step == full.step == 9
    assert_same_run(tmp_path, full, [part, rest])


@pytest.mark.parametrize("cache_mb", [0.0, 0.035])  # the whole bank; 4 of 6 chunks of 16 rows
def test_float16_bank_resumes_bit_identical(tmp_path: Path, cache_mb: float,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A float16 bank, full or partial cache: the cache holds its rows at float16 precision,
    so stopping mid-epoch and resuming from the bank on disk is exact, as for float32."""
    write_shards(tiny_npz(tmp_path / "tiny.npz"), tmp_path / "tr", shard_size=16, seed=0,
                 progress=False)
    tr = tmp_path / "tr"
    cfg = tiny_config(kind="infonce", nce_k=16)
    cfg.bank.dtype, cfg.bank.cache_mb = "float16", cache_mb
    cfg.data.in_memory, cfg.data.workers = "no", 0
    cfg.train.checkpoint_every = 2
    caches: list[ChunkCache] = []
    make = loop_mod.make_cache
    monkeypatch.setattr(loop_mod, "make_cache",
                        lambda *a, **k: caches.append(make(*a, **k)) or caches[-1])
    full = train(cfg, tr, tmp_path / "a.npy", tmp_path / "a", progress=False, log=lambda m: None)
    assert caches[0].full == (cache_mb == 0)
    assert caches[0].writebacks > 0 or caches[0].full  # evictions wrote rows between commits
    part = train(cfg, tr, tmp_path / "b.npy", tmp_path / "b", progress=False, max_steps=4,
                 log=lambda m: None)
    assert part.step == 4
    rest = train(cfg, tr, tmp_path / "b.npy", tmp_path / "b", progress=False, resume=True,
                 log=lambda m: None)
    assert rest.step == full.step == 9
    assert_same_run(tmp_path, full, [part, rest])


def test_an_error_in_training_is_not_hidden_by_a_failed_write_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step fails while the cache's I/O thread holds the error of a write-back: train raises
    the step's error, not the stored one, and the I/O thread is stopped."""
    write_shards(tiny_npz(tmp_path / "tiny.npz"), tmp_path / "tr", shard_size=16, seed=0,
                 progress=False)
    cfg = tiny_config(kind="infonce", nce_k=16)
    cfg.bank.cache_mb = 0.035  # 4 of 6 chunks
    threads = []

    def failing_loop(run: Any) -> None:
        bank = run.bank

        def write_part(chunks: object) -> None:
            raise OSError(28, "No space left on device")

        bank.store.write_part = write_part
        pool = [c for c in range(bank.n_chunks) if c not in bank.window][:bank.n_slots - bank.w + 1]
        bank.update(torch.arange(pool[0] * bank.r, pool[0] * bank.r + 4), torch.eye(4, 128))
        for c in pool[1:]:  # through the pool: the first chunk is evicted, its write fails
            bank.gather(torch.tensor([c * bank.r]))
        threads.append(bank.io.thread)
        with bank.io.cond:
            bank.io.cond.wait_for(lambda: bank.io.inflight == 0)
        assert isinstance(bank.io.error, OSError)
        raise RuntimeError("the step failed")

    monkeypatch.setattr(loop_mod, "_loop", failing_loop)
    with pytest.raises(RuntimeError, match="the step failed"):
        train(cfg, tmp_path / "tr", tmp_path / "b.npy", tmp_path / "r", progress=False,
              log=lambda m: None)
    assert len(threads) == 1 and not threads[0].is_alive()


def test_gradient_accumulation_runs_and_counts_steps(tmp_path: Path,
                                                     shards: tuple[Path, Path]) -> None:
    tr, _ = shards
    cfg = tiny_config()
    cfg.data.batch_size = 16
    cfg.optim.accumulate = 2  # 96 samples / 16 = 6 micro-batches = 3 optimiser steps
    res = train(cfg, tr, tmp_path / "b.npy", tmp_path / "r", progress=False, log=lambda m: None)
    assert res.step == 9
    assert all(np.isfinite(m["loss"]) and m["images"] == 96 for m in res.metrics)


def test_non_finite_features_are_skipped_and_counted(tmp_path: Path,
                                                     shards: tuple[Path, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN from the model (injected) never reaches the bank: the step is skipped and counted."""
    from oocid import models

    tr, _ = shards
    real = models.Embedder.forward
    calls = {"n": 0}

    def poisoned(self: models.Embedder, x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        f = real(self, x)
        return f * float("nan") if calls["n"] in (2, 5) else f

    monkeypatch.setattr(models.Embedder, "forward", poisoned)
    res = train(tiny_config(), tr, tmp_path / "b.npy", tmp_path / "r", progress=False,
                log=lambda m: None)
    assert sum(m["skipped_steps"] for m in res.metrics) == 2
    assert verify_store(tmp_path / "b.npy").ok


def test_non_finite_batch_does_not_poison_z(tmp_path: Path) -> None:
    """A NaN batch is skipped before it reaches the NCE normaliser's estimate."""
    step, zest, store = tiny_nce_step(tmp_path / "b.npy", z="oneshot")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 16, 16, generator=g)
    bad = step(Batch(x * float("nan"), torch.arange(16), torch.zeros(16)), 0, 0.03)
    assert bad.skipped and zest.value is None
    good = step(Batch(x, torch.arange(16), torch.zeros(16)), 1, 0.03)
    assert not good.skipped and zest.value is not None and np.isfinite(zest.value)
    store.close()


def test_a_skipped_batch_leaves_the_moving_average_z_as_it_was(tmp_path: Path) -> None:
    """The loss (and Z's estimate) runs before the one host sync that finds the NaN; the
    skipped step restores Z, so an EMA Z after good, NaN, good equals good, good."""
    n = 512
    cfg = tiny_config(kind="nce", nce_k=32, z="ema")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 16, 16, generator=g)
    values = []
    for with_nan in (False, True):
        store = create_store(tmp_path / f"b{with_nan}.npy", n, 128, chunk_rows=128)
        bank = InCoreBank(store, torch.device("cpu"))
        torch.manual_seed(0)
        model = build_model("small", 1, 128)
        zest = ZEstimator("ema")
        step = NPIDStep(cfg, model, build_optimizer(cfg, model), bank, n, zest, 0)
        step(Batch(x, torch.arange(16), torch.zeros(16)), 0, 0.03)
        if with_nan:
            before = zest.state_dict()
            assert step(Batch(x * float("nan"), torch.arange(16), torch.zeros(16)), 1, 0.03).skipped
            assert zest.state_dict() == before
        step(Batch(x, torch.arange(16, 32), torch.zeros(16)), 2, 0.03)
        values.append(zest.value)
        store.close()
    assert values[0] == values[1] and values[0] is not None


def test_local_order_is_a_permutation_that_keeps_batches_on_few_chunks() -> None:
    from oocid.data.memory import local_order

    valid = torch.tensor([i for i in range(1000) if i % 37 != 5])  # some rows skipped as bad
    g = torch.Generator().manual_seed(0)
    order = local_order(valid, chunk_rows=50, group_chunks=2, g=g)
    assert sorted(order.tolist()) == valid.tolist()
    for s in range(0, len(order), 64):  # batch 64 <= a group's rows: at most 2 groups + 1
        assert len(torch.unique(order[s:s + 64] // 50)) <= 2 * 2 + 1
    again = local_order(valid, 50, 2, torch.Generator().manual_seed(0))
    other = local_order(valid, 50, 2, torch.Generator().manual_seed(1))
    assert torch.equal(order, again) and not torch.equal(order, other)


def test_in_memory_data_with_a_partial_cache_reads_each_chunk_few_times(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A global permutation touches every chunk every step and thrashes the positives' pool;
    the chunk-local order keeps loads per epoch near the number of chunks."""
    import oocid.train.loop as tr_mod

    npz = tiny_npz(tmp_path / "t.npz", n=640)
    shards = tmp_path / "s"
    write_shards(npz, shards, shard_size=16, seed=0, progress=False)  # 40 chunks
    cfg = tiny_config(kind="infonce", nce_k=64, negatives="shared")
    cfg.optim.epochs = 2
    cfg.bank.cache_mb = 16 * 12 * 128 * 4 / 2**20  # 12 chunks of 16 rows: 30 % of the bank
    caches: list[Any] = []
    make = tr_mod.make_cache
    monkeypatch.setattr(tr_mod, "make_cache", lambda *a, **k: caches.append(make(*a, **k)) or caches[-1])
    res = train(cfg, shards, tmp_path / "b.npy", tmp_path / "run", progress=False, log=lambda m: None)
    (cache,) = caches
    assert not cache.full and res.step == 2 * 20
    assert cache.chunk_loads <= 2 * 40 * 2, cache.chunk_loads  # window once + positives once, per epoch
    assert verify_store(tmp_path / "b.npy").ok


def test_auto_loss_is_softmax_when_the_bank_fits_and_infonce_when_not(
        tmp_path: Path, shards: tuple[Path, Path]) -> None:
    from oocid.config import LossConfig
    from oocid.train.setup import cache_budget_rows, resolve_loss

    assert LossConfig().kind == "auto"
    cfg = tiny_config(kind="auto")
    cpu = torch.device("cpu")
    assert resolve_loss(cfg, 96, cache_budget_rows(cfg, None, cpu, 96)).loss.kind == "softmax"
    cfg.bank.cache_mb = 16 * 5 * 128 * 4 / 2**20  # 5 chunks of 16 rows out of 96: does not fit
    said: list[str] = []
    out = resolve_loss(cfg, 96, cache_budget_rows(cfg, None, cpu, 96), said.append)
    assert out.loss.kind == "infonce" and cfg.loss.kind == "auto" and "does not fit" in said[0]
    # a run records the resolved kind and resumes with "auto" again
    tr = tmp_path / "s16"
    write_shards(shards[0].parent / "tiny.npz", tr, shard_size=16, seed=0, progress=False)
    cfg.loss.nce_k, cfg.optim.epochs = 16, 2
    train(cfg, tr, tmp_path / "b.npy", tmp_path / "run", progress=False, max_epochs=1, log=lambda m: None)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["loss"]["kind"] == "infonce"
    res = train(cfg, tr, tmp_path / "b.npy", tmp_path / "run", progress=False, resume=True,
                log=lambda m: None)
    assert res.epochs == 2


def _cpu_scalers(monkeypatch: pytest.MonkeyPatch, **kw: Any) -> list[Any]:
    """Give every NPIDStep a CPU GradScaler (fp16's scaler, testable without CUDA)."""
    from oocid.method import npid

    made: list[Any] = []

    def make(precision: str) -> Any:
        made.append(torch.amp.GradScaler("cpu", **kw))
        return made[-1]

    monkeypatch.setattr(npid, "make_grad_scaler", make)
    return made


def test_grad_scaler_state_is_checkpointed_and_restored(
        tmp_path: Path, shards: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 resumes at the saved loss scale, not the initial one (the scale doubles each step
    here, so it tells how many steps the scaler has seen)."""
    tr, _ = shards
    made = _cpu_scalers(monkeypatch, init_scale=2.0**4, growth_interval=1)
    cfg = tiny_config()
    res = train(cfg, tr, tmp_path / "a.npy", tmp_path / "a", progress=False, log=lambda m: None)
    assert [m["scaler_skips"] for m in res.metrics] == [0, 0, 0]  # reported with a scaler
    full_scale = made[-1].get_scale()
    assert full_scale == 2.0 ** (4 + 9)
    train(cfg, tr, tmp_path / "b.npy", tmp_path / "b", progress=False, max_steps=4,
          log=lambda m: None)
    saved = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["scaler"]
    assert saved["scale"] == 2.0 ** (4 + 4)
    train(cfg, tr, tmp_path / "b.npy", tmp_path / "b", progress=False, resume=True,
          log=lambda m: None)
    assert made[-1].get_scale() == full_scale


def test_steps_the_grad_scaler_skips_are_counted(tmp_path: Path) -> None:
    """An inf gradient (injected): the scaler skips the optimiser step (the weights stay),
    lowers the scale, and the step counts it; a finite step after it is not counted."""
    n = 256
    cfg = tiny_config(kind="infonce", nce_k=32)
    store = create_store(tmp_path / "b.npy", n, 128, chunk_rows=128)
    bank = InCoreBank(store, torch.device("cpu"))
    model = build_model("small", 1, 128)
    step = NPIDStep(cfg, model, build_optimizer(cfg, model), bank, n, None, 0)
    step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    poison = {"on": True}
    first = next(model.parameters())
    first.register_hook(lambda g: g * float("inf") if poison["on"] else g)
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(16, 1, 16, 16, generator=g), torch.arange(16), torch.zeros(16))
    before = [p.detach().clone() for p in model.parameters()]
    out = step(batch, 0, 0.05)
    assert not out.skipped and step.scaler_skips == 1 and step.skipped == 0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert step.scaler.get_scale() == 2.0**15
    poison["on"] = False
    step(batch, 1, 0.05)
    assert step.scaler_skips == 1 and step.scaler.get_scale() == 2.0**15
    assert not torch.equal(before[0], first)
    store.close()
