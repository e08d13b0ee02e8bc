#!/usr/bin/env python3
"""Learned features against no learning, on every small labeled image set buildable offline.

    python3 tools/bench_quality.py                              # all sets, both recipes
    python3 tools/bench_quality.py --sets demo --budget-s 120 --out /tmp/q.png
    python3 tools/bench_quality.py --toy                        # tiny sizes (the test)

Sets (nothing is downloaded; a set that cannot be built is skipped with the reason):
- `demo`: the bundled Fashion-MNIST subset (oocid/data/fashion_mnist_demo.npz), 10,000 / 2,000;
- `fmnist`: full Fashion-MNIST, 60,000 / 10,000, from the Debian package dataset-fashion-mnist
  (/usr/share/datasets/fashion-mnist, or --fmnist-dir);
- `digits`: scikit-learn's bundled 8x8 digits (1,797: a seeded 500 held out), if sklearn imports.

Recipes: `default` is what `oocid train` picks with no config (oocid.train.recipe.recipe_for on
the set's manifest); `demo` is configs/demo.toml. Each (set, recipe) trains once with
`oocid.train.loop.train` (shards and the on-disk bank, as `oocid train`) and reports weighted
kNN top-1 (k 200, t 0.07) of the held-out images against the training images for: raw pixels
and mean-centred pixels (scaled to [0,1], L2-normalised; the same for both recipes), the
recipe's network untrained (seeded), and the trained network with the training features taken
from the memory bank (`bank`) and recomputed with the test transform (`learned`).

Budget rule (--budget-s, wall seconds of training per run on --threads threads): a probe trains
PROBE_STEPS optimiser steps in a throwaway folder and times the steps after the first
PROBE_WARM (wall clock at each step's start); with s seconds a step and S steps an epoch, the
run trains min(recipe epochs, max(1, floor(0.9 * budget / (s * S)))) epochs; the 10 % margin is
for the epoch ends (bank flush, checkpoint). The cosine schedule spans the epochs trained.
--toy: at most 400 training / 200 held-out images per set and at most 2 epochs.

Prints a table, writes a PNG bar chart (--out) and ends with one line of JSON: a list with one
object per (set, recipe) measured and one `{"set", "skipped"}` per set that could not be built.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # waiting threads sleep (shared machine)
import torch
from PIL import Image, ImageDraw, ImageFont

from oocid.bank.store import open_store
from oocid.checkpoint import load_checkpoint, model_from_checkpoint
from oocid.config import Config, load_config
from oocid.data.batch import image_channels
from oocid.data.eval_data import eval_batches, extract_features
from oocid.data.manifest import Manifest, read_manifest
from oocid.data.memory import decode_all
from oocid.data.writer import write_shards
from oocid.demo import demo_data_path, pixel_features
from oocid.eval.baselines import untrained_model
from oocid.eval.evaluate import knn_against, read_labels, tensor_chunks
from oocid.eval.plot import PALETTE, save_image
from oocid.train.recipe import recipe_for

ROOT = Path(__file__).resolve().parents[1]
SETS = ("demo", "fmnist", "digits")
RECIPES = ("default", "demo")
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {"train": "train", "test": "t10k"}
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot")
PROBE_STEPS, PROBE_WARM = 10, 2
TOY_TRAIN, TOY_TEST, TOY_EPOCHS = 400, 200, 2
KNN_K, KNN_T = 200, 0.07
COLUMNS = (("pixels_top1", "raw pixels"), ("pixels_centered_top1", "mean-centred pixels"),
           ("untrained_top1", "untrained network"), ("learned_bank_top1", "learned (bank)"),
           ("learned_top1", "learned (recomputed)"))


def _subset(arrays: dict[str, np.ndarray], toy: bool) -> dict[str, np.ndarray]:
    if not toy:
        return arrays
    rng = np.random.default_rng(0)
    out = dict(arrays)
    for split, n in (("train", TOY_TRAIN), ("test", TOY_TEST)):
        keep = np.sort(rng.permutation(len(arrays[f"{split}_labels"]))[:n])
        out[f"{split}_images"] = arrays[f"{split}_images"][keep]
        out[f"{split}_labels"] = arrays[f"{split}_labels"][keep]
    return out


def load_set(name: str, fmnist_dir: Path) -> dict[str, np.ndarray] | str:
    """The set's arrays (train/test images uint8, labels int64, class_names), or why not."""
    if name == "demo":
        with np.load(demo_data_path()) as z:
            return {k: z[k] for k in z.files}
    if name == "fmnist":
        sys.path.insert(0, str(ROOT / "tools"))
        from make_demo_data import read_idx as idx

        need = [fmnist_dir / f"{p}-{kind}-idx{d}-ubyte.gz" for p in FMNIST_FILES.values()
                for kind, d in (("images", 3), ("labels", 1))]
        missing = [p.name for p in need if not p.is_file()]
        if missing:
            return (f"{fmnist_dir}: missing {', '.join(missing)} (install the Debian package "
                    "dataset-fashion-mnist)")
        arrays = {"class_names": np.array(FMNIST_CLASSES)}
        for split, p in FMNIST_FILES.items():
            arrays[f"{split}_images"] = np.ascontiguousarray(idx(fmnist_dir / f"{p}-images-idx3-ubyte.gz"))
            arrays[f"{split}_labels"] = idx(fmnist_dir / f"{p}-labels-idx1-ubyte.gz").astype(np.int64)
        return arrays
    try:
        from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    except ImportError as e:
        return f"scikit-learn not importable ({e})"
    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    test, train = np.sort(order[:500]), np.sort(order[500:])
    labels = d.target.astype(np.int64)
    return {"train_images": images[train], "train_labels": labels[train],
            "test_images": images[test], "test_labels": labels[test],
            "class_names": np.array([str(c) for c in range(10)])}


