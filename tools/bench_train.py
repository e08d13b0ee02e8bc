"""Benchmark an NPID training step against the model alone, and the data pipeline alone.

Three throughputs (images/s) per configuration, all on batches already in memory except the
pipeline's own:
    npid    oocid.method.npid.NPIDStep exactly as oocid.train.loop builds it: model forward -> loss
            against the bank (positives + K negatives gathered from a ChunkCache over an
            on-disk store, made by oocid.train.setup.make_cache) -> backward -> SGD step -> momentum
            update of the bank -> cache window advance (end_step).
    model   the same model and optimiser on the same batches: forward, a trivial loss
            ((f * fixed unit target).sum()), backward, SGD step. No bank.
    pipeline  the data path alone, two ways:
            in-memory  oocid.data.augment.BatchAugment ("cifar" recipe) on a uint8 tensor, as
                       oocid.data.memory.InMemoryData does for small sets that fit in memory;
            stream     oocid.data.stream.StreamData over tar shards written by
                       oocid.data.writer.write_shards, as make_train_data builds it (32 px:
                       per-sample PNG decode, each batch augmented by BatchAugment "cifar" in
                       its --workers DataLoader worker), wall time of whole epochs including
                       worker start-up and shuffle-buffer fill.
            The row's `pipeline_images_per_s` is the path the trainer would pick for a set of
            --rows images of that size (oocid.data.stream.make_train_data with data.in_memory =
            "auto" and the default in_memory_max_mb), the other is reported too.
The headline is ratio = npid / model.

Defaults (CPU): B 256, K 4096, D 128, the trainer's loss for a bank that does not fit its cache
(loss.kind "auto" -> InfoNCE; --loss nce for NCE with a moving-average Z), negatives per-sample
(official) and shared; bank of --rows 1.28e6 rows float32 on disk (created once under
--workdir, reused), ChunkCache at 10 % of the rows (make_cache sizes the pool),
steps_per_epoch = ceil(N / B); torch threads 2; channels_last as the trainer does.
Models: "small" (the narrow conv net) and "cifar_resnet18" (ResNet-18 with the CIFAR stem, the
net one trains at 32 px; torchvision's ImageNet-stem "resnet18" would downsample 32 px to 1x1),
both on 3-channel 32 px images. Where CUDA is present "resnet50" at 224 px is added (bf16
autocast, bank cache on the GPU, as the trainer's precision "auto").

The timed steps of the model alone and of each NPID variant run in --rounds interleaved rounds
(rotating order) on persistent models and caches, so a change in the machine's load hits all of
them alike; the ratio's spread over the rounds is reported.

The positives' indices follow the streaming trainer's order (ShardStream + DataLoader): shards
(= bank chunks of 4096 consecutive rows) in a shuffled order dealt to --workers workers, each
with a 2048-sample shuffle buffer, batches round-robin from the workers. They are precomputed,
like the image batches (a few random float batches, cycled), outside the timed region.

Usage:
    python tools/bench_train.py                           # the default run (~10 min on 2 cores)
    python tools/bench_train.py --model small --negatives shared --steps 10 --rows 200000
Prints an environment line, a profile of the NPID step's parts, a table and footnotes; the
LAST line is a JSON list with one object per configuration. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHUNK_ROWS = 4096  # = the shard size: chunk c of the bank holds the indices of shard c
SHUFFLE_BUFFER = 2048  # DataConfig.shuffle_buffer default
DIM = 128
MEAN = [0.4914, 0.4822, 0.4465]  # CIFAR statistics (only for realism of the transforms)
STD = [0.2470, 0.2435, 0.2616]
ARCH_SIZE = {"small": 32, "cifar_resnet18": 32, "resnet50": 224}
# timed steps / warm-up steps per arch on CPU (resnet18 at 32 px takes seconds per step there)
CPU_STEPS = {"small": (160, 10), "cifar_resnet18": (6, 1), "resnet50": (2, 1)}
GPU_STEPS = (30, 5)


def log(msg: str) -> None:
    print(f"[bench_train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- inputs ------------------------------------------------------------------------------------

from bench_bank import _worker_stream  # noqa: E402 - one definition of the stream order


def stream_index_batches(n: int, batch: int, workers: int, count: int, seed: int = 0
                         ) -> list[np.ndarray]:
    """The first `count` index batches of an epoch as the streaming trainer feeds them."""
    n_shards = -(-n // CHUNK_ROWS)
    order = np.random.default_rng([seed, 4, 0]).permutation(n_shards)
    streams = [_worker_stream(order[w::workers], n, SHUFFLE_BUFFER,
                              np.random.default_rng([seed, 5, 0, w])) for w in range(workers)]
    out: list[np.ndarray] = []
    w = 0
    while len(out) < count:
        got = [i for _, i in zip(range(batch), streams[w], strict=False)]
        if len(got) < batch:
            raise ValueError(f"--rows {n} is too small for {count} batches of {batch}")
        out.append(np.asarray(got, dtype=np.int64))
        w = (w + 1) % workers
    return out


def random_index_batches(n: int, batch: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """The first `count` index batches of an epoch in InMemoryData's order (a permutation)."""
    order = np.random.default_rng([seed, 1, 0]).permutation(n)
    if count * batch > n:
        raise ValueError(f"--rows {n} is too small for {count} batches of {batch}")
    return [order[i * batch:(i + 1) * batch].astype(np.int64) for i in range(count)]


