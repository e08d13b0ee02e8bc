"""The NPID training loop: stream -> model -> loss against the bank -> step -> bank update.

The step itself (loss, optimiser step, THEN the bank's momentum update) is
`oocid.method.npid.NPIDStep`; this module runs it over epochs, checkpoints, evaluates and logs.
Randomness (data order, augmentation, negatives) is derived from (seed, epoch, step), so a run
resumed from a checkpoint repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch

from oocid.atomic import atomic_write
from oocid.bank.store import BankStore
from oocid.checkpoint import (
    check_bank_id,
    checkpoint_for_step,
    list_checkpoints,
    load_checkpoint,
    repair_metrics,
)
from oocid.config import Config, config_from_dict, eval_period
from oocid.data.batch import Batch, image_channels
from oocid.data.manifest import Manifest, read_manifest
from oocid.data.memory import InMemoryData
from oocid.data.stream import make_train_data
from oocid.device import keep_large_buffers, resolve_device, resolve_precision, use_device
from oocid.distributed.layout import bank_layout
from oocid.distributed.partition import rank_manifest
from oocid.distributed.sync import DistSync
from oocid.distributed.world import World, rank_device, start_world, stop_world, world_from_env
from oocid.errors import DataError, InputError
from oocid.eval.classes import not_held_out
from oocid.method.npid import NPIDStep
from oocid.method.zest import ZEstimator
from oocid.models import Embedder, build_model
from oocid.progress import Eta, Progress, progress_bar
from oocid.train.ddp import (
    Inputs,
    agree_on_inputs,
    exchange_negatives,
    idle_input,
    open_bank,
    padded,
    rank_part,
    rank_rng,
    rank_seed,
    rank_store,
    report_comm,
    sync_batchnorm,
    wrap_model,
)
from oocid.train.evaluator import Evaluator
from oocid.train.report import RunResult, schedule_note
from oocid.train.setup import (
    RESUME_MAY_CHANGE,
    Say,
    build_optimizer,
    cache_budget_rows,
    check_val,
    config_diff,
    lr_at,
    make_cache,
    resolve_loss,
    window_warning,
)
from oocid.train.state import EpochTotals, RunState, resume_workers
from oocid.train.tblog import TensorBoardLog, require_tensorboard
from oocid.train.watch import CollapseWatch


def train(cfg: Config, shards: Path, bank_path: Path, run_dir: Path, *, val: Path | None = None,
          resume: bool = False, progress: bool = True, max_epochs: int | None = None,
          max_steps: int | None = None, log: Say | None = None, announce: str | None = None,
          node_local_bank: bool = False) -> RunResult:
    """Train NPID on a shard set with the bank at `bank_path`; outputs go to `run_dir`.

    `max_epochs` / `max_steps` stop after that many epochs / optimiser steps of this call with
    a checkpoint (the schedule still spans cfg.optim.epochs); `--resume` continues exactly.
    `announce` (how the config was chosen) is said once the inputs have passed their checks."""
    for name, limit in (("--max-steps", max_steps), ("max_epochs", max_epochs)):
        if limit is not None and limit < 1:  # else one step ran before the check after it
            raise InputError(f"{name} must be >= 1, got {limit}")
    world = world_from_env()
    say: Say = log if log is not None else (lambda msg: print(msg, file=sys.stderr))
    if not world.main:  # rank 0 speaks for the run; errors are still raised on every rank
        say, progress, announce = (lambda msg: None), False, None
    manifest = read_manifest(shards)
    val_manifest = read_manifest(val) if val is not None else None
    check_val(manifest, val_manifest, shards, val)
    warning = None if val_manifest is None else not_held_out(manifest, val_manifest)
    device = rank_device(world, resolve_device(cfg.train.device))
    use_device(device)  # cuda:N current for this thread; cuDNN autotuning on CUDA
    start_world(world, device)
    try:
        # rank 0's config for all (another machine may not see the run folder's config.json)
        cfg = world.broadcast(cfg)
        agree_on_inputs(world, manifest, val_manifest, resume, max_epochs, max_steps,
                        node_local_bank)
        layout = bank_layout(world, node_local_bank, manifest)  # the deal of shards to ranks
        local = rank_manifest(manifest, list(layout.deal[world.rank])) if world.distributed \
            else manifest
        # Measured once: the default budget follows free memory, which changes between calls.
        budget = cache_budget_rows(cfg, None, device, local.n, sharers=world.local_size)
        chosen = [] if warning is None else [warning]  # said after the recipe's line
        cfg = resolve_loss(cfg, manifest.n, budget, chosen.append,
                           whole_bank=not world.distributed)
        lc = cfg.loss
        if lc.kind in ("nce", "infonce") and lc.nce_k >= local.n:
            raise InputError(f"loss.nce_k = {lc.nce_k} negatives needs more than {local.n} "
                             f"samples ({shards}{' per process' if world.distributed else ''}); "
                             "lower it with --nce-k, or use --loss softmax for small sets")
        if cfg.train.tensorboard:
            require_tensorboard()
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        keep_large_buffers()  # the step's multi-MB buffers stay mapped between steps
        if world.main and not resume and list_checkpoints(run_dir):
            raise InputError(f"{run_dir}: already holds checkpoints; pass --resume or choose "
                             "another --out")
        with open_bank(cfg, manifest, bank_path, resume, world, layout, say) as store:
            for line in ([announce] if announce is not None else []) + chosen:
                say(line)  # the inputs have passed their checks, the bank included
            if world.main:
                run_dir.mkdir(parents=True, exist_ok=True)
            run = Inputs(cfg, manifest, local, val_manifest, world, layout, run_dir, device,
                         budget)
            return _train(run, store, resume, progress, max_epochs, max_steps, say)
    finally:
        stop_world(world)


def _train(inp: Inputs, store: BankStore, resume: bool, progress: bool,
           max_epochs: int | None, max_steps: int | None, say: Say) -> RunResult:
    cfg, manifest, world, run_dir, device = inp.cfg, inp.manifest, inp.world, inp.run_dir, inp.device
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.arch, image_channels(manifest), cfg.model.dim).to(device)
    model = sync_batchnorm(cfg, model, world, device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    zest = ZEstimator(cfg.loss.z, cfg.loss.z_momentum) if cfg.loss.kind == "nce" else None
    epoch, step, bank_state, partial, scaler_state, saved = 0, 0, None, None, None, None
    if resume and store.meta.committed_step < 0:
        # killed before the first bank commit: any checkpoint here was never paired with the bank
        say(f"oocid: {store.path} has no committed step yet; starting {run_dir} from the beginning")
        resume = False
    if resume:
        state = _restore(cfg, manifest, store, run_dir, model, optimizer, zest, world)
        epoch, step = int(state["epoch"]), int(state["step"])
        bank_state, partial = rank_part(state, world)
        scaler_state, saved = state.get("scaler"), config_from_dict(state["config"], "")
        say(f"oocid: resumed {run_dir} at epoch {epoch}, step {step}")
        if state.get("val") and inp.val_manifest is None:  # resumed without the run's --val
            say(f"oocid: warning: the run checked --val {state['val']}; this resume has no "
                f"--val, so it checks nothing (pass --val {state['val']} to keep the checks)")
    if world.main:
        atomic_write(run_dir / "config.json", cfg.to_json() + "\n", "the run's config")

    part = rank_store(store, manifest, inp.local, world, inp.layout)
    budget = inp.budget
    cache_partial = budget < part.n_rows
    data = make_train_data(inp.local, cfg.data, rank_seed(cfg.train.seed, world), device, progress,
                           chunk_rows=part.chunk_rows if cache_partial else 0)
    # every process takes the same number of steps: the most any has (oocid.distributed)
    batches = world.all_max(data.steps_per_epoch(), device)
    spe = -(-batches // cfg.optim.accumulate)  # optimiser steps (end_step calls)
    note = None if saved is None else schedule_note(
        saved, cfg, epoch, int((partial or {}).get("steps_done", 0)), spe, step)
    if note is not None:
        say(note)
    bank = make_cache(cfg, part, device, spe, budget, in_memory=isinstance(data, InMemoryData))
    bank.keep_own = part.n_rows / manifest.n  # 1 with one process (oocid.method.own_draws)
    exchange_negatives(cfg, bank, world, manifest.n)
    warning = window_warning(cfg, bank)
    if warning is not None:
        say(warning)
    if bank_state is not None:
        bank.load_state_dict(bank_state)
    tb = TensorBoardLog(run_dir / "tb") if cfg.train.tensorboard and world.main else None
    run = RunState(cfg, manifest, inp.val_manifest, run_dir, device, say, model, optimizer, zest,
                   bank, data, epoch, step, partial, tb, progress, max_epochs, max_steps,
                   scaler_state=scaler_state, world=world, local=inp.local, batches=batches)
    ok = False
    try:
        result = _loop(run)
        ok = True
        return result
    finally:
        try:
            bank.close(raise_errors=ok)  # stops the I/O thread; keeps an error in flight
        finally:
            if tb is not None:
                tb.close()


def _restore(cfg: Config, manifest: Manifest, store: BankStore, run_dir: Path, model: Embedder,
             optimizer: torch.optim.Optimizer, zest: ZEstimator | None, world: World
             ) -> dict[str, Any]:
    """Load the checkpoint the bank's committed step names into the model, optimiser and Z,
    after checking it belongs to this config and these shards; returns the checkpoint.
    Several processes: rank 0 reads and checks it, and sends it to the others."""
    state: dict[str, Any] | None = None
    if world.main:
        path = checkpoint_for_step(run_dir, store.meta.committed_step)
        state = load_checkpoint(path)
        saved = config_from_dict(state["config"], str(path))
        diff = config_diff(saved, cfg, ignore=RESUME_MAY_CHANGE)
        if diff:
            raise InputError(f"{path}: was written with a different config ({', '.join(diff)}); "
                             "resume without changing it: with no --config, --resume reads "
                             f"the run's config from {run_dir / 'config.json'} (only --epochs, "
                             "--cache-mb and other speed settings may change)")
        if cfg.optim.epochs < int(state["epoch"]):
            raise InputError(f"{path}: has already trained {state['epoch']} epochs; "
                             f"optim.epochs = {cfg.optim.epochs} is fewer (to train on, "
                             f"resume with --epochs above {state['epoch']})")
        if state["manifest_id"] != manifest.identity:
            raise DataError(f"{path}: belongs to other shards than {manifest.root}")
        check_bank_id(state, path, store.path, store.meta.bank_id)
        repair_metrics(run_dir / "metrics.jsonl", int(state["epoch"]), state.get("epoch_metrics"))
    state = world.broadcast(state)
    assert state is not None
    model.load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    if zest is not None and state.get("z") is not None:
        zest.load_state_dict(state["z"])
    torch.set_rng_state(rank_rng(state, world))
    return state


def _loop(run: RunState) -> RunResult:
    cfg, data = run.cfg, run.data
    precision = resolve_precision(cfg.train.precision, run.device)
    net = wrap_model(run.model, run.world, run.device)
    net = cast(Embedder, torch.compile(net)) if cfg.train.compile else net
    npid = NPIDStep(cfg, net, run.optimizer, run.bank, run.manifest.n, run.zest,
                    rank_seed(cfg.train.seed, run.world), precision)
    if run.world.distributed:
        sync = DistSync(run.world, run.device)
        npid.sync, npid.idle_input = sync, idle_input(cfg, run.manifest, run.device)
        if run.zest is not None:
            run.zest.agree = sync.agree_z
    run.scaler = npid.scaler
    if npid.scaler is not None and run.scaler_state is not None:
        npid.scaler.load_state_dict(run.scaler_state)  # fp16: resume at the saved loss scale
    watch = CollapseWatch(cfg, run.say)
    acc_n = cfg.optim.accumulate
    spe = -(-run.batches // acc_n)  # optimiser steps per epoch
    evaluate = Evaluator(run) if run.val_manifest is not None else None
    first_step, t_start = run.step, time.perf_counter()
    result = RunResult(run.run_dir, run.epoch, run.step, quiet=not run.world.main,
                       total_epochs=cfg.optim.epochs, first_step=first_step)
    last_epoch = cfg.optim.epochs if run.max_epochs is None \
        else min(cfg.optim.epochs, run.epoch + run.max_epochs)
    stop_step = None if run.max_steps is None else run.step + run.max_steps
    eta = Eta(run.step, last_epoch * spe if stop_step is None else min(stop_step, last_epoch * spe),
               run.say)
    run.model.train()
    while run.epoch < last_epoch:
        t0 = time.perf_counter()
        totals = EpochTotals(**run.partial) if run.partial else EpochTotals()
        totals.workers = resume_workers(data, totals.workers, run.say)
        run.partial = None
        skipped0 = npid.skipped - totals.skipped_steps
        scaler0 = npid.scaler_skips - totals.scaler_skips
        skips0 = data.skips.count - totals.bad_samples
        start = totals.steps_done
        bar = progress_bar(spe, f"epoch {run.epoch + 1}/{cfg.optim.epochs}", "step",
                           enabled=run.progress, initial=start, leave=False)
        micro: list[Batch | None] = []
        i = start
        for batch in padded(data.epoch_batches(run.epoch, start * acc_n),
                            run.batches - start * acc_n, run.world):
            micro.append(batch)
            if len(micro) < acc_n:
                continue
            i = _train_step(cfg, npid, micro, run.epoch, i, spe, run.step, totals, watch, bar, t0)
            run.step += 1
            eta.tick(run.step)
            micro = []
            stop = stop_step is not None and run.step >= stop_step
            if i < spe and (stop or (cfg.train.checkpoint_every > 0
                                     and run.step % cfg.train.checkpoint_every == 0)):
                totals.skipped_steps = npid.skipped - skipped0
                totals.scaler_skips = npid.scaler_skips - scaler0
                totals.bad_samples = data.skips.count - skips0
                run.checkpoint(totals)
                if stop:
                    bar.close()
                    result.epochs, result.step = run.epoch, run.step
                    result.seconds, result.stopped = time.perf_counter() - t_start, "--max-steps"
                    return result
        if micro:
            i = _train_step(cfg, npid, micro, run.epoch, i, spe, run.step, totals, watch, bar, t0)
            run.step += 1
        bar.close()
        run.epoch += 1
        dt = time.perf_counter() - t0
        loss_sum, images, seen, bad = run.world.all_sum(
            [totals.loss_sum, totals.images, totals.images - totals.images_at_start,
             data.skips.count - skips0], run.device)  # over all processes
        rec: dict[str, Any] = {
            "epoch": run.epoch, "step": run.step, "loss": loss_sum / max(images, 1),
            "lr": lr_at(cfg, run.epoch - 1, spe - 1, spe), "images": int(images),
            "images_per_s": seen / max(dt, 1e-9),
            "epoch_s": dt, "skipped_steps": npid.skipped - skipped0,
            "bad_samples": int(bad)}
        if npid.scaler is not None:  # fp16: optimiser steps the loss scaler skipped
            rec["scaler_skips"] = npid.scaler_skips - scaler0
        if totals.z is not None:
            rec["z"] = float(totals.z)
            rec["z_drift"] = run.zest.drift() if run.zest is not None else 1.0
        if watch.fired:
            rec["collapse"] = sorted(watch.fired)
        every = eval_period(cfg)
        if evaluate is not None and (run.epoch == cfg.optim.epochs or run.epoch == last_epoch
                                     or (every > 0 and run.epoch % every == 0)):
            rec.update(evaluate())
        run.checkpoint(None, rec)
        if run.world.main:
            with open(run.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if run.tb is not None:
            run.tb.write(rec)
        result.metrics.append(rec)
        run.say("oocid: " + " ".join(f"{k}={_fmt(v)}" for k, v in rec.items()))
        if stop_step is not None and run.step >= stop_step:
            break
    result.epochs, result.step = run.epoch, run.step
    result.seconds = time.perf_counter() - t_start
    if run.epoch < cfg.optim.epochs:  # a limit of this call stopped it before the end
        result.stopped = "--max-steps" if stop_step is not None and run.step >= stop_step \
            else "max_epochs"
    report_comm(run.world, run.step - first_step)
    return result


def _train_step(cfg: Config, npid: NPIDStep, micro: list[Batch | None], epoch: int, i: int, spe: int,
                step: int, run: EpochTotals, watch: CollapseWatch, bar: Progress, t0: float) -> int:
    lr = lr_at(cfg, epoch, i, spe)
    out = npid(micro if len(micro) > 1 else micro[0], step, lr)
    n = sum(int(b.index.numel()) for b in micro if b is not None)
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


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
