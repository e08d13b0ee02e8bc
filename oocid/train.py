"""The NPID training loop: stream -> model -> loss against the bank -> step -> bank update.

The bank update happens here, explicitly, after the optimiser step (not hidden in autograd):
    v_i <- normalize(m * v_i + (1 - m) * f_i)      for the batch's indices only.
Randomness (data order, augmentation, negatives) is derived from (seed, epoch, step), so a run
resumed from a checkpoint repeats the uninterrupted run exactly.
B batch, K negatives, D dims, N bank rows.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__
from .bank import momentum_update
from .cache import ChunkCache, default_cache_rows
from .checkpoint import (
    checkpoint_for_step,
    finish_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .config import Config, config_from_dict
from .errors import DataError, InputError
from .evaluate import (
    check_same_classes,
    knn_against,
    num_classes_of,
    read_labels,
    store_chunks,
    tensor_chunks,
)
from .losses import (
    ZEstimator,
    infonce_from_scores,
    nce_criterion,
    nce_probs,
    shared_scores,
    softmax_loss,
)
from .models import Embedder, build_model
from .shards import Manifest, read_manifest
from .store import BankStore, check_matches, create_store, open_store
from .stream import Batch, eval_batches, extract_features, image_channels, make_train_data, mix_seed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}") from None


def lr_at(cfg: Config, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """Learning rate: x gamma at each milestone epoch (official), or cosine per iteration to 0."""
    o = cfg.optim
    if o.schedule == "cosine":
        t = (epoch * steps_per_epoch + step_in_epoch) / max(1, o.epochs * steps_per_epoch)
        return o.lr * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    return o.lr * o.gamma ** sum(1 for m in o.milestones if epoch >= m)


@dataclass
class StepOut:
    loss: float
    skipped: bool
    z: float | None = None


@dataclass
class NPIDStep:
    """One training step: loss of the batch's features against the bank, optimiser step, then
    the bank's momentum update. Pure of I/O: `bank` is any object with gather / sample /
    update / all_rows (in-core or cached)."""

    cfg: Config
    model: Embedder
    optimizer: torch.optim.Optimizer
    bank: Any
    n_data: int
    zest: ZEstimator | None
    seed: int
    skipped: int = 0

    def loss(self, f: Tensor, index: Tensor, step: int) -> tuple[Tensor, float | None]:
        lc = self.cfg.loss
        if lc.kind == "softmax":
            return softmax_loss(f, self.bank.all_rows(), index, lc.temperature), None
        b = f.shape[0]
        g = torch.Generator(device=self.bank.device.type if hasattr(self.bank, "device") else "cpu")
        g.manual_seed(mix_seed(self.seed, 6, step))
        pos = self.bank.gather(index)  # (B, D)
        if lc.negatives == "shared":
            neg = self.bank.gather(self.bank.sample((lc.nce_k,), g))  # (K, D)
            scores = shared_scores(f, pos, neg)  # (B, K+1)
        else:
            neg_idx = self.bank.sample((b, lc.nce_k), g)  # (B, K)
            weights = torch.cat([pos.unsqueeze(1), self.bank.gather(neg_idx)], dim=1)  # (B, K+1, D)
            scores = torch.bmm(weights.float(), f.float().unsqueeze(2)).squeeze(2)  # (B, K+1)
        if lc.kind == "infonce":
            return infonce_from_scores(scores, lc.temperature), None
        assert self.zest is not None
        z = self.zest(scores, self.n_data, lc.temperature)
        probs, _ = nce_probs(scores, self.n_data, lc.temperature, z)
        return nce_criterion(probs, self.n_data, lc.eps), float(z.item())

    def __call__(self, batch: Batch, step: int, lr: float) -> StepOut:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = batch.images
        if self.cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        f = self.model(x)  # (B, D) unit, float32
        loss, z = self.loss(f, batch.index, step)
        if not bool(torch.isfinite(loss)) or not bool(torch.isfinite(f).all()):
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            if hasattr(self.bank, "end_step"):
                self.bank.end_step()
            return StepOut(float("nan"), True, z)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():  # the memory update, after the optimiser step
            new = momentum_update(self.bank.gather(batch.index), f.detach(), self.cfg.bank.momentum)
            self.bank.update(batch.index, new)
        if hasattr(self.bank, "end_step"):
            self.bank.end_step()
        return StepOut(float(loss.item()), False, z)


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
          log: Any = None) -> RunResult:
    """Train NPID on a shard set with the bank at `bank_path`; outputs go to `run_dir`.

    `max_epochs` stops after that many epochs of this call (the schedule still spans
    cfg.optim.epochs), which is how a run is stopped and resumed in tests."""
    say = log if log is not None else (lambda msg: print(msg, file=sys.stderr))
    manifest = read_manifest(shards)
    val_manifest = read_manifest(val) if val is not None else None
    if val_manifest is not None:
        check_same_classes(manifest, val_manifest, val)  # type: ignore[arg-type]
    lc = cfg.loss
    if lc.kind in ("nce", "infonce") and lc.nce_k >= manifest.n:
        raise InputError(f"loss.nce_k = {lc.nce_k} negatives needs more than {manifest.n} samples "
                         f"({shards}); lower it or use loss.kind = \"softmax\" for small sets")
    device = resolve_device(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume and list_checkpoints(run_dir):
        raise InputError(f"{run_dir}: already holds checkpoints; pass --resume or choose "
                         "another --out")
    store = _open_or_create_bank(cfg, manifest, bank_path, resume)
    try:
        return _train(cfg, manifest, val_manifest, store, run_dir, device, resume, progress,
                      max_epochs, say)
    finally:
        store.close()


def _train(cfg: Config, manifest: Manifest, val_manifest: Manifest | None, store: BankStore,
           run_dir: Path, device: torch.device, resume: bool, progress: bool,
           max_epochs: int | None, say: Any) -> RunResult:
    torch.manual_seed(cfg.train.seed)
    channels = image_channels(manifest)
    model = build_model(cfg.model.arch, channels, cfg.model.dim).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = build_optimizer(cfg, model)
    zest = ZEstimator(cfg.loss.z, cfg.loss.z_momentum) if cfg.loss.kind == "nce" else None
    epoch, step = 0, 0
    bank_state = None
    if resume and store.meta.committed_step < 0 and not list_checkpoints(run_dir):
        say(f"oocid: {store.path} has no committed step yet; starting {run_dir} from the beginning")
        resume = False
    if resume:
        path = checkpoint_for_step(run_dir, store.meta.committed_step)
        state = load_checkpoint(path)
        saved = config_from_dict(state["config"], str(path))
        if saved.to_dict() != cfg.to_dict():
            raise InputError(f"{path}: was written with a different config; resume with the "
                             f"config saved in {run_dir / 'config.json'}")
        if state["manifest_id"] != manifest.identity:
            raise DataError(f"{path}: belongs to other shards than {manifest.root}")
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        if zest is not None and state.get("z") is not None:
            zest.load_state_dict(state["z"])
        epoch, step = int(state["epoch"]), int(state["step"])
        bank_state = state.get("bank_cache")
        torch.set_rng_state(state["rng"]["torch"])
        say(f"oocid: resumed {run_dir} at epoch {epoch}, step {step}")
    (run_dir / "config.json").write_text(cfg.to_json() + "\n")

    data = make_train_data(manifest, cfg.data, cfg.train.seed, device, progress)
    spe = data.steps_per_epoch()
    bank = make_cache(cfg, store, device, spe)
    if resume and bank_state is not None:
        bank.load_state_dict(bank_state)
    try:
        return _loop(cfg, manifest, val_manifest, run_dir, device, progress, max_epochs, say,
                     model, optimizer, zest, bank, data, epoch, step)
    finally:
        bank.close()


def make_cache(cfg: Config, store: BankStore, device: torch.device, steps_per_epoch: int
               ) -> ChunkCache:
    """The device cache with the configured budget (rows = MB / (4 D))."""
    if cfg.bank.cache_mb > 0:
        budget = int(cfg.bank.cache_mb * 2**20) // (store.dim * 4)
    else:
        budget = default_cache_rows(store.n_rows, store.dim, device)
    pool = cfg.bank.pool_chunks or None
    if pool is None and budget < store.n_rows:
        pool = max(budget // store.chunk_rows // 4, 2 * max(1, cfg.data.workers) + 2)
    return ChunkCache(store, budget, device, steps_per_epoch=steps_per_epoch, pool_chunks=pool)


def _loop(cfg: Config, manifest: Manifest, val_manifest: Manifest | None, run_dir: Path,
          device: torch.device, progress: bool, max_epochs: int | None, say: Any,
          model: Embedder, optimizer: torch.optim.Optimizer, zest: ZEstimator | None,
          bank: ChunkCache, data: Any, epoch: int, step: int) -> RunResult:
    from tqdm import tqdm

    npid = NPIDStep(cfg, model, optimizer, bank, manifest.n, zest, cfg.train.seed)
    spe = data.steps_per_epoch()
    train_labels = torch.from_numpy(read_labels(manifest)) if val_manifest is not None else None
    val_batches = list(eval_batches(val_manifest, cfg.data, device)) if val_manifest else None
    result = RunResult(run_dir, epoch, step)
    metrics_path = run_dir / "metrics.jsonl"
    last_epoch = cfg.optim.epochs if max_epochs is None else min(cfg.optim.epochs,
                                                                 epoch + max_epochs)
    model.train()
    while epoch < last_epoch:
        t0 = time.perf_counter()
        skipped0, skips0 = npid.skipped, data.skips.count
        total, count, z = 0.0, 0, None
        bar = tqdm(total=spe, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", unit="step",
                   disable=not progress, leave=False, file=sys.stderr)
        for i, batch in enumerate(data.epoch_batches(epoch)):
            lr = lr_at(cfg, epoch, i, spe)
            out = npid(batch, step, lr)
            step += 1
            if not out.skipped:
                total += out.loss * batch.index.numel()
                count += batch.index.numel()
            z = out.z if out.z is not None else z
            bar.update(1)
            if i % 10 == 0:
                dt = time.perf_counter() - t0
                bar.set_postfix(loss=f"{out.loss:.4f}", lr=f"{lr:.4g}",
                                img_s=f"{count / max(dt, 1e-9):.0f}")
        bar.close()
        epoch += 1
        dt = time.perf_counter() - t0
        rec: dict[str, Any] = {"epoch": epoch, "step": step, "loss": total / max(count, 1),
                               "lr": lr_at(cfg, epoch - 1, spe - 1, spe), "images": count,
                               "images_per_s": count / max(dt, 1e-9), "epoch_s": dt,
                               "skipped_steps": npid.skipped - skipped0,
                               "bad_samples": data.skips.count - skips0}
        if z is not None:
            rec["z"] = z
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
        _checkpoint(cfg, run_dir, model, optimizer, zest, bank, manifest, epoch, step)
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        result.metrics.append(rec)
        say("oocid: " + " ".join(f"{k}={_fmt(v)}" for k, v in rec.items()))
    result.epochs, result.step = epoch, step
    return result


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _checkpoint(cfg: Config, run_dir: Path, model: Embedder, optimizer: torch.optim.Optimizer,
                zest: ZEstimator | None, bank: ChunkCache, manifest: Manifest, epoch: int,
                step: int) -> None:
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
    }
    save_checkpoint(run_dir, step, state)
    bank.commit(step)
    finish_checkpoint(run_dir, step)


def model_from_checkpoint(state: dict[str, Any], device: torch.device, where: str) -> Embedder:
    """Rebuild the model of a checkpoint (strict load)."""
    try:
        model = build_model(state["arch"], int(state["in_channels"]), int(state["dim"]))
        model.load_state_dict(state["model"], strict=True)
    except (KeyError, RuntimeError, ValueError) as e:
        raise DataError(f"{where}: checkpoint does not match its architecture: "
                        f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval()
