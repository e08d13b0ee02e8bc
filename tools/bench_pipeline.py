"""Benchmark the training input pipeline: torchvision ImageFolder + DataLoader on the original
JPEGs against oocid's shard stream on shards built by `oocid shard` with its default options.

From one folder of full-size synthetic JPEGs in ImageFolder layout (--images, default 2,000 of
400-600 x 300-450 px, ~500x375 like ImageNet, 4 classes, JPEG quality 90; made once with
tools/bench_decode.py's synthetic photos under --workdir, default /tmp/oocid-bench/jpegs):
    torchvision  torchvision.datasets.ImageFolder(transform=oocid.data.augment.sample_transform
                 ("imagenet", 224)) = RandomResizedCrop(224, scale=(0.2, 1)), RandomGrayscale(0.2),
                 ColorJitter(0.4, 0.4, 0.4, 0.4), RandomHorizontalFlip, ToTensor, Normalize (the
                 paper's ImageNet recipe) + DataLoader(batch 256, shuffle, --workers W)
    oocid        `oocid shard SRC OUT` (defaults: shard size 4096, shorter side stored at 256 px,
                 JPEG quality 90 for the resized images) then oocid.data.stream.make_train_data with
                 data.in_memory = "no", the same recipe, batch and W: StreamData exactly as
                 `oocid train` builds it (normalised float batches out)
Both sides are warmed up with one untimed pass (page cache warm for the JPEGs and the shards,
oocid's hue tables built), then each runs --passes timed passes over the whole set, in pairs
(torchvision then oocid, then the other order, ...). A pass is timed from creating the loader
to its last batch (worker start-up included). images/s = images / total timed seconds; the
ratio is also given per pair (the machine this was written on is shared, so its load moves
between passes) and in CPU time: CPU ms per image = user + system time of the main process
and its DataLoader workers over the pass, which other work on the machine disturbs far less
than wall time.

A per-stage profile on one core (the main process, torch threads 1, CPU time of the thread)
over --profile images, the two pipelines alternating image by image, shows where the time goes
in each.

Usage:
    python tools/bench_pipeline.py                 # ~3 min on 2 cores (+ ~1 min the first time)
    python tools/bench_pipeline.py --workers 4 --passes 3
Prints a table; the LAST line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_decode import synth_photo

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SIZE = 224


def log(msg: str) -> None:
    print(f"[bench_pipeline {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- inputs ------------------------------------------------------------------------------------


def _make_one(args: tuple[Path, int, int]) -> None:
    root, i, seed = args
    rng = np.random.default_rng([seed, i])
    w, h = int(rng.integers(400, 601)), int(rng.integers(300, 451))
    path = root / f"class{i % 4}" / f"img{i:05d}.jpg"
    synth_photo(rng, w, h).save(path, quality=90)


def ensure_jpegs(root: Path, n: int, seed: int) -> None:
    params = {"n": n, "seed": seed, "version": 1}
    marker = root / ".params.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return
    log(f"generating {n} JPEGs in {root}")
    for c in range(4):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    with Pool(os.cpu_count() or 1) as pool:
        pool.map(_make_one, [(root, i, seed) for i in range(n)], chunksize=16)
    marker.write_text(json.dumps(params))


def ensure_shards(src: Path, out: Path) -> float:
    """`oocid shard SRC OUT` with default options (once); its wall time in s (0 if reused)."""
    manifest = out / "manifest.json"
    if manifest.is_file() and manifest.stat().st_mtime > (src / ".params.json").stat().st_mtime:
        return 0.0
    log(f"oocid shard {src} {out}")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "oocid", "shard", str(src), str(out), "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def folder_kb(root: Path) -> float:
    files = [p for p in root.rglob("*.jpg")]
    return sum(p.stat().st_size for p in files) / len(files) / 1024


# ---- the two pipelines ---------------------------------------------------------------------------


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children (DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def torchvision_pass(src: Path, workers: int, batch: int, seed: int) -> tuple[float, int]:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from oocid.data.augment import sample_transform

    t = time.perf_counter()
    ds = ImageFolder(str(src), transform=sample_transform("imagenet", SIZE, MEAN, STD, 0.2, True))
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed))
    n = 0
    for x, _ in loader:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, SIZE, SIZE)
        n += x.shape[0]
    return time.perf_counter() - t, n


def oocid_data(shards: Path, workers: int, batch: int) -> Any:
    from oocid.config import DataConfig
    from oocid.data.manifest import read_manifest
    from oocid.data.stream import StreamData, make_train_data

    cfg = DataConfig(image_size=SIZE, augment="imagenet", crop_scale_min=0.2, in_memory="no",
                     batch_size=batch, workers=workers, mean=MEAN, std=STD)
    data = make_train_data(read_manifest(shards), cfg, seed=0, device=torch.device("cpu"))
    assert isinstance(data, StreamData)
    return data


def oocid_pass(data: Any, epoch: int) -> tuple[float, int]:
    t = time.perf_counter()
    n = 0
    for b in data.epoch_batches(epoch):
        assert b.images.dtype == torch.float32 and b.images.shape[1:] == (3, SIZE, SIZE)
        n += b.images.shape[0]
    return time.perf_counter() - t, n


# ---- per-stage profile -------------------------------------------------------------------------


def profile(src: Path, shards: Path, n: int) -> dict[str, dict[str, float]]:
    """ms per image of each stage of both pipelines, one core, over the first n images (the
    pipelines alternate image by image)."""
    from PIL import Image
    from torchvision import transforms as T

    from oocid.data.augment import normalize_batch, sample_transform
    from oocid.data.decode import load_image, need_for, open_image
    from oocid.data.manifest import read_manifest
    from oocid.data.reader import iter_samples
    from oocid.data.stream_aug import StreamTrain, _to_uint8, hue_tables

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    hue_tables()
    m = read_manifest(shards)
    samples = [s for p in m.shard_paths() for s in iter_samples(p)][:n]
    files = [src / s.path for s in samples]  # the same images, as stored and as originals
    stored = [s.image for s in samples]
    tv: dict[str, float] = {}
    oc: dict[str, float] = {}
    ref = sample_transform("imagenet", SIZE, MEAN, STD, 0.2, True).transforms  # type: ignore[attr-defined]
    names = ["crop", "grayscale", "jitter", "flip", "to tensor + normalize"]
    aug = StreamTrain("imagenet", SIZE, 0.2, 3)
    xs = []
    for k, (f, data) in enumerate(zip(files, stored, strict=True)):
        torch.manual_seed(k)
        t = time.thread_time()
        with open(f, "rb") as fh:
            img = Image.open(fh).convert("RGB")
        tv["decode (full size)"] = tv.get("decode (full size)", 0.0) + time.thread_time() - t
        steps = [*ref[:4], T.Compose(ref[4:])]
        for name, step in zip(names, steps, strict=True):
            t = time.thread_time()
            img = step(img)
            tv[name] = tv.get(name, 0.0) + time.thread_time() - t
        torch.manual_seed(k)
        t = time.thread_time()
        img = open_image(data)
        w0, h0 = img.size
        i, j, h, w = aug.get_params(img, list(aug.scale), list(aug.ratio))
        img, scale = load_image(img, 3, need_for(w0, h0, w, h, SIZE, SIZE))
        oc["decode (stored, 256 px)"] = oc.get("decode (stored, 256 px)", 0.0) + time.thread_time() - t
        t = time.thread_time()
        assert scale == 1.0
        img = img.crop((j, i, j + w, i + h)).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        oc["crop"] = oc.get("crop", 0.0) + time.thread_time() - t
        for name, step in zip(["grayscale", "jitter", "flip"], aug.after, strict=True):
            t = time.thread_time()
            img = step(img)
            oc[name] = oc.get(name, 0.0) + time.thread_time() - t
        t = time.thread_time()
        xs.append(_to_uint8(img, 3))
        oc["to uint8 tensor"] = oc.get("to uint8 tensor", 0.0) + time.thread_time() - t
    batch = torch.stack(xs)
    t = time.thread_time()
    normalize_batch(batch, MEAN, STD)
    oc["normalize (per batch, main process)"] = time.thread_time() - t
    torch.set_num_threads(threads)
    return {"torchvision": {k: v / len(files) * 1000 for k, v in tv.items()},
            "oocid": {k: v / len(stored) * 1000 for k, v in oc.items()}}


# ---- main --------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/oocid-bench"))
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--passes", type=int, default=2, help="timed passes per pipeline")
    p.add_argument("--profile", type=int, default=200, help="images in the per-stage profile")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from oocid.device import keep_large_buffers

    # as oocid.train.loop.train does: the stream's batches are normalised in the trainer's process,
    # whose malloc keeps large buffers mapped (a fresh 154 MB float batch page-faults: 0.27
    # against 0.06 ms an image); process-wide, so the torchvision side's workers inherit it too
    keep_large_buffers()
    src, shards = a.workdir / "jpegs", a.workdir / "shards"
    ensure_jpegs(src, a.images, a.seed)
    shard_s = ensure_shards(src, shards)
    from oocid.data.manifest import read_manifest

    st = read_manifest(shards).image_stats
    threads = torch.get_num_threads()
    import torchvision
    from PIL import __version__ as pil_version

    print(f"# {platform.machine()}, {os.cpu_count()} cores (shared with other work), python "
          f"{platform.python_version()}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, Pillow {pil_version}; main-process torch threads {threads}")
    print(f"# source: {a.images} JPEGs q90 in {src}, {st['original']['width']['mean']:.0f}x"
          f"{st['original']['height']['mean']:.0f} px mean, {folder_kb(src):.1f} KB mean; shards: "
          f"`oocid shard` defaults (shorter side {st['resize']['short_side']} px, JPEG quality "
          f"{st['resize']['quality']}, {st['resize']['resized']} of {a.images} resized, "
          f"{st['width']['mean']:.0f}x{st['height']['mean']:.0f} px mean stored)"
          + (f", built in {shard_s:.1f} s" if shard_s else ""))
    data = oocid_data(shards, a.workers, a.batch)
    log("warm-up passes (page cache, hue tables)")
    torchvision_pass(src, a.workers, a.batch, a.seed)
    oocid_pass(data, 0)
    times: dict[str, list[float]] = {"torchvision": [], "oocid": []}
    cpu: dict[str, list[float]] = {"torchvision": [], "oocid": []}
    counts = {"torchvision": 0, "oocid": 0}
    for r in range(a.passes):
        for name in (("torchvision", "oocid") if r % 2 == 0 else ("oocid", "torchvision")):
            log(f"pass {r + 1}/{a.passes}: {name}")
            c0 = cpu_seconds()
            dt, n = (torchvision_pass(src, a.workers, a.batch, a.seed + 1 + r) if name == "torchvision"
                     else oocid_pass(data, 1 + r))
            cpu[name].append((cpu_seconds() - c0) / n * 1000)
            times[name].append(dt)
            counts[name] += n
    ips = {k: counts[k] / sum(v) for k, v in times.items()}
    ratio = ips["oocid"] / ips["torchvision"]
    pair = [t / o for t, o in zip(times["torchvision"], times["oocid"], strict=True)]
    cpu_ms = {k: float(np.mean(v)) for k, v in cpu.items()}
    cpu_ratio = cpu_ms["torchvision"] / cpu_ms["oocid"]
    log("per-stage profile")
    prof = profile(src, shards, a.profile)
    print(f"\n{'pipeline':12s} {'workers':>7s} {'batch':>5s} {'images':>7s} {'img/s':>8s} "
          f"{'CPU ms/img':>10s}  {'seconds per pass':<20s}")
    for k in ("torchvision", "oocid"):
        print(f"{k:12s} {a.workers:7d} {a.batch:5d} {counts[k]:7d} {ips[k]:8.1f} {cpu_ms[k]:10.2f}  "
              f"{' '.join(f'{t:.1f}' for t in times[k]):<20s}")
    print(f"ratio oocid / torchvision: {ratio:.2f}x in images/s (per pair of passes: "
          f"{', '.join(f'{x:.2f}' for x in pair)}), {cpu_ratio:.2f}x in CPU time per image; "
          f"target >= 1.5x in images/s: {'met' if ratio >= 1.5 else 'MISSED'}")
    print("\nper-stage profile, CPU ms per image on one core (main process, torch threads 1):")
    for k, stages in prof.items():
        total = sum(v for s, v in stages.items() if "per batch" not in s)
        print(f"  {k:12s} " + ", ".join(f"{s} {v:.2f}" for s, v in stages.items())
              + f"; per-sample total {total:.2f}")
    print(f"# both pipelines from warm page cache (one untimed pass each first); load average at "
          f"the end {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min; 2 cores)")
    print(json.dumps({"workers": a.workers, "batch": a.batch, "images": a.images,
                      "passes": a.passes, "torchvision_images_per_s": round(ips["torchvision"], 1),
                      "oocid_images_per_s": round(ips["oocid"], 1), "ratio": round(ratio, 3),
                      "ratio_per_pair": [round(x, 3) for x in pair],
                      "cpu_ms_per_image": {k: round(v, 3) for k, v in cpu_ms.items()},
                      "cpu_ratio": round(cpu_ratio, 3),
                      "pass_seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
                      "shard_defaults": st["resize"], "profile_ms_per_image": {
                          k: {s: round(v, 3) for s, v in d.items()} for k, d in prof.items()}}))


if __name__ == "__main__":
    main()
