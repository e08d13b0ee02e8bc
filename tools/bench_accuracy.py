#!/usr/bin/env python3
"""The paper's loss ablation (Table 1's shape) on full Fashion-MNIST, at a fixed CPU budget.

    python3 tools/bench_accuracy.py                      # all runs, ~65 min on 2 quiet cores
    python3 tools/bench_accuracy.py --runs nce:4096:0.1 --budget-cpu-s 60
    python3 tools/bench_accuracy.py --dataset demo --runs nce_ema:4096:1 \\
        --negatives per-sample,shared --epochs 10 --seeds 0,1   # equal epochs, not equal time

Every run trains oocid's small conv net with `oocid.train.loop.train` (the shards and the on-disk
bank, exactly as `oocid train`; the demo's recipe otherwise: batch 256, SGD lr 0.03 cosine,
t 0.1, crop scale 0.5-1) and reports weighted kNN top-1 (k 200, t 0.07) of the 10,000 test
images against the training features recomputed without augmentation (`top1`) and against the
memory bank itself (`top1_bank`). Runs:

- `softmax`: the exact non-parametric softmax (the bank in core only: it scores all N rows);
- `nce`: the paper's NCE with the official one-shot Z, K = 1, 10, 512, 4096;
- `nce_ema`: NCE with a moving-average Z (0.99), K = 4096;
- `infonce`: the sampled softmax over [positive | K negatives], K = 4096;
each with the bank in core (cache fraction 1) and through a 10 % device cache (0.1), plus the
library's out-of-core default as it ships (`infonce:4096:0.1:per-sample`, the JSON's
`default: true` row, whatever --negatives says) and the baselines raw pixels and the untrained
network.

The budget is process CPU seconds of the training steps (all threads; the machine may be shared,
CPU time is steadier than wall time there). A short calibration run measures the CPU seconds
per step of each configuration; the run then trains for as many whole epochs as fit in the
budget (at least one), with the cosine schedule spanning them. Fashion-MNIST comes from the
Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist); nothing is
downloaded. Prints a table and, last, one line of JSON: a list of objects with `loss`, `k`,
`cache_fraction`, `top1` and `default: true` on the out-of-core default configuration; writes a
PNG plot of top-1 against K.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Threads sleep rather than spin while they wait: spinning would bill CPU time to the budget
# on a shared machine without doing work (set before torch loads OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

from oocid.bank.store import open_store
from oocid.config import Config, LossConfig, auto_loss, demo_config
from oocid.data.eval_data import eval_batches, extract_features
from oocid.data.manifest import read_manifest
from oocid.data.memory import decode_all
from oocid.data.writer import write_shards
from oocid.demo import demo_data_path, pixel_features
from oocid.eval.evaluate import knn_against, read_labels, tensor_chunks
from oocid.models import build_model

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
                "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]
DEFAULT_RUNS = ["softmax:0:1"] + [f"nce:{k}:{c}" for k in (1, 10, 512, 4096) for c in ("1", "0.1")] + [
    f"{loss}:4096:{c}" for loss in ("nce_ema", "infonce") for c in ("1", "0.1")] + [
    # the library's out-of-core default as it ships, whatever --negatives says
    f"{auto_loss(fits=False)}:{LossConfig().nce_k}:0.1:{LossConfig().negatives}"]
SHARD_ROWS = 250  # = bank chunk rows; a 10 % cache of 60,000 rows is 24 chunks


def read_idx(path: Path) -> np.ndarray:
    """An MNIST-style idx file (gzip), as uint8 (N,) labels or (N, H, W) images."""
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fmnist_npz(src: Path, out: Path) -> Path:
    missing = [name for name in FMNIST_FILES.values() if not (src / name).is_file()]
    if missing:
        sys.exit(f"{src}: Fashion-MNIST not found (missing {', '.join(missing)}); install the Debian "
                 "package: apt-get install dataset-fashion-mnist, or pass --data DIR")
    if not out.exists():
        arrays = {key: read_idx(src / name) for key, name in FMNIST_FILES.items()}
        arrays = {k: v.astype(np.int64) if k.endswith("labels") else v for k, v in arrays.items()}
        np.savez(out, class_names=np.array(CLASSES), **arrays)  # type: ignore[arg-type]
    return out


def shard_once(npz: Path, out: Path, split: str, shard_rows: int) -> Path:
    try:
        m = read_manifest(out)
        if m.shards and m.shards[0].stop - m.shards[0].start == shard_rows:
            return out
    except Exception:  # absent or stale: rebuild
        pass
    shutil.rmtree(out, ignore_errors=True)
    write_shards(npz, out, shard_size=shard_rows, seed=0, split=split, progress=False)
    return out


@dataclass
class Spec:
    loss: str  # softmax | nce | nce_ema | infonce
    k: int
    cache_fraction: float
    negatives: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.loss}-k{self.k}-c{self.cache_fraction:g}-{self.negatives}-s{self.seed}"


def parse_spec(text: str, negatives: str, seed: int) -> Spec:
    """LOSS:K:CACHE_FRACTION, or LOSS:K:CACHE_FRACTION:NEGATIVES to fix the negatives of that
    run whatever --negatives says."""
    try:
        loss, k, c, *neg = text.split(":")
        if len(neg) > 1 or (neg and neg[0] not in ("per-sample", "shared")):
            raise ValueError(text)
        spec = Spec(loss, int(k), float(c), neg[0] if neg else negatives, seed)
    except ValueError:
        sys.exit(f"--runs: {text!r} is not LOSS:K:CACHE_FRACTION[:per-sample|shared] "
                 "(e.g. nce:4096:0.1)")
    if spec.loss not in ("softmax", "nce", "nce_ema", "infonce") or not 0 < spec.cache_fraction <= 1:
        sys.exit(f"--runs: {text!r}: loss must be softmax|nce|nce_ema|infonce, 0 < fraction <= 1")
    if spec.loss == "softmax" and spec.cache_fraction < 1:
        sys.exit(f"--runs: {text!r}: the exact softmax scores every row; it needs the bank in core")
    return spec


def config_for(spec: Spec, n_rows: int, dim: int = 128) -> Config:
    cfg = demo_config()
    cfg.train.seed = spec.seed
    cfg.train.threads = 2
    if spec.loss == "softmax":
        cfg.loss.kind = "softmax"
    else:
        cfg.loss.kind = "infonce" if spec.loss == "infonce" else "nce"
        cfg.loss.z = "ema" if spec.loss == "nce_ema" else "oneshot"
        cfg.loss.nce_k = spec.k
        cfg.loss.negatives = spec.negatives
    # in core: a budget over the whole bank; else the fraction of the bank's bytes
    cfg.bank.cache_mb = n_rows * dim * 4 * (2.0 if spec.cache_fraction >= 1 else spec.cache_fraction) / 2**20
    return cfg


class StepClock:
    """Process CPU time at the start of every NPIDStep call (wraps the class method)."""

    def __init__(self) -> None:
        from oocid.method.npid import NPIDStep

        self.cls, self.orig = NPIDStep, NPIDStep.__call__
        self.times: list[float] = []

        def call(step_self: Any, *a: Any, **k: Any) -> Any:
            self.times.append(time.process_time())
            return self.orig(step_self, *a, **k)

        NPIDStep.__call__ = call  # type: ignore[method-assign, assignment]

    def close(self) -> None:
        self.cls.__call__ = self.orig  # type: ignore[method-assign]


def run_one(spec: Spec, shards: Path, work: Path, budget: float, epochs: int | None,
            calib_steps: int) -> dict[str, Any]:
    from oocid.train.loop import train

    m = read_manifest(shards)
    cfg = config_for(spec, m.n)
    quiet = lambda msg: None  # noqa: E731
    if epochs is None:  # calibrate: CPU seconds per step (data, step, bank), warm-up excluded
        d = work / f"calib-{spec.name}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        clock = StepClock()
        try:
            train(cfg, shards, d / "bank.npy", d / "run", progress=False, max_steps=calib_steps + 4,
                  log=quiet)
        finally:
            clock.close()
        shutil.rmtree(d, ignore_errors=True)
        per_step = (clock.times[-1] - clock.times[4]) / (len(clock.times) - 5)
        spe = -(-m.n // cfg.data.batch_size)
        epochs = max(1, int(budget // (per_step * spe)))
    cfg.optim.epochs = epochs
    d = work / spec.name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    clock = StepClock()
    w0 = time.perf_counter()
    try:
        res = train(cfg, shards, d / "bank.npy", d / "run", progress=False, log=quiet)
    finally:
        clock.close()
    wall = time.perf_counter() - w0
    cpu = time.process_time() - clock.times[0]
    collapse = sorted({c for r in res.metrics for c in r.get("collapse", [])})
    return {"cfg": cfg, "run": d, "epochs": epochs, "cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
            "final_loss": res.metrics[-1]["loss"], "collapse": collapse}


def features(model: torch.nn.Module, manifest: Any, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    f, idx, lab = extract_features(model, eval_batches(manifest, cfg.data, torch.device("cpu")),
                                   cfg.model.channels_last)
    order = idx.argsort()
    return f[order], lab[order]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("fmnist", "demo"), default="fmnist",
                    help="fmnist: the full 60,000/10,000 (Debian package); demo: the bundled 10,000/2,000")
    ap.add_argument("--data", type=Path, default=FMNIST_DIR, help="folder of the Fashion-MNIST .gz files")
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                    help="comma list of LOSS:K:CACHE_FRACTION[:NEGATIVES] (K ignored for softmax; "
                         "NEGATIVES per-sample|shared fixes that run's, else --negatives)")
    ap.add_argument("--negatives", default=LossConfig().negatives,
                    help="comma list of per-sample|shared (default: the library's, per-sample)")
    ap.add_argument("--seeds", default="0", help="comma list of training seeds")
    ap.add_argument("--budget-cpu-s", type=float, default=480.0,
                    help="CPU seconds (all threads) of training per run")
    ap.add_argument("--epochs", type=int, default=None, help="fixed epochs per run instead of a budget")
    ap.add_argument("--calib-steps", type=int, default=20)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/oocid-acc"))
    ap.add_argument("--plot", type=Path, default=None, help="PNG of top-1 against K (default: none)")
    args = ap.parse_args()

    torch.set_num_threads(2)
    work = args.workdir / args.dataset
    work.mkdir(parents=True, exist_ok=True)
    npz = demo_data_path() if args.dataset == "demo" else fmnist_npz(args.data, work / "fmnist.npz")
    tr = shard_once(npz, work / "shards-train", "train", SHARD_ROWS)
    te = shard_once(npz, work / "shards-test", "test", 1000)
    tm, vm = read_manifest(tr), read_manifest(te)
    train_labels = torch.from_numpy(read_labels(tm))
    base = demo_config()
    k_nn, t_nn = base.train.knn_k, base.train.knn_temperature

    def knn(q: torch.Tensor, ql: torch.Tensor, bank: torch.Tensor) -> float:
        return float(knn_against(q, ql, lambda: tensor_chunks(bank), train_labels, k_nn, t_nn, 10)["top1"])

    rows: list[dict[str, Any]] = []
    if not args.no_baselines:
        timgs, _, _ = decode_all(tm, 1)
        vimgs, vlab, _ = decode_all(vm, 1)
        rows.append({"loss": "pixels", "k": None, "cache_fraction": None,
                     "top1": knn(pixel_features(vimgs), torch.from_numpy(vlab), pixel_features(timgs))})
        torch.manual_seed(0)
        net = build_model(base.model.arch, 1, base.model.dim).eval()
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        (fq, ql), (ft, _) = features(net, vm, base), features(net, tm, base)
        rows.append({"loss": "untrained", "k": None, "cache_fraction": None, "top1": knn(fq, ql, ft)})
        for r in rows:
            print(f"# {r['loss']}: top-1 {r['top1']:.4f}", file=sys.stderr)

    from oocid.checkpoint import load_checkpoint, model_from_checkpoint

    defaults = LossConfig()
    default = {"loss": auto_loss(fits=False), "k": defaults.nce_k, "negatives": defaults.negatives}
    specs = [parse_spec(r, neg, int(s)) for r in args.runs.split(",") for neg in args.negatives.split(",")
             for s in args.seeds.split(",")]
    unique: dict[str, Spec] = {}
    for sp in specs:  # a run whose negatives are fixed (:NEG) is listed once per --negatives
        unique.setdefault(sp.name, sp)
    specs = list(unique.values())
    for spec in specs:
        if spec.loss == "softmax" and spec.negatives != args.negatives.split(",")[0]:
            continue  # no negatives to share or not
        if spec.loss != "softmax" and spec.k >= tm.n:
            sys.exit(f"--runs: K = {spec.k} needs more than {tm.n} training images")
        out = run_one(spec, tr, work, args.budget_cpu_s, args.epochs, args.calib_steps)
        cfg, d = out["cfg"], out["run"]
        state = load_checkpoint(d / "run" / "last.pt")
        model = model_from_checkpoint(state, torch.device("cpu"), str(d / "run" / "last.pt"))
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        (fq, ql), (ft, _) = features(model, vm, cfg), features(model, tm, cfg)
        with open_store(d / "bank.npy", read_only=True) as store:
            bank = torch.from_numpy(store.read_rows(0, store.n_rows))
        row = {"loss": spec.loss, "k": spec.k if spec.loss != "softmax" else None,
               "cache_fraction": spec.cache_fraction, "negatives": spec.negatives if spec.loss != "softmax"
               else None, "seed": spec.seed, "top1": knn(fq, ql, ft), "top1_bank": knn(fq, ql, bank),
               "epochs": out["epochs"], "cpu_s": out["cpu_s"], "wall_s": out["wall_s"],
               "final_loss": round(out["final_loss"], 4), "collapse": out["collapse"],
               "temperature": cfg.loss.temperature}
        if spec.loss == default["loss"] and spec.k == default["k"] and spec.cache_fraction < 1 \
                and spec.negatives == default["negatives"]:
            row["default"] = True
        rows.append(row)
        print(f"# {spec.name}: top-1 {row['top1']:.4f} (bank {row['top1_bank']:.4f}), {out['epochs']} "
              f"epochs, {out['cpu_s']} CPU s, {out['wall_s']} s", file=sys.stderr)
        shutil.rmtree(d, ignore_errors=True)

    head = f"{'loss':<10} {'K':>5} {'cache':>5} {'negatives':<10} {'seed':>4} {'top-1':>6} {'bank':>6} " \
           f"{'epochs':>6} {'CPU s':>6} {'wall s':>6}  note"
    print(f"# Fashion-MNIST ({args.dataset}: {tm.n} train / {vm.n} test), small conv net, "
          f"weighted kNN k={k_nn} t={t_nn}; budget "
          + (f"{args.epochs} epochs per run" if args.epochs else f"{args.budget_cpu_s:g} CPU s per run"))
    print(head)
    print("-" * len(head))
    for r in rows:
        note = ("default (out of core); " if r.get("default") else "") + (
            "collapse: " + ",".join(r["collapse"]) if r.get("collapse") else "")
        def f(v: Any, spec: str) -> str:
            return "" if v is None else format(v, spec)
        print(f"{r['loss']:<10} {f(r['k'], 'd'):>5} {f(r['cache_fraction'], 'g'):>5} "
              f"{r.get('negatives') or '':<10} {f(r.get('seed'), 'd'):>4} {r['top1']:>6.4f} "
              f"{f(r.get('top1_bank'), '.4f'):>6} {f(r.get('epochs'), 'd'):>6} {f(r.get('cpu_s'), '.0f'):>6} "
              f"{f(r.get('wall_s'), '.0f'):>6}  {note}")
    la = os.getloadavg()
    print(f"# load average at the end {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} (1, 5, 15 min; "
          f"{os.cpu_count()} cores); torch {torch.__version__}")
    if args.plot:
        plot_k(rows, args.plot)
        print(f"# plot: {args.plot}")
    print(json.dumps(rows))


def plot_k(rows: list[dict[str, Any]], path: Path) -> None:
    """Top-1 against K (log scale) per loss and cache fraction; horizontal lines for the rest."""
    from oocid.eval.plot import line_chart

    series: dict[str, list[tuple[float, float]]] = {}
    flat: dict[str, float] = {}
    for r in rows:
        if r["k"] is None:
            label = r["loss"] if r["loss"] in ("pixels", "untrained") else "exact softmax (in core)"
            flat[label] = r["top1"]
            continue
        where = "in core" if r["cache_fraction"] >= 1 else f"{r['cache_fraction']:.0%} cache"
        label = f"{r['loss']}, {where}"
        series.setdefault(label, []).append((float(np.log10(r["k"])), r["top1"]))
    line_chart(path, series, flat, title="Fashion-MNIST: kNN top-1 against K (log10)",
               xlabel="log10 K (negatives)", ylabel="kNN top-1")


if __name__ == "__main__":
    main()
