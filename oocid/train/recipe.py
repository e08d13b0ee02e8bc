"""A training recipe from the data and the machine, for `oocid train` without --config.

Small images (every image's shorter side at most SMALL_SIDE px) get the small conv net at that
size (scaled up to its smallest input, SMALL_MIN_SIDE, if below), loss.kind "auto" (the exact
softmax while the bank fits the device cache, else InfoNCE with K below the rows), a cosine
schedule, an epoch count that gives about STEPS optimiser steps whatever N is, and (with --val)
a kNN check every tenth of the run; grayscale images are not mirrored (a mirrored digit or letter is another
thing). Larger images (or images of unknown size):
- on a CPU, the same small-net recipe at SMALL_SIDE px: random resized crops of the larger
  images, and for evaluation the shorter side resized to SMALL_SIDE and a centre crop. The
  paper's ResNet-18 at 224 px costs about 17 s a step of 256 images on 2 cores, a run hours;
- on a GPU, the paper's ImageNet recipe (`Config()`: ResNet-18 at 224 px, 200 epochs).
The line said names what was chosen, why, the run's real step count and how to override it.
The measurements behind the rule: docs/method.md, "Defaults from the data".
"""

from __future__ import annotations

import copy

from oocid.config import AUTO_WORKERS, SMALL_MIN_SIDE, Config, demo_config
from oocid.data.manifest import Manifest
from oocid.distributed.partition import deal_shards

SMALL_SIDE = 64
STEPS = 3000  # optimiser steps of a small-image run (where the measured sets stopped gaining)
MIN_EPOCHS, MAX_EPOCHS = 80, 400
HINT = "override with --config or --set"


def _sides(manifest: Manifest) -> tuple[int, int]:
    """(an upper bound on every image's shorter side, the longest side); (0, 0) unknown.

    min(largest height, largest width) bounds each image's shorter side, and so does the
    shard step's --short-side (an image whose shorter side exceeded it was resized to it)."""
    stats = manifest.image_stats or {}
    try:
        h, w = int(stats["height"]["max"]), int(stats["width"]["max"])
    except (KeyError, TypeError, ValueError):
        return 0, 0  # no statistics (an old manifest)
    limit = (stats.get("resize") or {}).get("short_side")
    short = min(h, w, limit) if isinstance(limit, int) and limit > 0 else min(h, w)
    return short, max(h, w)


def _one_size(manifest: Manifest) -> bool:
    """Whether every image is square and of one size (a bound equal to the longest side does
    not say it: 32x48 and 48x32 images have both)."""
    stats = manifest.image_stats or {}
    try:
        return len({stats[k][m] for k in ("height", "width") for m in ("min", "max")}) == 1
    except (KeyError, TypeError):
        return False


def _gray(manifest: Manifest) -> bool:
    channels = (manifest.image_stats or {}).get("channels") or {}
    return set(channels) == {"1"}


def _local_sizes(manifest: Manifest, processes: int) -> tuple[int, int]:
    """(fewest, most) samples of one process: the shards are dealt to them whole."""
    if processes <= 1:
        return manifest.n, manifest.n
    sizes = [sum(manifest.shards[i].stop - manifest.shards[i].start for i in part)
             for part in deal_shards(manifest, processes)]
    return min(sizes), max(sizes)


