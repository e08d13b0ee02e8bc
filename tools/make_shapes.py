"""Write a small synthetic colour image set of mixed sizes, as a new user's first data might be.

Five classes of patterns (horizontal stripes, vertical stripes, diagonal bands, filled circles,
blocky noise), each image in one of five sizes from 50 to 100 px (80x60, 64x96, 72x72, 100x50,
60x80 as width x height), every other one a JPEG (Pillow's default quality), the rest PNG. One
generator `numpy.random.default_rng(seed)` draws everything, the train split first, then val:
the same seed gives the same files. The no-config recipe was measured on it (docs/method.md,
"Defaults from the data").

Usage: python tools/make_shapes.py OUT [--train 200] [--val 50] [--seed 0]
  writes OUT/train/<class>/*.{png,jpg} and OUT/val/<class>/*, ready for `oocid shard`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZES = [(80, 60), (64, 96), (72, 72), (100, 50), (60, 80)]  # (width, height)
Draw = Callable[[np.random.Generator, int, int], Image.Image]


def _stripes(rng: np.random.Generator, w: int, h: int, horizontal: bool) -> Image.Image:
    period = int(rng.integers(6, 14))
    c1, c2 = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    coord = np.arange(h)[:, None] if horizontal else np.arange(w)[None, :]
    on = np.broadcast_to((coord // (period // 2)) % 2 == 1, (h, w))
    return Image.fromarray(np.where(on[..., None], c1, c2).astype(np.uint8))


def _diagonal(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    period = int(rng.integers(8, 16))
    on = ((xx + yy) // (period // 2)) % 2
    c = np.array([200, 30, 30]) + rng.integers(-30, 30, 3)
    return Image.fromarray(np.where(on[..., None], c, 255 - c).clip(0, 255).astype(np.uint8))


def _circles(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 80, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):
        r = int(rng.integers(5, 18))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r],
                     fill=tuple(int(v) for v in rng.integers(100, 255, 3)))
    return im


def _noise(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    cells = rng.integers(0, 255, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
    return Image.fromarray(cells).resize((w, h), Image.Resampling.NEAREST)


CLASSES: dict[str, Draw] = {
    "hstripes": lambda rng, w, h: _stripes(rng, w, h, True),
    "vstripes": lambda rng, w, h: _stripes(rng, w, h, False),
    "diagonal": _diagonal,
    "circles": _circles,
    "noise": _noise,
}


def make_shapes(out: Path, n_train: int = 200, n_val: int = 50, seed: int = 0) -> None:
    """Write `n_train` and `n_val` images a class under out/train and out/val."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for name, draw in CLASSES.items():
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = SIZES[int(rng.integers(len(SIZES)))]
                draw(rng, w, h).save(folder / f"{name}_{i:04d}.{'jpg' if i % 2 else 'png'}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=200, help="images a class in train/")
    ap.add_argument("--val", type=int, default=50, help="images a class in val/")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    make_shapes(args.out, args.train, args.val, args.seed)


if __name__ == "__main__":
    main()
