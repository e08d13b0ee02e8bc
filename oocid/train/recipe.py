"""A training recipe from the data, for `oocid train` without --config.

Small images (both sides at most SMALL_SIDE px) get the small conv net at their own size, the
exact softmax, a cosine schedule and an epoch count that gives about STEPS optimiser steps
whatever N is; grayscale images are not mirrored (a mirrored digit or letter is another
thing). Larger images get the paper's ImageNet recipe (`Config()`: ResNet-18 at 224 px,
200 epochs). Every choice can still be overridden with --set. The measurements behind the
rule: docs/method.md, "Defaults from the data".
"""

from __future__ import annotations

import copy

from oocid.config import Config, demo_config
from oocid.data.manifest import Manifest

SMALL_SIDE = 64
STEPS = 3000  # optimiser steps of a small-image run (where the measured sets stopped gaining)
MIN_EPOCHS, MAX_EPOCHS = 80, 400


def _side(manifest: Manifest) -> int:
    stats = manifest.image_stats or {}
    try:
        return int(max(stats["height"]["max"], stats["width"]["max"]))
    except (KeyError, TypeError, ValueError):
        return 0  # no statistics (an old manifest): treat as large


def _gray(manifest: Manifest) -> bool:
    channels = (manifest.image_stats or {}).get("channels") or {}
    return set(channels) == {"1"}


def recipe_for(manifest: Manifest, base: Config | None = None, processes: int = 1
               ) -> tuple[Config, str]:
    """(config, one line saying what was chosen and why) for the shards of `manifest`, trained
    by `processes` processes (several: InfoNCE, as no process holds the whole bank)."""
    side, gray, n = _side(manifest), _gray(manifest), manifest.n
    if not 0 < side <= SMALL_SIDE:
        cfg = copy.deepcopy(base) if base is not None else Config()
        what = f"{side} px images" if side else "images of unknown size"
        return cfg, (f"oocid: recipe for {what}, N {n}: the paper's ImageNet recipe "
                     f"({cfg.model.arch}, {cfg.data.image_size} px, {cfg.optim.epochs} epochs)")
    cfg = demo_config()
    cfg.data.image_size = side
    cfg.data.augment = "gray" if gray else "cifar"
    cfg.data.flip = not gray
    if not gray:  # the demo's mean and std are its grayscale set's; colour: ImageNet's
        cfg.data.mean, cfg.data.std = Config().data.mean, Config().data.std
    cfg.data.in_memory = "auto"
    steps_per_epoch = max(1, -(-n // (cfg.data.batch_size * processes)))  # batch per process
    cfg.optim.epochs = max(MIN_EPOCHS, min(MAX_EPOCHS, round(STEPS / steps_per_epoch)))
    kind = "grayscale" if gray else "colour"
    loss = f"exact softmax (t {cfg.loss.temperature})"
    if processes > 1:  # the softmax scores every row; each process holds only its part
        cfg.loss.kind = "infonce"
        cfg.loss.nce_k = min(cfg.loss.nce_k, max(1, n // processes // 2))
        loss = f"InfoNCE, K {cfg.loss.nce_k} per process (t {cfg.loss.temperature})"
    return cfg, (f"oocid: recipe for {side} px {kind} images, N {n}: small net at {side} px, "
                 f"{loss}, crop scale "
                 f"{cfg.data.crop_scale_min}-1, flip {'on' if cfg.data.flip else 'off'}, "
                 f"{cfg.optim.epochs} epochs (~{STEPS} steps); override with --config or --set")