def recipe_config(recipe: str, manifest: Manifest, threads: int) -> Config:
    if recipe == "default":
        cfg, _ = recipe_for(manifest)
    else:
        cfg = load_config(ROOT / "configs" / "demo.toml")
    cfg.train.threads = threads
    cfg.train.device = "cpu"
    return cfg


def seconds_per_step(cfg: Config, shards: Path, work: Path, steps: int) -> float:
    """Wall seconds of one optimiser step, timed on a throwaway probe run."""
    from oocid.method.npid import NPIDStep
    from oocid.train.loop import train

    times: list[float] = []
    orig = NPIDStep.__call__

    def call(step_self: Any, *a: Any, **k: Any) -> Any:
        times.append(time.perf_counter())
        return orig(step_self, *a, **k)

    d = work / "probe"
    shutil.rmtree(d, ignore_errors=True)
    NPIDStep.__call__ = call  # type: ignore[method-assign]
    try:
        train(cfg, shards, d / "bank.npy", d / "run", progress=False, max_steps=steps,
              log=lambda m: None)
    finally:
        NPIDStep.__call__ = orig  # type: ignore[method-assign]
        shutil.rmtree(d, ignore_errors=True)
    warm = min(PROBE_WARM, len(times) - 2) if len(times) > 2 else 0
    if len(times) < 2:
        return 0.0
    return (times[-1] - times[warm]) / (len(times) - 1 - warm)


def epochs_in_budget(recipe_epochs: int, per_step: float, steps_per_epoch: int, budget: float,
                     cap: int | None = None) -> int:
    """The module docstring's rule: the recipe's epochs, or as many as fit 90 % of the budget
    (at least one), and at most `cap`."""
    fit = int(0.9 * budget / (per_step * steps_per_epoch)) if per_step > 0 else recipe_epochs
    return max(1, min(recipe_epochs, fit, cap if cap is not None else recipe_epochs))