def ensure_bank(workdir: Path, rows: int) -> Path:
    """The bank file for `rows` rows; created once (random unit rows) and reused."""
    from oocid.bank.create import _remove, create_store
    from oocid.bank.store import open_store

    path = workdir / f"train_bank_{rows}.npy"
    workdir.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            with open_store(path) as s:
                if (s.n_rows, s.dim, s.chunk_rows, s.meta.dtype) == (rows, DIM, CHUNK_ROWS,
                                                                     "float32"):
                    return path
        except Exception as e:  # any damage: recreate
            log(f"{path}: unusable ({e}); recreating")
        _remove(path)
        for ext in (".meta.json", ".journal", ".journal.tmp"):
            Path(str(path) + ext).unlink(missing_ok=True)
    log(f"creating {path} ({rows} x {DIM} float32, {rows * DIM * 4 / 1e9:.2f} GB)")
    t = time.perf_counter()
    create_store(path, rows, DIM, chunk_rows=CHUNK_ROWS, seed=0).close()
    log(f"created {path} in {time.perf_counter() - t:.1f} s")
    return path


def make_cfg(a: argparse.Namespace, arch: str, negatives: str, size: int) -> Any:
    from oocid.config import Config, validate

    cfg = Config()
    cfg.model.arch = arch
    cfg.model.dim = DIM
    cfg.model.channels_last = True
    cfg.data.image_size = size
    cfg.data.batch_size = a.batch
    cfg.data.workers = a.workers
    cfg.loss.kind = a.loss
    cfg.loss.nce_k = a.k
    cfg.loss.z = "ema"  # for --loss nce: the moving-average Z (the official one-shot Z collapses)
    cfg.loss.negatives = negatives
    cfg.optim.lr = 0.03
    cfg.optim.momentum = 0.9
    cfg.optim.weight_decay = 5e-4
    # make_cache: budget rows = int(cache_mb * 2**20) // (4 D) = the fraction of the rows
    cfg.bank.cache_mb = a.cache_fraction * a.rows * DIM * 4 / 2**20
    cfg.bank.pool_chunks = a.pool_chunks
    cfg.train.threads = a.threads
    validate(cfg, "bench_train")
    return cfg


