"""Write a synthetic set of colour textures of mixed sizes, unlike the shapes and the digits.

Seven classes (stripes at any angle, checkerboards, dot grids, blobs, linear gradients, rings,
noise), each image a square of 40 to 64 px in two random colours (random hue, saturation and
value), with a random angle, period, phase or centre and slight pixel noise: what makes a class
is its structure, not its colour or size. PNG files. One generator
`numpy.random.default_rng(seed)` draws everything, the train split first, then val: the same
seed gives the same files. The no-config recipe was measured on it (docs/method.md,
"Defaults from the data").

Usage: python tools/make_textures.py OUT [--train 300] [--val 60] [--seed 0]
  writes OUT/train/<class>/*.png and OUT/val/<class>/*.png, ready for `oocid shard`.
"""

from __future__ import annotations

import argparse
import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("stripes", "checker", "dots", "blobs", "gradient", "rings", "noise")


def _colour(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.random(), 0.5 + 0.5 * rng.random(), 0.5 + 0.5 * rng.random()
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def texture(cls: str, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class `cls`."""
    side = int(rng.integers(40, 65))
    yy, xx = np.mgrid[0:side, 0:side].astype(float)
    c1, c2 = _colour(rng), _colour(rng)
    mask: np.ndarray | None = None
    if cls == "stripes":
        a, period = rng.random() * np.pi, rng.uniform(4, 10)
        mask = np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period
                      + rng.random() * 6) > 0
    elif cls == "checker":
        period = rng.uniform(4, 12)
        ox, oy = rng.random(2) * period
        mask = (np.floor((xx + ox) / period) + np.floor((yy + oy) / period)) % 2 == 0
    elif cls == "dots":
        period = rng.uniform(6, 12)
        r = period * rng.uniform(0.2, 0.35)
        ox, oy = rng.random(2) * period
        mask = ((xx + ox) % period - period / 2) ** 2 + ((yy + oy) % period - period / 2) ** 2 < r * r
    elif cls == "blobs":
        n = rng.normal(size=(side // 6 + 2, side // 6 + 2))
        small = ((n - n.min()) / (np.ptp(n) + 1e-9) * 255).astype(np.uint8)
        mask = np.asarray(Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)) > 127
    elif cls == "gradient":
        a = rng.random() * 2 * np.pi
        t = xx * np.cos(a) + yy * np.sin(a)
        t = ((t - t.min()) / (np.ptp(t) + 1e-9))[..., None]
        img = c1 * t + c2 * (1 - t)
    elif cls == "rings":
        cx, cy = rng.uniform(0, side, 2)
        mask = np.sin(np.hypot(xx - cx, yy - cy) * 2 * np.pi / rng.uniform(5, 10)) > 0
    elif cls == "noise":
        img = c1 + rng.normal(0, 0.25, (side, side, 1)) * rng.uniform(0.5, 1.5)
    else:
        raise ValueError(f"unknown class {cls!r}; known: {', '.join(CLASSES)}")
    if mask is not None:
        img = np.where(mask[..., None], c1, c2)
    img = img + rng.normal(0, 0.03, img.shape)
    return Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8), "RGB")


def make_textures(out: Path, n_train: int = 300, n_val: int = 60, seed: int = 0) -> None:
    """Write `n_train` and `n_val` images a class under out/train and out/val."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in CLASSES:
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                texture(cls, rng).save(folder / f"{i:04d}.png")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=300, help="images a class in train/")
    ap.add_argument("--val", type=int, default=60, help="images a class in val/")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    make_textures(args.out, args.train, args.val, args.seed)


if __name__ == "__main__":
    main()
