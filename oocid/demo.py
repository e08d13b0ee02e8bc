"""`oocid demo`: the whole path on the bundled Fashion-MNIST subset.

shard (10,000 train / 2,000 test) -> train with the on-disk bank -> weighted kNN on the
held-out images, compared with the same network untrained and with raw pixels.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from oocid.atomic import atomic_write
from oocid.config import Config, demo_config
from oocid.data.batch import image_channels
from oocid.data.eval_data import eval_batches, extract_features
from oocid.data.manifest import read_manifest
from oocid.data.writer import write_shards
from oocid.device import resolve_device
from oocid.errors import InputError
from oocid.eval.baselines import (
    LEARNED,
    LEARNED_BANK,
    PIXELS,
    PIXELS_CENTERED,
    UNTRAINED,
    unit_pixels,
    untrained_model,
)
from oocid.eval.evaluate import knn_against, read_labels, tensor_chunks
from oocid.eval.plot import plot_run, save_image
from oocid.eval.retrieval import contact_sheet
from oocid.train.loop import train

MARKER = ".oocid-demo"
DEFAULT_TOP1 = 0.827  # learned top-1 of the default run, as README's demo table shows it


def demo_data_path() -> Path:
    return Path(str(resources.files("oocid") / "data" / "fashion_mnist_demo.npz"))


def _prepare_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise InputError(f"{out}: exists and is not an oocid demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by `oocid demo`; deleted and rebuilt by the next demo run\n")


def pixel_features(images: np.ndarray, center: np.ndarray | None = None) -> torch.Tensor:
    """(N, ...) uint8 -> (N, P) L2-normalised float pixels (optionally minus a mean image)."""
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    return unit_pixels(x, None if center is None else torch.from_numpy(center))


def run_demo(out: Path, *, epochs: int | None = None, progress: bool = True,
             cfg: Config | None = None, say: Any = None) -> dict[str, Any]:
    """Run the demo; returns (and writes to OUT/demo.json) the accuracies."""
    say = say if say is not None else (lambda m: print(m, file=sys.stderr))
    t_start = time.perf_counter()
    cfg = cfg if cfg is not None else demo_config()
    if epochs is not None:
        cfg.optim.epochs = epochs
    out = Path(out)
    _prepare_out(out)
    npz = demo_data_path()
    say(f"oocid demo: sharding {npz.name} into {out / 'shards'}")
    train_dir, val_dir = out / "shards" / "train", out / "shards" / "val"
    write_shards(npz, train_dir, shard_size=1000, seed=0, split="train", progress=progress)
    write_shards(npz, val_dir, shard_size=1000, seed=0, split="test", progress=progress)
    t_train = time.perf_counter()
    n = cfg.optim.epochs
    say(f"oocid demo: training {cfg.model.arch} for {n} epoch{'' if n == 1 else 's'} "
        f"({cfg.loss.kind} loss), bank {out / 'bank.zarr'}")
    train(cfg, train_dir, out / "bank.zarr", out / "run", progress=progress, log=say)
    train_s = time.perf_counter() - t_train

    device = resolve_device(cfg.train.device)
    tm, vm = read_manifest(train_dir), read_manifest(val_dir)
    k, t = cfg.train.knn_k, cfg.train.knn_temperature
    ncls = len(tm.classes or ())
    train_labels = torch.from_numpy(read_labels(tm))

    from oocid.checkpoint import load_checkpoint, model_from_checkpoint

    state = load_checkpoint(out / "run" / "last.pt")
    learned = model_from_checkpoint(state, device, str(out / "run" / "last.pt"))
    untrained = untrained_model(cfg.model.arch, image_channels(tm), cfg.model.dim, cfg.train.seed,
                                device)
    if cfg.model.channels_last:
        learned = learned.to(memory_format=torch.channels_last)
        untrained = untrained.to(memory_format=torch.channels_last)

    def feats(model: torch.nn.Module, manifest: Any) -> tuple[torch.Tensor, torch.Tensor]:
        f, idx, lab = extract_features(model, eval_batches(manifest, cfg.data, device),
                                       cfg.model.channels_last)
        order = idx.argsort()
        return f[order], lab[order]

    def knn(q: torch.Tensor, ql: torch.Tensor, bank: torch.Tensor) -> float:
        return knn_against(q, ql, lambda: tensor_chunks(bank), train_labels, k, t, ncls)["top1"]

    res: dict[str, Any] = {}
    fq, ql = feats(learned, vm)
    ft, _ = feats(learned, tm)
    res["learned_top1"] = knn(fq, ql, ft)
    from oocid.bank.store import open_store

    with open_store(out / "bank.zarr", read_only=True) as store:
        bank_rows = torch.from_numpy(
            np.concatenate([rows for _, rows in store.iter_chunks()])).to(device)
    res["learned_bank_top1"] = knn(fq, ql, bank_rows)
    uq, _ = feats(untrained, vm)
    ut, _ = feats(untrained, tm)
    res["untrained_top1"] = knn(uq, ql, ut)

    data = np.load(npz)
    # pixel baselines, in the shards' index order (the shards shuffled the training images)
    from oocid.data.memory import decode_all

    timgs, _, _ = decode_all(tm, 1)
    vimgs, vlab, _ = decode_all(vm, 1)
    res["pixels_top1"] = knn(pixel_features(vimgs), torch.from_numpy(vlab), pixel_features(timgs))
    mean = timgs.reshape(len(timgs), -1).astype(np.float32).mean(0) / 255.0
    res["pixels_centered_top1"] = knn(pixel_features(vimgs, mean), torch.from_numpy(vlab),
                                      pixel_features(timgs, mean))
    data.close()
    pictures = _pictures(out, fq, ql, ft, timgs, vimgs, train_labels, tm.classes or ())
    res.update({"k": k, "temperature": t, "epochs": cfg.optim.epochs, "loss": cfg.loss.kind,
                "arch": cfg.model.arch, "train_images": tm.n, "test_images": vm.n,
                "train_seconds": round(train_s, 1),
                "total_seconds": round(time.perf_counter() - t_start, 1),
                "learned_features": "training features recomputed with the test transform",
                "pixels": "raw pixels scaled to [0,1], L2-normalised",
                "pictures": [str(p) for p in pictures]})
    atomic_write(out / "demo.json", json.dumps(res, indent=2) + "\n", "the demo's results")
    return res


def _pictures(out: Path, fq: torch.Tensor, ql: torch.Tensor, ft: torch.Tensor,
              timgs: np.ndarray, vimgs: np.ndarray, train_labels: torch.Tensor,
              classes: Sequence[str], per_row: int = 8) -> list[Path]:
    """OUT/learning_curve.png (the loss over epochs) and OUT/neighbours.png: one held-out query
    of each class (framed) with its nearest training images by the learned features."""
    curve = plot_run(out / "run", out / "learning_curve.png")
    queries = [int((ql == c).nonzero()[0]) for c in range(len(classes)) if bool((ql == c).any())]
    sims = fq[queries] @ ft.t()  # (Q, N) cosine similarities
    near = sims.topk(per_row, dim=1).indices
    rows = []
    for q, nn in zip(queries, near.tolist(), strict=True):
        row = [(Image.fromarray(vimgs[q].squeeze()), classes[int(ql[q])][:14])]
        row += [(Image.fromarray(timgs[j].squeeze()), classes[int(train_labels[j])][:14])
                for j in nn]
        rows.append(row)
    sheet = out / "neighbours.png"
    save_image(contact_sheet(rows, tile=56), sheet)
    return [curve, sheet]


def format_demo(res: dict[str, Any]) -> str:
    rows = [(LEARNED, res["learned_top1"]), (LEARNED_BANK, res["learned_bank_top1"]),
            (UNTRAINED, res["untrained_top1"]), (PIXELS, res["pixels_top1"]),
            (PIXELS_CENTERED, res["pixels_centered_top1"])]
    lines = [f"weighted kNN (k={res['k']}, t={res['temperature']}) top-1 on "
             f"{res['test_images']} held-out Fashion-MNIST images:",
             f"  {'features':<40} {'top-1':>6}"]
    lines += [f"  {name:<40} {acc:>6.3f}" for name, acc in rows]
    epochs, full = res["epochs"], demo_config().optim.epochs
    lines.append(f"  trained {epochs} epoch{'' if epochs == 1 else 's'} in "
                 f"{res['train_seconds']} s; total {res['total_seconds']} s")
    if epochs < full:  # a short run's numbers are not what the method learns here
        lines.append(f"  {epochs} of the demo's {full} epochs: a short run learns less; the "
                     f"default run gives {DEFAULT_TOP1:.3f}")
    lines += [f"  picture: {p}" for p in res.get("pictures", [])]
    return "\n".join(lines)