def new_model(arch: str, device: torch.device) -> tuple[Any, torch.optim.Optimizer]:
    """As oocid.train.loop._train builds them (channels_last, build_optimizer)."""
    from oocid.config import Config
    from oocid.models import build_model
    from oocid.train.setup import build_optimizer

    cfg = Config()
    cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay = 0.03, 0.9, 5e-4
    model = build_model(arch, 3, DIM).to(device).to(memory_format=torch.channels_last)
    model.train()
    return model, build_optimizer(cfg, model)


# ---- the timed loops -----------------------------------------------------------------------

class ModelRunner:
    """The model alone: forward + trivial loss + backward + SGD step, no bank."""

    def __init__(self, arch: str, images: list[torch.Tensor], device: torch.device,
                 precision: str) -> None:
        torch.manual_seed(0)
        self.model, self.opt = new_model(arch, device)
        self.target = torch.nn.functional.normalize(torch.randn(DIM, device=device), dim=0)
        self.images, self.device, self.precision = images, device, precision
        self.s = 0

    def run(self, steps: int) -> list[float]:
        """Per-step seconds of `steps` steps."""
        from oocid.device import autocast

        times = []
        for _ in range(steps):
            x = self.images[self.s % len(self.images)]
            self.s += 1
            sync(self.device)
            t0 = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            xc = x.contiguous(memory_format=torch.channels_last)  # as NPIDStep does
            with autocast(self.precision, self.device):
                f = self.model(xc)
            loss = (f * self.target).sum()
            loss.backward()
            self.opt.step()
            float(loss.item())  # NPIDStep reads the loss too
            sync(self.device)
            times.append(time.perf_counter() - t0)
        return times

    def close(self) -> None:
        pass


