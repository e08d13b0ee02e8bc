"""What a run is built from: the bank opened or created, the loss resolved, the device cache
sized, the optimiser and its schedule, and the check that a resume matches its checkpoint."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch

from oocid.bank.cache import ChunkCache
from oocid.bank.create import create_store
from oocid.bank.sizing import (
    WINDOW_K_TIMES,
    cache_rows,
    default_pool_chunks,
    positives_pool,
    window_target_rows,
)
from oocid.bank.store import BankStore, open_store
from oocid.bank.verify import check_matches
from oocid.config import Config, auto_loss, data_workers
from oocid.data.manifest import Manifest
from oocid.errors import InputError
from oocid.eval.classes import class_map

Say = Callable[[str], None]  # where a run's one-line messages go (stderr by default)


# Performance settings a resume may change: they change how fast a run goes, not its result.
RESUME_MAY_CHANGE = ("optim.epochs", "train.tensorboard", "bank.cache_mb", "data.workers",
                     "train.device", "train.threads", "train.checkpoint_every")


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


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                           weight_decay=cfg.optim.weight_decay)


def open_or_create_bank(cfg: Config, manifest: Manifest, bank_path: Path, resume: bool,
                        recover: bool = True) -> BankStore:
    """The bank at `bank_path`, checked against the shards; created from the manifest if absent.
    `recover=False`: the caller settles an interrupted commit itself (`BankStore.settle`).
    Its chunk reads check the rows: damage stops the run (`oocid.bank.damage`)."""
    if bank_path.exists():
        store = open_store(bank_path, recover=recover)
        check_matches(store, manifest.n, cfg.model.dim, manifest.identity)
        if not resume and store.meta.committed_step >= 0:
            store.close()
            raise InputError(f"{bank_path}: already holds a trained bank (step "
                             f"{store.meta.committed_step}); pass --resume to continue it or "
                             "choose a new --bank path")
        return store
    if resume:
        raise InputError(f"{bank_path}: no bank to resume")
    store = create_store(bank_path, manifest.n, cfg.model.dim, dtype=cfg.bank.dtype,
                         chunk_rows=manifest.shard_size, manifest_id=manifest.identity,
                         momentum=cfg.bank.momentum, seed=cfg.bank.seed)
    return store


def cache_budget_rows(cfg: Config, store: BankStore | None, device: torch.device,
                      n_rows: int = 0, sharers: int = 1) -> int:
    """Rows the device cache may hold: --cache-mb / (4 D), or the default budget (on the CPU,
    host memory shared by `sharers` processes)."""
    n, dim = (store.n_rows, store.dim) if store is not None else (n_rows, cfg.model.dim)
    return cache_rows(cfg.bank.cache_mb, n, dim, device, sharers)


def resolve_loss(cfg: Config, n_rows: int, budget_rows: int, say: Say | None = None,
                 whole_bank: bool = True) -> Config:
    """`loss.kind = "auto"` -> the measured default of the size regime (`config.auto_loss`):
    the exact softmax when the whole bank fits the device cache (`budget_rows`, computed once
    per start), sampled negatives otherwise. Returns a copy with the kind set (what config.json
    and the checkpoints record). Without the `whole_bank` in one process (several processes
    each hold their part), the softmax over all rows is not available."""
    if cfg.loss.kind == "softmax" and not whole_bank:
        raise InputError('loss.kind = "softmax" scores every row of the bank, which no process '
                         'holds when several train together; use --loss infonce (or nce)')
    if cfg.loss.kind != "auto":
        return cfg
    fits = budget_rows >= n_rows and whole_bank
    out = copy.deepcopy(cfg)
    out.loss.kind = auto_loss(fits)
    if say is not None:
        why = (("fits" if fits else "does not fit") + " the device cache") if whole_bank \
            else "is split across processes"
        say(f"oocid: loss.kind = auto -> {out.loss.kind} (the bank of {n_rows} rows {why})")
    return out


def make_cache(cfg: Config, store: BankStore, device: torch.device, steps_per_epoch: int,
               budget: int, in_memory: bool = False) -> ChunkCache:
    """The device cache of `budget` rows (`cache_budget_rows`, computed once per start).

    The pool for the positives (`bank.pool_chunks`, or 0: sized here) is sized for the data
    order: a stream's shuffle buffers, or the two groups of chunks that a chunk-local in-memory
    batch can span (`oocid.data.memory.local_order`); it gives way, down to the chunks one batch
    spans, to a window of negatives of `window_target_rows` (4 x K, or half a small bank)."""
    pool = cfg.bank.pool_chunks or None
    if pool is None and budget < store.n_rows:
        want = positives_pool(budget, store.chunk_rows, data_workers(cfg.data.workers),
                              cfg.data.shuffle_buffer, cfg.data.batch_size if in_memory else 0)
        window = 0 if cfg.loss.kind == "softmax" else window_target_rows(cfg.loss.nce_k,
                                                                          store.n_rows)
        pool = default_pool_chunks(budget, store.chunk_rows, want, window)
    return ChunkCache(store, budget, device, steps_per_epoch=steps_per_epoch, pool_chunks=pool)


def check_val(manifest: Manifest, val_manifest: Manifest | None, shards: Path,
              val: Path | None) -> None:
    """--val is refused before any training when its kNN check could not run after an epoch."""
    if val_manifest is None:
        return
    if not val_manifest.labeled:
        raise InputError(f"{val}: validation shards are unlabeled; --val needs labeled shards")
    if not manifest.labeled:
        raise InputError(f"{shards}: training shards are unlabeled; the kNN check of --val "
                         "needs labels (train without --val)")
    # each validation class must be a training class (matched by name; fewer are fine)
    class_map(manifest, val_manifest, val)  # type: ignore[arg-type]


def window_warning(cfg: Config, cache: ChunkCache) -> str | None:
    """One line when the window of negatives of a partial cache holds fewer rows than
    `window_target_rows` (the K negatives of a step are drawn from the window only), or None:
    always None when the whole bank is cached or the loss has no sampled negatives."""
    if cache.full or cfg.loss.kind == "softmax":
        return None
    k, rows = cfg.loss.nce_k, cache.w * cache.r
    target = window_target_rows(k, cache.n)
    if rows >= target:
        return None
    if rows < k:
        what = (f"fewer than loss.nce_k = {k}: negatives repeat within a step and the "
                "positive's own row is often among them")
    else:
        under = f"{WINDOW_K_TIMES} x loss.nce_k = {target}" if target == WINDOW_K_TIMES * k \
            else f"half the bank's {cache.n} rows"
        what = f"under {under}: a step's {k} negatives come from few of the bank's rows"
    hint = "lower bank.pool_chunks or raise --cache-mb" if cfg.bank.pool_chunks \
        else "raise --cache-mb"
    return f"oocid: warning: the cache's window of negatives holds {rows} rows, {what} ({hint})"
