"""The NPID training loop: stream -> model -> loss against the bank -> step -> bank update.

The bank update happens here, explicitly, after the optimiser step (not hidden in autograd):
    v_i <- normalize(m * v_i + (1 - m) * f_i)      for the batch's indices only.
Randomness (data order, augmentation, negatives) is derived from (seed, epoch, step), so a run
resumed from a checkpoint repeats the uninterrupted run exactly.
B batch, K negatives, D dims, N bank rows.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from oocid import __version__
from oocid.bank.cache import ChunkCache, default_cache_rows, default_pool_chunks
from oocid.bank.lock import BankLock
from oocid.bank.store import BankStore, check_matches, create_store, open_store
from oocid.checkpoint import (
    checkpoint_for_step,
    finish_checkpoint,
    list_checkpoints,
    load_checkpoint,
    repair_metrics,
    save_checkpoint,
)
from oocid.config import Config, auto_loss, config_from_dict
from oocid.data.shards import Manifest, read_manifest
from oocid.data.stream import (
    Batch,
    InMemoryData,
    eval_batches,
    extract_features,
    image_channels,
    make_train_data,
)
from oocid.device import keep_large_buffers, resolve_device, resolve_precision
from oocid.errors import DataError, InputError
from oocid.eval.evaluate import (
    check_same_classes,
    knn_against,
    num_classes_of,
    read_labels,
    store_chunks,
    tensor_chunks,
)
from oocid.method.npid import NPIDStep, StepOut
from oocid.method.zest import ZEstimator
from oocid.models import Embedder, build_model
from oocid.train.tblog import TensorBoardLog, require_tensorboard


def config_diff(old: Config, new: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """['optim.lr 0.03 -> 0.1', ...] for every key that differs (dotted names)."""
    out = []
    a, b = old.to_dict(), new.to_dict()
    for sec in a:
        for key in a[sec]:
            name = f"{sec}.{key}"
            if name not in ignore and a[sec][key] != b[sec][key]:
                out.append(f"{name} {a[sec][key]!r} -> {b[sec][key]!r}")
    return out


def lr_at(cfg: Config, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """Learning rate: x gamma at each milestone epoch (official), or cosine per iteration to 0."""
    o = cfg.optim
    if o.schedule == "cosine":
        t = (epoch * steps_per_epoch + step_in_epoch) / max(1, o.epochs * steps_per_epoch)
        return o.lr * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    return o.lr * o.gamma ** sum(1 for m in o.milestones if epoch >= m)


@dataclass
class RunResult:
    run_dir: Path
    epochs: int
    step: int
    metrics: list[dict[str, Any]] = field(default_factory=list)


def _open_or_create_bank(cfg: Config, manifest: Manifest, bank_path: Path, resume: bool
                         ) -> BankStore:
    if bank_path.exists():
        store = open_store(bank_path)
        check_matches(store, manifest.n, cfg.model.dim, manifest.identity)
        if not resume and store.meta.committed_step >= 0:
            store.close()
            raise InputError(f"{bank_path}: already holds a trained bank (step "
                             f"{store.meta.committed_step}); pass --resume to continue it or "
                             "choose a new --bank path")
        return store
    if resume:
        raise InputError(f"{bank_path}: no bank to resume")
    return create_store(bank_path, manifest.n, cfg.model.dim, dtype=cfg.bank.dtype,
                        chunk_rows=manifest.shard_size, manifest_id=manifest.identity,
                        momentum=cfg.bank.momentum, seed=cfg.bank.seed)


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                           weight_decay=cfg.optim.weight_decay)


def train(cfg: Config, shards: Path, bank_path: Path, run_dir: Path, *, val: Path | None = None,
          resume: bool = False, progress: bool = True, max_epochs: int | None = None,
          max_steps: int | None = None, log: Any = None) -> RunResult:
    """Train NPID on a shard set with the bank at `bank_path`; outputs go to `run_dir`.

    `max_epochs` / `max_steps` stop after that many epochs / optimiser steps of this call with
    a checkpoint (the schedule still spans cfg.optim.epochs); `--resume` continues exactly."""
    say = log if log is not None else (lambda msg: print(msg, file=sys.stderr))
    manifest = read_manifest(shards)
    val_manifest = read_manifest(val) if val is not None else None
    if val_manifest is not None:
        check_same_classes(manifest, val_manifest, val)  # type: ignore[arg-type]
    device = resolve_device(cfg.train.device)
    cfg = resolve_loss(cfg, manifest.n, device, say)
    lc = cfg.loss
    if lc.kind in ("nce", "infonce") and lc.nce_k >= manifest.n:
        raise InputError(f"loss.nce_k = {lc.nce_k} negatives needs more than {manifest.n} samples "
                         f"({shards}); lower it or use loss.kind = \"softmax\" for small sets")
    if cfg.train.tensorboard:
        require_tensorboard()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    keep_large_buffers()  # the step's multi-MB buffers stay mapped between steps (oocid.method.kernels)
    if not resume and list_checkpoints(run_dir):
        raise InputError(f"{run_dir}: already holds checkpoints; pass --resume or choose "
                         "another --out")
    with BankLock(bank_path) as lock:
        if lock.took_over:
            say(f"oocid: took over the stale lock of a trainer that died ({lock.path})")
        store = _open_or_create_bank(cfg, manifest, bank_path, resume)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            return _train(cfg, manifest, val_manifest, store, run_dir, device, resume, progress,
                          max_epochs, max_steps, say)
        finally:
            store.close()


def _train(cfg: Config, manifest: Manifest, val_manifest: Manifest | None, store: BankStore,
           run_dir: Path, device: torch.device, resume: bool, progress: bool,
           max_epochs: int | None, max_steps: int | None, say: Any) -> RunResult:
    torch.manual_seed(cfg.train.seed)
    channels = image_channels(manifest)
    model = build_model(cfg.model.arch, channels, cfg.model.dim).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = build_optimizer(cfg, model)
    zest = ZEstimator(cfg.loss.z, cfg.loss.z_momentum) if cfg.loss.kind == "nce" else None
    epoch, step = 0, 0
    bank_state = None
    partial: dict[str, Any] | None = None
    if resume and store.meta.committed_step < 0:
        # killed before the first bank commit: any checkpoint here was never paired with the bank
        say(f"oocid: {store.path} has no committed step yet; starting {run_dir} from the beginning")
        resume = False
    if resume:
        path = checkpoint_for_step(run_dir, store.meta.committed_step)
        state = load_checkpoint(path)
        saved = config_from_dict(state["config"], str(path))
        diff = config_diff(saved, cfg, ignore=("optim.epochs", "train.tensorboard"))
        if diff:
            raise InputError(f"{path}: was written with a different config ({', '.join(diff)}); "
                             f"resume with the config saved in {run_dir / 'config.json'}")
        if cfg.optim.epochs < int(state["epoch"]):
            raise InputError(f"{path}: has already trained {state['epoch']} epochs; "
                             f"optim.epochs = {cfg.optim.epochs} is fewer")
        if state["manifest_id"] != manifest.identity:
            raise DataError(f"{path}: belongs to other shards than {manifest.root}")
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        if zest is not None and state.get("z") is not None:
            zest.load_state_dict(state["z"])
        epoch, step = int(state["epoch"]), int(state["step"])
        bank_state = state.get("bank_cache")
        partial = state.get("partial_epoch")
        repair_metrics(run_dir / "metrics.jsonl", epoch, state.get("epoch_metrics"))
        torch.set_rng_state(state["rng"]["torch"])
        say(f"oocid: resumed {run_dir} at epoch {epoch}, step {step}")
    (run_dir / "config.json").write_text(cfg.to_json() + "\n")

    cache_partial = cache_budget_rows(cfg, store, device) < store.n_rows
    data = make_train_data(manifest, cfg.data, cfg.train.seed, device, progress,
                           chunk_rows=store.chunk_rows if cache_partial else 0)
    spe = -(-data.steps_per_epoch() // cfg.optim.accumulate)  # optimiser steps (end_step calls)
    bank = make_cache(cfg, store, device, spe, in_memory=isinstance(data, InMemoryData))
    window_rows = bank.w * bank.r
    if not bank.full and cfg.loss.kind != "softmax" and window_rows < cfg.loss.nce_k:
        say(f"oocid: warning: the cache's window of negatives holds {window_rows} rows, fewer than "
            f"loss.nce_k = {cfg.loss.nce_k}: negatives repeat within a step and the positive's own "
            "row is often among them (raise --cache-mb)")
    if resume and bank_state is not None:
        bank.load_state_dict(bank_state)
    tb = TensorBoardLog(run_dir / "tb") if cfg.train.tensorboard else None
    try:
        return _loop(cfg, manifest, val_manifest, run_dir, device, progress, max_epochs,
                     max_steps, say, model, optimizer, zest, bank, data, epoch, step, partial, tb)
    finally:
        bank.close()
        if tb is not None:
            tb.close()


def cache_budget_rows(cfg: Config, store: BankStore | None, device: torch.device,
                      n_rows: int = 0) -> int:
    """Rows the device cache may hold: --cache-mb / (4 D), or the default budget."""
    n, dim = (store.n_rows, store.dim) if store is not None else (n_rows, cfg.model.dim)
    if cfg.bank.cache_mb > 0:
        return int(cfg.bank.cache_mb * 2**20) // (dim * 4)
    return default_cache_rows(n, dim, device)


def resolve_loss(cfg: Config, n_rows: int, device: torch.device, say: Any = None) -> Config:
    """`loss.kind = "auto"` -> the measured default of the size regime (`config.auto_loss`):
    the exact softmax when the whole bank fits the device cache, sampled negatives otherwise.
    Returns a copy with the kind set (what config.json and the checkpoints record)."""
    if cfg.loss.kind != "auto":
        return cfg
    fits = cache_budget_rows(cfg, None, device, n_rows) >= n_rows
    out = copy.deepcopy(cfg)
    out.loss.kind = auto_loss(fits)
    if say is not None:
        say(f"oocid: loss.kind = auto -> {out.loss.kind} (the bank of {n_rows} rows "
            + ("fits" if fits else "does not fit") + " the device cache)")
    return out


def make_cache(cfg: Config, store: BankStore, device: torch.device, steps_per_epoch: int,
               in_memory: bool = False) -> ChunkCache:
    """The device cache with the configured budget (rows = MB / (4 D)).

    The pool for the positives is sized for the data order: a stream's shuffle buffers, or the
    two groups of chunks that a chunk-local in-memory batch can span (`stream.local_order`)."""
    budget = cache_budget_rows(cfg, store, device)
    pool = cfg.bank.pool_chunks or None
    if pool is None and budget < store.n_rows:
        if in_memory:
            pool = 2 * -(-cfg.data.batch_size // store.chunk_rows) + 1  # + a short group
        else:
            pool = default_pool_chunks(budget, store.chunk_rows, cfg.data.workers,
                                       cfg.data.shuffle_buffer)
    return ChunkCache(store, budget, device, steps_per_epoch=steps_per_epoch, pool_chunks=pool)


def _loop(cfg: Config, manifest: Manifest, val_manifest: Manifest | None, run_dir: Path,
          device: torch.device, progress: bool, max_epochs: int | None, max_steps: int | None,
          say: Any, model: Embedder, optimizer: torch.optim.Optimizer, zest: ZEstimator | None,
          bank: ChunkCache, data: Any, epoch: int, step: int, partial: dict[str, Any] | None,
          tb: TensorBoardLog | None = None) -> RunResult:
    from tqdm import tqdm

    precision = resolve_precision(cfg.train.precision, device)
    net = cast(Embedder, torch.compile(model)) if cfg.train.compile else model
    npid = NPIDStep(cfg, net, optimizer, bank, manifest.n, zest, cfg.train.seed, precision)
    watch = CollapseWatch(cfg, say)
    acc_n = cfg.optim.accumulate
    spe = -(-data.steps_per_epoch() // acc_n)  # optimiser steps per epoch
    train_labels = torch.from_numpy(read_labels(manifest)) if val_manifest is not None else None
    val_batches = list(eval_batches(val_manifest, cfg.data, device)) if val_manifest else None
    result = RunResult(run_dir, epoch, step)
    metrics_path = run_dir / "metrics.jsonl"
    last_epoch = cfg.optim.epochs if max_epochs is None else min(cfg.optim.epochs,
                                                                 epoch + max_epochs)
    stop_step = None if max_steps is None else step + max_steps
    model.train()
    while epoch < last_epoch:
        t0 = time.perf_counter()
        run = EpochTotals(**partial) if partial else EpochTotals()
        partial = None
        skipped0, skips0 = npid.skipped - run.skipped_steps, data.skips.count - run.bad_samples
        start = run.steps_done
        bar = tqdm(total=spe, initial=start, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
                   unit="step", disable=not progress, leave=False, file=sys.stderr)
        micro: list[Batch] = []
        i = start
        for batch in data.epoch_batches(epoch, start * acc_n):
            micro.append(batch)
            if len(micro) < acc_n:
                continue
            i = _train_step(cfg, npid, micro, epoch, i, spe, step, run, watch, bar, t0)
            step += 1
            micro = []
            stop = stop_step is not None and step >= stop_step
            if i < spe and (stop or (cfg.train.checkpoint_every > 0
                                     and step % cfg.train.checkpoint_every == 0)):
                run.skipped_steps = npid.skipped - skipped0
                run.bad_samples = data.skips.count - skips0
                _checkpoint(cfg, run_dir, model, optimizer, zest, bank, manifest, epoch, step,
                            run)
                if stop:
                    bar.close()
                    result.epochs, result.step = epoch, step
                    return result
        if micro:
            i = _train_step(cfg, npid, micro, epoch, i, spe, step, run, watch, bar, t0)
            step += 1
        bar.close()
        epoch += 1
        dt = time.perf_counter() - t0
        rec: dict[str, Any] = {"epoch": epoch, "step": step, "loss": run.loss_sum / max(run.images, 1),
                               "lr": lr_at(cfg, epoch - 1, spe - 1, spe), "images": run.images,
                               "images_per_s": (run.images - run.images_at_start) / max(dt, 1e-9),
                               "epoch_s": dt, "skipped_steps": npid.skipped - skipped0,
                               "bad_samples": data.skips.count - skips0}
        if run.z is not None:
            rec["z"] = run.z
            rec["z_drift"] = zest.drift() if zest is not None else 1.0
        if watch.fired:
            rec["collapse"] = sorted(watch.fired)
        if val_batches is not None and train_labels is not None and val_manifest is not None and (
                epoch == cfg.optim.epochs or epoch == last_epoch
                or (cfg.train.eval_every > 0 and epoch % cfg.train.eval_every == 0)):
            feats, _, labels = extract_features(model, iter(val_batches), cfg.model.channels_last)
            bank.flush()
            chunks = (lambda: tensor_chunks(bank.all_rows())) if bank.full else (
                lambda: store_chunks(bank.store, device))
            acc = knn_against(feats, labels, chunks, train_labels,
                              cfg.train.knn_k, cfg.train.knn_temperature,
                              num_classes_of(manifest, train_labels.numpy()))
            rec["knn_top1"], rec["knn_top5"] = acc["top1"], acc["top5"]
        _checkpoint(cfg, run_dir, model, optimizer, zest, bank, manifest, epoch, step, None, rec)
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if tb is not None:
            tb.write(rec)
        result.metrics.append(rec)
        say("oocid: " + " ".join(f"{k}={_fmt(v)}" for k, v in rec.items()))
        if stop_step is not None and step >= stop_step:
            break
    result.epochs, result.step = epoch, step
    return result


@dataclass
class EpochTotals:
    """Running sums of an epoch; saved in mid-epoch checkpoints so a resumed epoch reports the
    same metrics as an uninterrupted one."""

    steps_done: int = 0
    loss_sum: float = 0.0
    images: int = 0
    images_at_start: int = 0
    skipped_steps: int = 0
    bad_samples: int = 0
    z: float | None = None

    def __post_init__(self) -> None:
        self.images_at_start = self.images


def _train_step(cfg: Config, npid: NPIDStep, micro: list[Batch], epoch: int, i: int, spe: int,
                step: int, run: EpochTotals, watch: CollapseWatch, bar: Any, t0: float) -> int:
    lr = lr_at(cfg, epoch, i, spe)
    out = npid(micro if len(micro) > 1 else micro[0], step, lr)
    n = sum(int(b.index.numel()) for b in micro)
    if not out.skipped:
        run.loss_sum += out.loss * n
        run.images += n
    run.z = out.z if out.z is not None else run.z
    run.steps_done = i + 1
    watch.check(step, out, npid)
    bar.update(1)
    if i % 10 == 0:
        dt = time.perf_counter() - t0
        bar.set_postfix(loss=f"{out.loss:.4f}", lr=f"{lr:.4g}",
                        img_s=f"{(run.images - run.images_at_start) / max(dt, 1e-9):.0f}")
    return i + 1


class CollapseWatch:
    """Warns once per cause when training is collapsing, with the likely cause and a remedy:
    the loss exploding (10x the median of its first EARLY_STEPS steps: the paper's NCE on small
    data explodes within tens of steps, so a later or longer baseline would already hold the
    exploded values), Z drifting 100x from its first estimate, or the batch's features
    collapsing to one direction (mean pairwise cosine > 0.95)."""

    EARLY_STEPS = 5

    def __init__(self, cfg: Config, say: Any) -> None:
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
        remedy = ("NCE with a one-shot Z is fragile on small data (METHOD.md): use "
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
        if npid.last_features is not None and npid.last_features.shape[0] > 1:
            f = npid.last_features
            b = f.shape[0]
            m = f.mean(0)
            sim = float((b * b * (m @ m) - b) / (b * (b - 1)))  # mean pairwise cosine
            if sim > 0.95:
                self._fire("features", f"features collapsed (mean pairwise cosine {sim:.3f}) at "
                                       f"step {step}; " + (remedy if lc.kind == "nce"
                                                           else "lower optim.lr"))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _checkpoint(cfg: Config, run_dir: Path, model: Embedder, optimizer: torch.optim.Optimizer,
                zest: ZEstimator | None, bank: ChunkCache, manifest: Manifest, epoch: int,
                step: int, partial: EpochTotals | None, record: dict[str, Any] | None = None
                ) -> None:
    """Checkpoint after `epoch` whole epochs and `step` optimiser steps; `partial` holds the
    running totals when it is written inside an epoch, `record` the epoch's metrics line at its
    end (restored by `repair_metrics` if a kill lands before the line is appended)."""
    state = {
        "format": "oocid-checkpoint",
        "version": __version__,
        "config": cfg.to_dict(),
        "arch": cfg.model.arch,
        "in_channels": model.in_channels,
        "dim": model.out_dim,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "z": zest.state_dict() if zest is not None else None,
        "epoch": epoch,
        "step": step,
        "manifest_id": manifest.identity,
        "shards": str(manifest.root.resolve()),
        "n_data": manifest.n,
        "rng": {"torch": torch.get_rng_state()},
        "bank_cache": bank.state_dict(),
        "partial_epoch": dataclasses.asdict(partial) if partial is not None else None,
        "epoch_metrics": record,
    }
    save_checkpoint(run_dir, step, state)
    bank.commit(step)
    finish_checkpoint(run_dir, step)