class _Parts:
    """Wall time of the NPID step's parts, by wrapping the bank, the model and the loss."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.acc: dict[str, float] = defaultdict(float)
        self.phase = "update"

    def wrap(self, name: Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kw: Any) -> Any:
            sync(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            sync(self.device)
            self.acc[name(*args)] += time.perf_counter() - t0
            return out
        return timed


def instrument(npid: Any, bank: Any, parts: _Parts) -> None:
    """Wrap (on the instances only) the calls NPIDStep makes, to split its time."""

    def gather_name(index: torch.Tensor) -> str:  # negatives come from `draw`
        return "bank gather (update: old rows)" if parts.phase == "update" \
            else "bank gather (positives)"

    bank.gather = parts.wrap(gather_name, bank.gather)
    bank.draw = parts.wrap(lambda *a: "bank draw (negatives, located)", bank.draw)
    bank.update = parts.wrap(lambda *a: "bank update (write rows)", bank.update)
    bank.end_step = parts.wrap(lambda *a: "bank end_step (window advance)", bank.end_step)
    model_fwd = npid.model
    npid.model = parts.wrap(lambda *a: "model forward", model_fwd)
    loss_fn = npid.loss

    def loss(*args: Any) -> Any:
        parts.phase = "loss"
        try:
            return parts.wrap(lambda *a: "_loss total", loss_fn)(*args)
        finally:
            parts.phase = "update"

    npid.loss = loss


class NPIDRunner:
    """NPIDStep as oocid.train.loop builds it, over a ChunkCache made by make_cache; the positives'
    index batches continue from call to call (the cache stays in its steady state)."""

    def __init__(self, a: argparse.Namespace, arch: str, negatives: str, size: int, store: Any,
                 images: list[torch.Tensor], index_batches: list[torch.Tensor],
                 device: torch.device, precision: str, profile: bool = False) -> None:
        from oocid.method.npid import NPIDStep
        from oocid.method.zest import ZEstimator
        from oocid.train.setup import cache_budget_rows, make_cache

        self.cfg = cfg = make_cfg(a, arch, negatives, size)
        torch.manual_seed(0)
        model, opt = new_model(arch, device)
        self.store = store
        spe = -(-a.rows // a.batch)  # StreamData.steps_per_epoch
        self.bank = bank = make_cache(cfg, store, device, spe, cache_budget_rows(cfg, store, device))
        self.info: dict[str, Any] = {
            "cache_rows": bank.n_slots * bank.r, "slots": bank.n_slots, "window_chunks": bank.w,
            "pool_chunks": bank.n_slots - bank.w, "full": bank.full, "steps_per_epoch": spe,
            "chunk_loads": 0, "writebacks": 0}
        zest = ZEstimator(cfg.loss.z, cfg.loss.z_momentum) if cfg.loss.kind == "nce" else None
        self.npid = NPIDStep(cfg, model, opt, bank, a.rows, zest, cfg.train.seed, precision)
        self.parts = _Parts(device)
        if profile:
            instrument(self.npid, bank, self.parts)
        self.label = torch.full((a.batch,), -1, dtype=torch.int64, device=device)
        self.images, self.index, self.device = images, index_batches, device
        self.s = 0

    def run(self, steps: int, count: bool = True) -> list[float]:
        """Per-step seconds of `steps` steps; `count`: add their chunk loads to the stats."""
        from oocid.data.batch import Batch

        if self.bank.io is not None:
            self.bank.io.drain()  # settle background I/O left by whatever ran before
        loads0, wb0 = self.bank.chunk_loads, self.bank.writebacks
        times = []
        for _ in range(steps):
            s = self.s
            self.s += 1
            batch = Batch(self.images[s % len(self.images)], self.index[s], self.label)
            sync(self.device)
            t0 = time.perf_counter()
            out = self.npid(batch, s, self.cfg.optim.lr)
            sync(self.device)
            times.append(time.perf_counter() - t0)
            if out.skipped:
                raise RuntimeError(f"NPID step {s} was skipped (non-finite loss)")
        if count:
            self.info["chunk_loads"] += self.bank.chunk_loads - loads0
            self.info["writebacks"] += self.bank.writebacks - wb0
        return times

    def profile(self, times: list[float]) -> dict[str, float]:
        """Seconds per step of each part over the steps run since the last reset."""
        acc = dict(self.parts.acc)
        inner = sum(v for k, v in acc.items() if k.startswith("bank") and
                    ("positives" in k or "negatives" in k))
        acc["loss: scores + loss (rest of loss)"] = acc.pop("_loss total", 0.0) - inner
        named = sum(acc.values())
        acc["backward + optimiser step + rest"] = sum(times) - named
        return {k: v / len(times) for k, v in acc.items()}

    def close(self) -> None:
        self.bank.close()  # stop the I/O thread (rows stay dirty in the cache: not flushed)


# ---- the data pipeline alone -------------------------------------------------------------------

def pipeline_in_memory(a: argparse.Namespace, size: int, device: torch.device) -> float:
    """images/s of BatchAugment ("cifar" recipe) on uint8 batches held in memory, as
    InMemoryData.epoch_batches does (index the set, augment on the device)."""
    from oocid.data.augment import batch_augment_for
    from oocid.data.batch import mix_seed

    n = 8192
    g = torch.Generator().manual_seed(0)
    src = size if size <= 64 else round(size * 256 / 224)
    imgs = torch.randint(0, 256, (n, 3, src, src), dtype=torch.uint8, generator=g).to(device)
    aug = batch_augment_for("cifar", size, MEAN, STD, 0.2)
    order = torch.randperm(n, generator=g)
    steps, warm = 20, 3
    t = 0.0
    for s in range(warm + steps):
        j = (s * a.batch) % (n - a.batch)
        sync(device)
        t0 = time.perf_counter()
        idx = order[j:j + a.batch].to(device)
        ga = torch.Generator(device=device).manual_seed(mix_seed(0, 2, 0, s))
        x = aug(imgs[idx], ga)
        sync(device)
        if s >= warm:
            t += time.perf_counter() - t0
        assert x.shape == (a.batch, 3, size, size)
    return steps * a.batch / t


def ensure_shards(workdir: Path, size: int, n: int) -> Path:
    """A shard set of n random RGB images (PNG) of size x size, created once."""
    from oocid.data.manifest import read_manifest
    from oocid.data.writer import write_shards

    out = workdir / f"train_stream_{size}px_{n}"
    try:
        if read_manifest(out).n == n:
            return out
    except Exception:  # absent or damaged: (re)write
        pass
    log(f"writing {n} random {size}x{size} PNGs as shards under {out}")
    rng = np.random.default_rng(0)
    # smooth-ish random images (low-frequency noise + a little grain) compress like photos
    # more than pure noise does
    low = rng.integers(0, 256, (n, size // 4 + 1, size // 4 + 1, 3), dtype=np.uint8)
    imgs = np.repeat(np.repeat(low, 4, axis=1), 4, axis=2)[:, :size, :size]
    imgs = np.clip(imgs.astype(np.int16) + rng.integers(-8, 9, imgs.shape), 0, 255)
    npz = workdir / f"train_stream_{size}px_{n}.npz"
    np.savez(npz, images=imgs.astype(np.uint8))
    write_shards(npz, out, shard_size=n // 8, seed=0, progress=False)
    npz.unlink()
    return out


def pipeline_stream(a: argparse.Namespace, size: int, device: torch.device, workdir: Path
                    ) -> float:
    """images/s of StreamData as oocid.data.stream.make_train_data builds it for data.in_memory =
    "no" in --workers workers (same-size images up to 64 px: per-sample decode, the batch
    augmented in its worker by BatchAugment; larger: per-sample decode + oocid.data.stream_aug's
    transform to uint8, normalised per batch): whole epochs' wall time, worker start-up and
    buffer fill included."""
    from oocid.config import DataConfig
    from oocid.data.manifest import read_manifest
    from oocid.data.stream import make_train_data

    n = a.stream_images if size <= 64 else min(a.stream_images, 4096)
    shards = ensure_shards(workdir, size, n)
    manifest = read_manifest(shards)
    recipe = "cifar" if size <= 64 else "imagenet"
    cfg = DataConfig(image_size=size, augment=recipe, crop_scale_min=0.2, in_memory="no",
                     batch_size=a.batch, workers=a.workers, shuffle_buffer=SHUFFLE_BUFFER,
                     mean=list(MEAN), std=list(STD))
    data = make_train_data(manifest, cfg, 0, device)
    best = 0.0
    for epoch in range(2):
        t0 = time.perf_counter()
        seen = 0
        for b in data.epoch_batches(epoch):
            seen += int(b.index.numel())
        sync(device)
        best = max(best, seen / (time.perf_counter() - t0))
    return best


def trainer_uses_in_memory(rows: int, size: int) -> bool:
    """oocid.data.batch.fits_in_memory with the default data.in_memory_max_mb (3 channels)."""
    from oocid.config import DataConfig

    return rows * 3 * size * size <= DataConfig().in_memory_max_mb * 2**20


# ---- main ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from oocid.config import auto_loss

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="comma-separated archs (default: small,cifar_resnet18 [+resnet50 on "
                        "CUDA]); 'resnet18' is accepted as cifar_resnet18 at 32 px")
    p.add_argument("--negatives", default="per-sample,shared",
                   help="comma-separated: per-sample (official), shared")
    p.add_argument("--loss", choices=("infonce", "nce", "softmax"), default=auto_loss(fits=False),
                   help="the loss over sampled negatives (default: the trainer's out-of-core "
                        "default, loss.kind auto for a bank larger than its cache); softmax: the "
                        "exact softmax over the whole bank (needs --cache-fraction 1)")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps per configuration (default: per model, see CPU_STEPS)")
    p.add_argument("--warmup", type=int, default=-1, help="untimed steps first (default: per model)")
    p.add_argument("--rounds", type=int, default=4,
                   help="the timed steps of the model alone and of each NPID variant are run in "
                        "this many interleaved rounds (rotating order), so drift in the "
                        "machine's load hits all of them alike")
    p.add_argument("--rows", type=int, default=1_280_000, help="bank rows N")
    p.add_argument("--cache-fraction", type=float, default=0.1)
    p.add_argument("--pool-chunks", type=int, default=0,
                   help="cache chunks for the positives (bank.pool_chunks; 0: make_cache's "
                        "default); the rest of the cache is the negatives' window")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers of the stream and of the positives' order "
                        "(default: 2 on CPU, min(8, cores) on CUDA)")
    p.add_argument("--stream-images", type=int, default=16384)
    p.add_argument("--order", choices=("stream", "random"), default="stream",
                   help="order of the positives: the streaming trainer's (default) or "
                        "InMemoryData's random permutation")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--workdir", default="/tmp/oocid-bench")
    p.add_argument("--no-pipeline", action="store_true", help="skip the pipeline measurements")
    p.add_argument("--no-profile", action="store_true", help="skip the per-part profile")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    from oocid.device import keep_large_buffers

    keep_large_buffers()  # as oocid.train.loop.train does (process-wide: the model alone gets it too)
    if a.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(a.device)
    from oocid.device import resolve_precision

    precision = resolve_precision("auto", device)
    notes: list[str] = []
    if a.model is None:
        archs = ["small", "cifar_resnet18"]
        if device.type == "cuda":
            archs.append("resnet50")
        else:
            notes.append("resnet50 at 224 px skipped: no CUDA device")
    else:
        archs = ["cifar_resnet18" if m.strip() == "resnet18" else m.strip()
                 for m in a.model.split(",") if m.strip()]
    for m in archs:
        if m not in ARCH_SIZE:
            raise SystemExit(f"--model: unknown arch {m!r} (choose from small, cifar_resnet18 "
                             "(alias resnet18, at 32 px), resnet50)")
    negs = [x.strip() for x in a.negatives.split(",") if x.strip()]
    for x in negs:
        if x not in ("per-sample", "shared"):
            raise SystemExit(f"--negatives: {x!r} is not per-sample or shared")
    if a.workers < 1:
        a.workers = 2 if device.type != "cuda" else min(8, os.cpu_count() or 2)
    workdir = Path(a.workdir)
    env = (f"# torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
           f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}"
           f", precision {precision}, cpu {platform.processor() or platform.machine()} x "
           f"{os.cpu_count()}; B {a.batch}, K {a.k}, D {DIM}, N {a.rows} rows on disk, cache "
           f"{a.cache_fraction:g} of the rows, loss {a.loss}, SGD lr 0.03 m 0.9 wd 5e-4, "
           f"channels_last, stream workers {a.workers}, positives in {a.order} order; "
           f"load average at start {_load()}")
    log(env[2:])
    from oocid.bank.store import open_store

    bank_path = ensure_bank(workdir, a.rows)

    results: list[dict[str, Any]] = []
    profiles: dict[tuple[str, str], dict[str, float]] = {}
    pipe_cache: dict[int, tuple[float | None, float | None]] = {}
    for arch in archs:
        size = ARCH_SIZE[arch]
        steps, warmup = GPU_STEPS if device.type == "cuda" else CPU_STEPS[arch]
        steps = a.steps or steps
        warmup = warmup if a.warmup < 0 else a.warmup
        g = torch.Generator().manual_seed(1)
        images = [torch.randn(a.batch, 3, size, size, generator=g).to(device) for _ in range(4)]
        rounds = max(1, min(a.rounds, steps))
        per_round = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
        n_idx = 2 * warmup + steps + (min(steps, 12) if not a.no_profile else 0)
        made = (stream_index_batches(a.rows, a.batch, a.workers, n_idx)
                if a.order == "stream" else random_index_batches(a.rows, a.batch, n_idx))
        idx = [torch.from_numpy(x).to(device) for x in made]
        store = open_store(bank_path)
        runners: dict[str, Any] = {"model": ModelRunner(arch, images, device, precision)}
        for neg in negs:
            runners[neg] = NPIDRunner(a, arch, neg, size, store, images, idx, device, precision)
        log(f"{arch} @ {size}px: model alone and NPID ({', '.join(negs)} negatives): {warmup} "
            f"warm-up steps each, then {steps} timed steps each in {rounds} interleaved rounds")
        times: dict[str, list[float]] = {k: [] for k in runners}
        by_round: dict[str, list[float]] = {k: [] for k in runners}
        for r in runners.values():
            if isinstance(r, NPIDRunner):
                r.run(warmup, count=False)
            else:
                r.run(warmup)
        for i in range(rounds):
            names = list(runners)
            names = names[i % len(names):] + names[:i % len(names)]  # rotate the order
            for name in names:
                t = runners[name].run(per_round[i])
                times[name] += t
                by_round[name].append(sum(t) / len(t))
            log(f"  round {i + 1}/{rounds}: " + ", ".join(
                f"{k} {1e3 * by_round[k][-1]:.0f} ms/step" for k in runners))
        for r in runners.values():
            r.close()
        m_times = times["model"]
        npid_rows = [(neg, times[neg], runners[neg].info,
                      [by_round["model"][i] / by_round[neg][i] for i in range(rounds)])
                     for neg in negs]
        if not a.no_profile and (arch == "small" or device.type == "cuda"):
            for neg in negs:
                log(f"{arch}: profiling the NPID step, {neg} negatives (instrumented, separate)")
                pr = NPIDRunner(a, arch, neg, size, store, images, idx, device, precision,
                                profile=True)
                pr.s = warmup + steps  # continue where the timed steps ended
                pr.run(warmup, count=False)
                pr.parts.acc.clear()
                t = pr.run(min(steps, 12))
                profiles[(arch, neg)] = pr.profile(t)
                pr.close()
        store.close()
        if size not in pipe_cache:
            if a.no_pipeline:
                pipe_cache[size] = (None, None)
            else:
                log(f"pipeline alone at {size}px: in-memory batched augmentation")
                mem_ips = pipeline_in_memory(a, size, device)
                log(f"pipeline alone at {size}px: streaming, {a.workers} workers")
                pipe_cache[size] = (mem_ips, pipeline_stream(a, size, device, workdir))
        mem, stream = pipe_cache[size]
        in_mem = trainer_uses_in_memory(a.rows, size)
        pipe = mem if in_mem else stream
        model_ips = a.batch * len(m_times) / sum(m_times)
        for neg, t, info, rr in npid_rows:
            npid_ips = a.batch * len(t) / sum(t)
            row: dict[str, Any] = {
                "model": arch, "image_size": size, "channels": 3, "negatives": neg,
                "device": str(device), "precision": precision, "threads": a.threads,
                "loss": a.loss, "batch": a.batch, "k": a.k, "rows": a.rows,
                "cache_fraction": a.cache_fraction,
                "steps": len(t), "warmup": warmup, "rounds": rounds,
                "npid_images_per_s": round(npid_ips, 1),
                "model_images_per_s": round(model_ips, 1),
                "ratio": round(npid_ips / model_ips, 3),
                "ratio_per_round": [round(x, 3) for x in rr],
                "pipeline_images_per_s": None if pipe is None else round(pipe, 1),
                "pipeline_path": "in-memory" if in_mem else "stream",
                "pipeline_in_memory_images_per_s": None if mem is None else round(mem, 1),
                "pipeline_stream_images_per_s": None if stream is None else round(stream, 1),
                "stream_workers": a.workers, "positives_order": a.order,
                "npid_step_ms_median": round(1e3 * float(np.median(t)), 1),
                "model_step_ms_median": round(1e3 * float(np.median(m_times)), 1),
                **info,
            }
            prof = profiles.get((arch, neg))
            if prof is not None:
                row["profile_ms_per_step"] = {k: round(1e3 * v, 2) for k, v in prof.items()}
            results.append(row)
            log(f"  {arch} {neg}: npid {npid_ips:.0f} img/s, model {model_ips:.0f} img/s, "
                f"ratio {npid_ips / model_ips:.3f}")

    notes.append(f"load average at the end {_load()} (1, 5, 15 min; {os.cpu_count()} cores)")
    print_report(env, results, profiles, notes)
    print(json.dumps(results))
    return 0


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _rng(v: list[float]) -> str:
    return f"{min(v):.2f}-{max(v):.2f}"


def _f(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def print_report(env: str, results: list[dict[str, Any]],
                 profiles: dict[tuple[str, str], dict[str, float]], notes: list[str]) -> None:
    print(env)
    for (arch, neg), prof in profiles.items():
        total = sum(prof.values())
        print(f"\n# profile of the NPID step: {arch}, {neg} negatives "
              f"({1e3 * total:.1f} ms/step, instrumented run)")
        for k, v in sorted(prof.items(), key=lambda kv: -kv[1]):
            print(f"  {k:<40} {1e3 * v:8.1f} ms  {100 * v / total:5.1f} %")
    print()
    head = (f"{'model':<15} {'px':>4} {'negatives':<10} {'npid img/s':>10} {'model img/s':>11} "
            f"{'ratio':>6} {'(rounds)':>11} {'pipe img/s':>10} {'(path)':<9} {'in-mem':>7} {'stream':>7} "
            f"{'npid ms':>8} {'model ms':>8} {'loads':>5}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['model']:<15} {r['image_size']:>4} {r['negatives']:<10} "
              f"{r['npid_images_per_s']:>10.0f} {r['model_images_per_s']:>11.0f} "
              f"{r['ratio']:>6.3f} {_rng(r['ratio_per_round']):>11} "
              f"{_f(r['pipeline_images_per_s']):>10} "
              f"{r['pipeline_path']:<9} {_f(r['pipeline_in_memory_images_per_s']):>7} "
              f"{_f(r['pipeline_stream_images_per_s']):>7} {r['npid_step_ms_median']:>8.1f} "
              f"{r['model_step_ms_median']:>8.1f} {r['chunk_loads']:>5}")
    print()
    loss = results[0]["loss"] if results else "the loss"
    print(f"# npid: NPIDStep (forward, {loss} vs the on-disk bank through ChunkCache, backward, SGD, "
          "momentum update, window advance); model: forward + trivial loss + backward + SGD.")
    print("# ratio = npid / model (the headline). pipe img/s: the path the trainer picks for "
          "--rows images of that size (data.in_memory auto); in-mem: BatchAugment on uint8 in "
          "memory; stream: StreamData as make_train_data builds it for data.in_memory no (at "
          "32 px: per-sample PNG decode, BatchAugment per batch in the workers), whole epochs "
          "incl. worker start-up. The pipeline is measured alone: in training it shares the "
          "cores.")
    print("# (rounds): min-max of the ratio over the interleaved rounds. loads: chunks read "
          "into the cache during the timed steps (the bank file mostly sits in the OS page "
          "cache here). ms: median step.")
    for n in notes:
        print(f"# {n}")
    for r in results:
        if r["model"] == "small" and r["device"] == "cpu":
            ok = r["ratio"] >= 0.85
            pipe = r["pipeline_images_per_s"]
            keeps = None if pipe is None else pipe >= r["model_images_per_s"]
            print(f"# done-when (small, {r['negatives']}): ratio {r['ratio']:.3f} "
                  f"{'>=' if ok else '<'} 0.85 -> {'holds' if ok else 'FAILS'}; pipeline "
                  f"({r['pipeline_path']}) {_f(pipe)} vs model {r['model_images_per_s']:.0f} "
                  f"img/s -> {'-' if keeps is None else ('keeps up' if keeps else 'FAILS')}")


if __name__ == "__main__":
    raise SystemExit(main())
