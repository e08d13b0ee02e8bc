"""`oocid linear`: linear evaluation of the frozen backbone (a logistic-regression probe).

Features are the backbone's pooled pre-fc features (the paper's conv5 features; F = 512 for
resnet18, 2048 for resnet50, 128 for small), or with `head` the 128-d embedding, each L2
normalised, computed once with the test transform (no augmentation, unlike the paper's
linear eval) and kept on disk as memory maps. A single nn.Linear(F, C) is trained on them
with Adam and a cosine schedule; top-1/top-5 on the validation shards. The backbone is never
in the optimiser; a hash of its state dict before and after proves it did not change.
N training samples, M validation samples, F feature width, C classes, B batch.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oocid.checkpoint import load_checkpoint, model_from_checkpoint
from oocid.config import config_from_dict
from oocid.data.manifest import read_manifest, verify_shards
from oocid.device import resolve_device
from oocid.errors import DataError, InputError
from oocid.eval.classes import class_map, training_labels
from oocid.eval.embed import write_features
from oocid.eval.evaluate import num_classes_of
from oocid.eval.export import pre_fc
from oocid.method.knn import topk_accuracy


def state_hash(module: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor of the state dict."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        a = t.detach().cpu().contiguous()
        h.update(f"{name}|{a.dtype}|{tuple(a.shape)}\n".encode())
        h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


MIN_STEPS = 2000  # the default epochs give at least this many classifier steps
MIN_EPOCHS = 20


def default_epochs(n: int, batch_size: int) -> int:
    """Epochs of a probe on `n` training samples without --epochs: MIN_EPOCHS, or as many as
    give MIN_STEPS steps where the set is small. 20 epochs of 1,400 images are 120 Adam steps
    at lr 0.01, too few to fit a classifier on unit-norm features: on scikit-learn's 8 px
    digits the probe stopped at train top-1 0.931 (kNN 0.992); 334 epochs (2,004 steps) fit
    it to 0.996 and the held-out top-1 rose to 0.987."""
    return max(MIN_EPOCHS, math.ceil(MIN_STEPS / math.ceil(n / batch_size)))


@dataclass(frozen=True)
class ProbeConfig:
    epochs: int | None = None  # None: default_epochs
    lr: float = 0.01
    batch_size: int = 256
    weight_decay: float = 0.0
    seed: int = 0


def _batch(feats: np.ndarray, idx: np.ndarray, device: torch.device) -> Tensor:
    """(B, F) L2-normalised rows `idx` of the (N, F) features."""
    return F.normalize(torch.from_numpy(np.asarray(feats[idx], np.float32)).to(device), dim=1)


def fit_linear(feats: np.ndarray, labels: np.ndarray, num_classes: int, cfg: ProbeConfig,
               device: torch.device) -> tuple[nn.Linear, list[float]]:
    """Train nn.Linear(F, C) on (N, F) features (normalised per batch) and (N,) labels;
    returns it and the mean loss of each epoch."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    clf = nn.Linear(feats.shape[1], num_classes).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    epochs = default_epochs(len(labels), cfg.batch_size) if cfg.epochs is None else cfg.epochs
    if epochs < 1:
        raise ValueError(f"fit_linear: epochs must be >= 1 or None, got {epochs}")
    steps = epochs * math.ceil(len(labels) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))  # cosine to 0
    y_all = torch.from_numpy(labels).to(device)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=g).numpy()
        total = 0.0
        for a in range(0, len(order), cfg.batch_size):
            idx = np.sort(order[a:a + cfg.batch_size])  # sorted: sequential reads of the map
            loss = F.cross_entropy(clf(_batch(feats, idx, device)), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        losses.append(total / len(labels))
    return clf.eval(), losses


@torch.no_grad()
def accuracy(clf: nn.Linear, feats: np.ndarray, labels: np.ndarray, device: torch.device,
             batch: int = 4096) -> dict[int, float]:
    scores = torch.cat([clf(_batch(feats, np.arange(a, min(a + batch, len(labels))), device))
                        for a in range(0, len(labels), batch)])  # (M, C)
    return topk_accuracy(scores, torch.from_numpy(labels).to(device), (1, 5))


def linear_eval(checkpoint: Path, train_shards: Path, val_shards: Path, *,
                probe: ProbeConfig | None = None, head: bool = False, device_name: str = "auto",
                progress: bool = False, verify: bool = False) -> dict[str, Any]:
    """Linear-probe top-1/top-5 of a checkpoint's frozen features on labeled shards
    (`verify`: each shard's sha256 checked against its manifest first)."""
    probe = probe or ProbeConfig()
    if probe.epochs is not None and probe.epochs < 1:
        raise InputError(f"--epochs must be >= 1, got {probe.epochs}")
    if probe.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {probe.batch_size}")
    if not probe.lr > 0:
        raise InputError(f"--lr must be > 0, got {probe.lr}")
    tm, vm = read_manifest(train_shards), read_manifest(val_shards)
    if verify:
        verify_shards(tm, progress=progress)
        verify_shards(vm, progress=progress)
    device = resolve_device(device_name)
    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"], str(checkpoint))
    emb = model_from_checkpoint(state, device, str(checkpoint))
    mapping = class_map(tm, vm, val_shards)  # validation classes matched by name
    net: nn.Module = emb if head else pre_fc(emb)  # what embeds the images, frozen
    before = state_hash(net)
    with tempfile.TemporaryDirectory(prefix="oocid-linear-") as tmp:
        tr = write_features(net, emb.in_channels, tm, cfg, device, Path(tmp) / "train.npy",
                            progress=progress)
        va = write_features(net, emb.in_channels, vm, cfg, device, Path(tmp) / "val.npy",
                            progress=progress)
        xt, yt = np.load(tr.paths[0], mmap_mode="r"), np.load(tr.paths[2])
        xv, yv = np.load(va.paths[0], mmap_mode="r"), np.load(va.paths[2])
        if (yt < 0).any() or (yv < 0).any():
            raise DataError(f"{train_shards if (yt < 0).any() else val_shards}: unlabeled "
                            "samples; a linear probe needs labels")
        c = num_classes_of(tm, yt)
        yv = training_labels(torch.from_numpy(yv), mapping, val_shards).numpy()
        if int(yv.max()) >= c:
            raise DataError(f"{val_shards}: label {int(yv.max())} outside the {c} classes")
        if probe.epochs is None:
            probe = replace(probe, epochs=default_epochs(len(yt), probe.batch_size))
        clf, losses = fit_linear(xt, yt, c, probe, device)
        train_acc, val_acc = accuracy(clf, xt, yt, device), accuracy(clf, xv, yv, device)
        del xt, xv  # release the maps before the folder goes
    if state_hash(net) != before:
        raise DataError(f"{checkpoint}: the backbone changed during the linear probe (bug)")
    kind = "128-d embedding" if head else "pre-fc backbone"
    return {"top1": val_acc[1], "top5": val_acc[5], "train_top1": train_acc[1],
            "features": f"{kind} ({tr.dim}-d, L2-normalised, test transform)",
            "classes": c, "train_samples": tr.rows, "val_samples": va.rows,
            "epochs": probe.epochs, "lr": probe.lr, "batch_size": probe.batch_size,
            "loss_first_epoch": losses[0], "loss_last_epoch": losses[-1],
            "backbone_sha256": before, "checkpoint": str(checkpoint)}


def format_linear(res: dict[str, Any]) -> str:
    """`oocid linear`'s line: top-1 (top-5 only above 5 classes, as knn: else always 1), the
    training top-1 and the epochs it took (a probe that underfits shows a low training top-1)."""
    top5 = f"  top-5 {res['top5']:.4f}" if res["classes"] > 5 else ""
    return (f"linear top-1 {res['top1']:.4f}{top5}  (train top-1 {res['train_top1']:.4f}, "
            f"{res['epochs']} epochs; {res['features']}; backbone unchanged)")