def _steps(cfg: Config, most: int) -> tuple[int, int]:
    """(optimiser steps per epoch, in all) of `cfg` when the busiest process has `most` samples
    (every process takes as many steps as the busiest)."""
    per_epoch = max(1, -(-most // cfg.data.batch_size))
    per_epoch = -(-per_epoch // cfg.optim.accumulate)
    return per_epoch, per_epoch * cfg.optim.epochs


def _fit_k(cfg: Config, fewest: int) -> str:
    """Lower loss.nce_k to at most half the rows the smallest process holds, so that sampled
    negatives (loss.kind auto on a bank larger than the device cache, or --loss infonce / nce)
    run on any N without --nce-k; returns ", K k" when it lowered it, else ""."""
    k = min(cfg.loss.nce_k, max(1, fewest // 2))
    lowered, cfg.loss.nce_k = k < cfg.loss.nce_k, k
    return f", K {k}" if lowered else ""


def recipe_for(manifest: Manifest, base: Config | None = None, processes: int = 1,
               device: str = "cpu") -> tuple[Config, str]:
    """(config, one line saying what was chosen and why) for the shards of `manifest`, trained
    by `processes` processes (several: InfoNCE, as no process holds the whole bank) on
    `device` (a torch device type: "cpu", "cuda", ...)."""
    short, long = _sides(manifest)
    gray, n = _gray(manifest), manifest.n
    fewest, most = _local_sizes(manifest, processes)
    kind = "grayscale" if gray else "colour"
    what = ("images of unknown size" if not long else
            f"{long} px {kind} images" if _one_size(manifest) else
            f"{kind} images up to {long} px")
    if not 0 < short <= SMALL_SIDE and device != "cpu":
        cfg = copy.deepcopy(base) if base is not None else Config()
        _, total = _steps(cfg, most)
        k = _fit_k(cfg, fewest)
        return cfg, (f"oocid: recipe for {what}, N {n}, on {device}: the paper's ImageNet "
                     f"recipe ({cfg.model.arch}, {cfg.data.image_size} px, {cfg.optim.epochs} "
                     f"epochs, {total} steps{k}); {HINT}")
    size = max(SMALL_MIN_SIDE, short) if 0 < short <= SMALL_SIDE else SMALL_SIDE
    cfg = demo_config()
    cfg.data.image_size = size
    cfg.data.augment = "gray" if gray else "cifar"
    cfg.data.flip = not gray
    if not gray:  # the demo's mean and std are its grayscale set's; colour: ImageNet's
        cfg.data.mean, cfg.data.std = Config().data.mean, Config().data.std
    # Same-size sets that fit are held in memory and cropped in batches (bilinear sampling,
    # no antialiasing: fine up to 2x down); larger or mixed sizes stream, decoded and cropped
    # per image in DataLoader workers.
    cfg.data.in_memory = "auto" if 0 < long <= 2 * size else "no"
    cfg.data.workers = AUTO_WORKERS
    per_epoch, _ = _steps(cfg, most)
    cfg.optim.epochs = max(MIN_EPOCHS, min(MAX_EPOCHS, round(STEPS / per_epoch)))
    cfg.train.eval_every = -1  # with --val: a check every tenth of the run (config.eval_period)
    _fit_k(cfg, fewest)
    if processes > 1:  # the softmax scores every row; each process holds only its part
        cfg.loss.kind = "infonce"
        loss = f"InfoNCE, K {cfg.loss.nce_k} per process (t {cfg.loss.temperature})"
    else:  # auto (oocid.train.setup.resolve_loss): the softmax needs the bank in the cache
        cfg.loss.kind = "auto"
        loss = (f"exact softmax (t {cfg.loss.temperature}) while the bank fits the device "
                f"cache, else InfoNCE K {cfg.loss.nce_k}")
    why = (" (on a CPU; the ImageNet recipe, ResNet-18 at 224 px, is for a GPU)"
           if short > SMALL_SIDE or not short else
           " (scaled up: the smallest input it takes)" if size > short else "")
    _, total = _steps(cfg, most)
    return cfg, (f"oocid: recipe for {what}, N {n}: small net at {size} px{why}, "
                 f"{loss}, crop scale {cfg.data.crop_scale_min}-1, "
                 f"flip {'on' if cfg.data.flip else 'off'}, {cfg.optim.epochs} epochs "
                 f"({total} steps); {HINT}")


def total_steps(cfg: Config, manifest: Manifest, processes: int = 1) -> int:
    """Optimiser steps of the whole run of `cfg` on `manifest` with `processes` processes."""
    return _steps(cfg, _local_sizes(manifest, processes)[1])[1]


def with_overrides(line: str, overrides: list[str], steps: int | None = None) -> str:
    """The recipe line naming the overrides applied on top of it (and `steps`, the run's steps
    when they changed the recipe's), the hint still last."""
    if not overrides:
        return line
    head = line.removesuffix(f"; {HINT}")
    now = "" if steps is None else f" ({steps} step{'' if steps == 1 else 's'})"
    return f"{head}; then {', '.join(overrides)}{now}; {HINT}"
