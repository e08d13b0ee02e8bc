"""What changes when several processes train one bank (docs/distributed.md); with a world of
one (plain `oocid train`) every function here is the identity or the single-process path.

- the bank: rank 0 holds the lock, recovers or creates the bank, then the others open it;
  each rank sees its own chunks through `oocid.distributed.rank_store.RankStore`;
- the model under DistributedDataParallel (per-rank BatchNorm statistics: no buffer
  broadcast, so nothing bank-sized or model-sized moves but the gradients);
- seeds: rank r > 0 draws its data order, augmentations and negatives from a seed of its own;
- an epoch: every rank takes the same number of steps, its batches then None (`padded`);
- checkpoints keep every rank's cache window, RNG state and epoch totals (`rank_part`).
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from oocid.bank.lock import BankLock
from oocid.bank.store import BankStore, open_store
from oocid.bank.verify import check_matches
from oocid.config import Config
from oocid.data.batch import image_channels, mix_seed
from oocid.data.manifest import Manifest
from oocid.distributed import stats
from oocid.distributed.batchnorm import global_batchnorm
from oocid.distributed.layout import BankLayout, claim_part
from oocid.distributed.partition import check_chunked_by_shards
from oocid.distributed.rank_store import RankStore
from oocid.distributed.world import World
from oocid.errors import InputError
from oocid.models import Embedder
from oocid.train.setup import Say, open_or_create_bank

T = TypeVar("T")


@dataclass(frozen=True)
class Inputs:
    """What a run was started with, once checked: `manifest` the whole set, `local` this
    rank's share (the whole set with one process), `budget` the cache's rows for it."""

    cfg: Config
    manifest: Manifest
    local: Manifest
    val_manifest: Manifest | None
    world: World
    layout: BankLayout
    run_dir: Path
    device: torch.device
    budget: int


@contextmanager
def open_bank(cfg: Config, manifest: Manifest, bank_path: Path, resume: bool, world: World,
              layout: BankLayout, say: Say) -> Iterator[BankStore]:
    """The bank, open for writing. The leader of each bank directory (rank 0; with node-local
    banks, the lowest rank of each machine) takes the trainer's lock and opens or creates it;
    rank 0 recovers an interrupted commit, the other leaders settle at rank 0's committed step
    and take its bank id (`BankStore.settle`); then the other ranks open it without recovering."""
    leads = layout.leads(world)
    with BankLock(bank_path) if leads else nullcontext() as lock:
        if lock is not None and lock.took_over:
            say(f"oocid: took over the stale lock of a trainer that died ({lock.path})")
        store = open_or_create_bank(cfg, manifest, bank_path, resume, recover=world.main) \
            if leads else None
        try:
            if store is not None and layout.node_local:  # the same chunks as before, or none
                claim_part(bank_path, layout.group_chunks(), world, manifest.identity)
            steps = world.broadcast((store.meta.committed_step, store.meta.previous_step,
                                     store.meta.bank_id) if store is not None else None)
            if store is not None and not world.main:
                store.settle(*steps)  # the run's step and id are those of rank 0's bank
            world.barrier()
            if store is None:
                if not bank_path.exists():
                    raise InputError(f"{bank_path}: no bank here on machine {world.node}; with "
                                     "several machines, put --bank on a file system all of "
                                     "them mount, or pass --node-local-bank")
                store = open_store(bank_path, recover=False)
                check_matches(store, manifest.n, cfg.model.dim, manifest.identity)
            yield store
        finally:
            if store is not None:
                store.close()


def rank_store(store: BankStore, manifest: Manifest, local: Manifest, world: World,
               layout: BankLayout) -> BankStore:
    """The store this rank's cache works on: the whole bank, or this rank's chunks of it."""
    if not world.distributed:
        return store
    check_chunked_by_shards(manifest, store.chunk_rows)
    # writer names of this launch: a process of an earlier launch still finishing cannot
    # write a part that this launch's commit would name
    view = RankStore(store, list(layout.deal[world.rank]), world, layout,
                     world.broadcast(secrets.token_hex(4)))
    assert view.n_rows == local.n
    return cast(BankStore, view)  # the part of BankStore's interface the cache uses


def rank_seed(seed: int, world: World) -> int:
    return seed if world.rank == 0 else mix_seed(seed, 7, world.rank)


def sync_batchnorm(cfg: Config, model: Embedder, world: World, device: torch.device
                   ) -> Embedder:
    """`model.sync_batchnorm`: BatchNorm over the global batch (`GlobalBatchNorm2d`, on the
    CPU and on CUDA: torch's SyncBatchNorm runs on CUDA only and skips its collectives in eval
    mode, where an idle process's forward runs). A world of one has nothing to synchronise."""
    if not cfg.model.sync_batchnorm or not world.distributed:
        return model
    return cast(Embedder, global_batchnorm(model))


def wrap_model(model: Embedder, world: World, device: torch.device) -> Embedder:
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    with warnings.catch_warnings():  # its successor still syncs buffers at init; we keep them
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    if stats.enabled():  # tools/bench_ddp.py
        ddp.register_comm_hook(None, stats.counting_hook)
    return cast(Embedder, ddp)


def idle_input(cfg: Config, manifest: Manifest, device: torch.device) -> torch.Tensor:
    """What an idle rank's forward sees: two blank images of the training size."""
    size = cfg.data.image_size
    return torch.zeros(2, image_channels(manifest), size, size, device=device)


def padded(batches: Iterator[T], count: int, world: World) -> Iterator[T | None]:
    """`batches`, then None up to `count` items (several processes); `batches` alone (one).
    More than `count` batches would put this process a step out of line with the others."""
    n = 0
    for b in batches:
        n += 1
        if world.distributed and n > count:
            raise RuntimeError(f"rank {world.rank}: more batches this epoch than the {count} "
                               "counted; the processes would fall out of step")
        yield b
    if world.distributed:
        for _ in range(count - n):
            yield None


def gathered(world: World, state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's per-rank entries, each as the list over ranks (a collective)."""
    mine = {"rng": torch.get_rng_state(), "bank_cache": state["bank_cache"],
            "partial_epoch": state["partial_epoch"]}
    every = world.gather(mine)
    return {"world_size": world.size, "ranks": every}


def rank_part(state: dict[str, Any], world: World) -> tuple[Any, Any]:
    """(cache window state, partial-epoch totals) of this rank from a checkpoint. Saved by
    another world size, the window starts afresh and rank 0 carries the summed totals."""
    ranks: list[dict[str, Any]] | None = state.get("ranks")
    if ranks is None:  # one process wrote it
        ranks = [{"bank_cache": state.get("bank_cache"), "partial_epoch": state.get("partial_epoch")}]
    if len(ranks) == world.size:
        return ranks[world.rank]["bank_cache"], ranks[world.rank]["partial_epoch"]
    parts = [r["partial_epoch"] for r in ranks]
    if parts[0] is None:
        return None, None
    total = dict(parts[0])
    for key in ("loss_sum", "images", "images_at_start"):
        total[key] = sum(p[key] for p in parts) if world.main else 0
    total["workers"] = None  # the shards are dealt anew: no order to keep
    return None, total


def rank_rng(state: dict[str, Any], world: World) -> torch.Tensor:
    ranks = state.get("ranks")
    if ranks is not None and int(state.get("world_size", 1)) == world.size:
        return cast(torch.Tensor, ranks[world.rank]["rng"])
    return cast(torch.Tensor, state["rng"]["torch"])


def report_comm(world: World, steps: int) -> None:
    """With OOCID_COMM_STATS set: rank 0 writes every rank's counts (`oocid.distributed.stats`)."""
    if world.distributed and stats.enabled():
        stats.STATS.steps = steps
        every = world.gather(stats.mine())
        if world.main:
            stats.write_stats(every)


def agree_on_inputs(world: World, manifest: Manifest, val: Manifest | None, resume: bool,
                    max_epochs: int | None, max_steps: int | None, node_local: bool) -> None:
    """InputError unless every process was started on the same shards with the same options
    that decide its collectives (rank 0's config is sent to all; these are not)."""
    if not world.distributed:
        return
    mine = {"shards": manifest.identity, "--val": val.identity if val is not None else None,
            "--resume": resume, "max epochs": max_epochs, "--max-steps": max_steps,
            "--node-local-bank": node_local}
    every = world.gather(mine)
    differ = sorted({k for e in every for k in e if e[k] != every[0][k]})
    if differ:
        raise InputError(f"rank {world.rank}: the processes were started with different "
                         f"{', '.join(differ)} (run the same command, on the same shards, "
                         "on every machine)")


def exchange_negatives(cfg: Config, bank: Any, world: World, n_rows: int) -> None:
    """`loss.negatives_from = "whole"` under several processes: each step every process sends
    rows drawn from its own part and draws its negatives from all of them (`ChunkCache.draw`).
    The table holds min(4 K, N) rows (the window rule of one process), an equal share from
    each process."""
    if not world.distributed or cfg.loss.negatives_from != "whole" or cfg.loss.kind == "softmax":
        return
    bank.share_rows = -(-min(4 * cfg.loss.nce_k, n_rows) // world.size)
    bank.exchange = lambda rows: torch.cat(world.all_gather_tensor(rows.contiguous()))
    bank.keep_own = 1.0  # the own row comes back at the whole bank's rate by itself