def features(model: torch.nn.Module, manifest: Manifest, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    f, idx, lab = extract_features(model, eval_batches(manifest, cfg.data, torch.device("cpu")),
                                   cfg.model.channels_last)
    order = idx.argsort()
    return f[order], lab[order]


def bench_set(name: str, arrays: dict[str, np.ndarray], recipes: list[str], budget: float,
              threads: int, toy: bool, work: Path) -> list[dict[str, Any]]:
    from oocid.train.loop import train

    arrays = _subset(arrays, toy)
    work.mkdir(parents=True, exist_ok=True)
    npz = work / "set.npz"
    np.savez(npz, **arrays)  # type: ignore[arg-type]
    tr, te = work / "shards-train", work / "shards-test"
    shard = max(250, len(arrays["train_labels"]) // 8)
    write_shards(npz, tr, shard_size=shard, seed=0, split="train", progress=False)
    write_shards(npz, te, shard_size=shard, seed=0, split="test", progress=False)
    tm, vm = read_manifest(tr), read_manifest(te)
    ncls = len(tm.classes or ())
    train_labels = torch.from_numpy(read_labels(tm))

    def knn(q: torch.Tensor, ql: torch.Tensor, bank: torch.Tensor) -> float:
        return round(float(knn_against(q, ql, lambda: tensor_chunks(bank), train_labels, KNN_K,
                                       KNN_T, ncls)["top1"]), 4)

    timgs, _, _ = decode_all(tm, image_channels(tm))
    vimgs, vlab, _ = decode_all(vm, image_channels(vm))
    ql_pix = torch.from_numpy(vlab)
    mean = timgs.reshape(len(timgs), -1).astype(np.float32).mean(0) / 255.0
    base = {"set": name, "train_images": tm.n, "test_images": vm.n, "classes": ncls,
            "side": int(timgs.shape[-1]),
            "pixels_top1": knn(pixel_features(vimgs), ql_pix, pixel_features(timgs)),
            "pixels_centered_top1": knn(pixel_features(vimgs, mean), ql_pix,
                                        pixel_features(timgs, mean))}
    rows = []
    for recipe in recipes:
        cfg = recipe_config(recipe, tm, threads)
        per_step = seconds_per_step(cfg, tr, work, PROBE_STEPS if not toy else 4)
        recipe_epochs = cfg.optim.epochs
        cfg.optim.epochs = epochs_in_budget(recipe_epochs, per_step, -(-tm.n // cfg.data.batch_size),
                                            budget, TOY_EPOCHS if toy else None)
        d = work / recipe
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        train(cfg, tr, d / "bank.npy", d / "run", progress=False, log=lambda m: None)
        train_s = time.perf_counter() - t0
        state = load_checkpoint(d / "run" / "last.pt")
        model = model_from_checkpoint(state, torch.device("cpu"), str(d / "run" / "last.pt"))
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        (fq, ql), (ft, _) = features(model, vm, cfg), features(model, tm, cfg)
        with open_store(d / "bank.npy", read_only=True) as store:
            bank = torch.from_numpy(store.read_rows(0, store.n_rows))
        net = untrained_model(cfg.model.arch, image_channels(tm), cfg.model.dim, cfg.train.seed,
                              torch.device("cpu"))
        if cfg.model.channels_last:
            net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        (uq, uql), (ut, _) = features(net, vm, cfg), features(net, tm, cfg)
        row = {**base, "recipe": recipe, "arch": cfg.model.arch, "image_size": cfg.data.image_size,
               "flip": cfg.data.flip, "recipe_epochs": recipe_epochs, "epochs": cfg.optim.epochs,
               "probe_s_per_step": round(per_step, 4), "train_s": round(train_s, 1),
               "untrained_top1": knn(uq, uql, ut), "learned_bank_top1": knn(fq, ql, bank),
               "learned_top1": knn(fq, ql, ft)}
        rows.append(row)
        print(f"# {name}/{recipe}: {row['epochs']} of {recipe_epochs} epochs in {row['train_s']} s; "
              f"learned {row['learned_top1']:.4f}, bank {row['learned_bank_top1']:.4f}",
              file=sys.stderr)
        shutil.rmtree(d, ignore_errors=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'set':<7} {'recipe':<8} {'train':>6} {'test':>6} {'epochs':>9} {'train s':>7} "
            + " ".join(f"{h:>9}" for h in ("raw px", "centred", "untrained", "bank", "learned")))
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['set']:<7} skipped: {r['skipped']}")
            continue
        ep = f"{r['epochs']}/{r['recipe_epochs']}"
        lines.append(f"{r['set']:<7} {r['recipe']:<8} {r['train_images']:>6} {r['test_images']:>6} "
                     f"{ep:>9} {r['train_s']:>7.0f} "
                     + " ".join(f"{r[key]:>9.4f}" for key, _ in COLUMNS))
    return "\n".join(lines)


def bar_chart(rows: list[dict[str, Any]], out: Path) -> Path:
    """Grouped bars: one group per (set, recipe), one bar per feature kind; a legend."""
    groups = [r for r in rows if "skipped" not in r]
    font = ImageFont.load_default()
    bar, gap, x0, y0, plot_h = 18, 30, 60, 40, 320
    width = max(520, x0 + len(groups) * (len(COLUMNS) * bar + gap) + 20)
    img = Image.new("RGB", (width + 200, y0 + plot_h + 60), "white")
    d = ImageDraw.Draw(img)
    d.text((x0, 10), f"weighted kNN top-1 (k {KNN_K}, t {KNN_T}) on held-out images", fill="black",
           font=font)
    y1 = y0 + plot_h
    lo = min([r[k] for r in groups for k, _ in COLUMNS] + [1.0])
    lo = max(0.0, np.floor(lo * 10 - 1) / 10) if groups else 0.0

    def py(v: float) -> float:
        return y1 - (v - lo) / max(1.0 - lo, 1e-6) * plot_h

    for i in range(6):
        t = lo + (1.0 - lo) * i / 5
        d.line([x0, py(t), width, py(t)], fill=(230, 230, 230))
        d.text((8, py(t) - 6), f"{t:.2f}", fill="black", font=font)
    d.line([x0, y0, x0, y1, width, y1], fill="black")
    for g, r in enumerate(groups):
        gx = x0 + 10 + g * (len(COLUMNS) * bar + gap)
        for j, (key, _) in enumerate(COLUMNS):
            bx = gx + j * bar
            d.rectangle([bx, py(r[key]), bx + bar - 3, y1], fill=PALETTE[j % len(PALETTE)])
        d.text((gx, y1 + 6), f"{r['set']}", fill="black", font=font)
        d.text((gx, y1 + 20), f"{r['recipe']} ({r['epochs']} ep)", fill="black", font=font)
    for j, (_, label) in enumerate(COLUMNS):
        ly = y0 + 16 * j
        d.rectangle([width + 10, ly, width + 24, ly + 10], fill=PALETTE[j % len(PALETTE)])
        d.text((width + 30, ly), label, fill="black", font=font)
    save_image(img, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma list of {'|'.join(SETS)}")
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of {'|'.join(RECIPES)}")
    ap.add_argument("--budget-s", type=float, default=180.0, help="wall seconds of training per run")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=Path("bench_quality.png"), help="PNG bar chart")
    ap.add_argument("--toy", action="store_true",
                    help=f"{TOY_TRAIN} train / {TOY_TEST} test images, <= {TOY_EPOCHS} epochs")
    ap.add_argument("--fmnist-dir", type=Path, default=FMNIST_DIR)
    ap.add_argument("--workdir", type=Path, default=None, help="scratch (default: a temp folder)")
    args = ap.parse_args(argv)
    sets, recipes = args.sets.split(","), args.recipes.split(",")
    for what, got, ok in (("--sets", sets, SETS), ("--recipes", recipes, RECIPES)):
        bad = [s for s in got if s not in ok]
        if bad:
            ap.error(f"{what}: unknown {', '.join(bad)} (choose from {', '.join(ok)})")
    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="oocid-quality-"))
    rows: list[dict[str, Any]] = []
    try:
        for name in sets:
            got = load_set(name, args.fmnist_dir)
            if isinstance(got, str):
                print(f"# {name}: skipped: {got}", file=sys.stderr)
                rows.append({"set": name, "skipped": got})
                continue
            rows += bench_set(name, got, recipes, args.budget_s, args.threads, args.toy, work / name)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"# weighted kNN top-1 (k {KNN_K}, t {KNN_T}); budget {args.budget_s:g} s of training "
          f"per run, {args.threads} threads{'; toy sizes' if args.toy else ''}; epochs: trained/recipe")
    print(table(rows))
    la = os.getloadavg()
    print(f"# load average at the end {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; {os.cpu_count()} cores; "
          f"torch {torch.__version__}")
    print(f"# plot: {bar_chart(rows, args.out)}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
