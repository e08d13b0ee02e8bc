"""Rebuild `oocid/data/fashion_mnist_demo.npz`, the small dataset behind `oocid demo`.

Source: the original Fashion-MNIST IDX files (Xiao, Rasul and Vollgraf, 2017; MIT licence,
Copyright (c) 2017 Zalando SE) as installed by the Debian package dataset-fashion-mnist in
/usr/share/datasets/fashion-mnist/.

Selection rule (deterministic, class-balanced): one generator `numpy.random.default_rng(0)`;
first the train split, then the test split; within a split, for class c = 0, 1, ..., 9 in
order, draw `per_class` distinct positions with `rng.choice(positions_of_c, per_class,
replace=False)`; the union of the draws is kept in ascending source order. Train: 1,000 per
class from the 60,000 train images (10,000); test: 200 per class from the 10,000 test
images (2,000).

Output keys (np.savez_compressed):
    train_images (10000, 28, 28) uint8    train_labels (10000,) int64
    test_images  (2000, 28, 28) uint8     test_labels  (2000,) int64
    class_names  (10,) str

Usage: python tools/make_demo_data.py [--src DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path
from typing import Any

import numpy as np

SRC = Path("/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).resolve().parents[1] / "oocid" / "data" / "fashion_mnist_demo.npz"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
PER_CLASS = {"train": 1000, "test": 200}
FILES = {"train": "train", "test": "t10k"}
SEED = 0


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes: images (N, H, W) or labels (N,)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return arr.reshape(shape)


def select(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Positions (M,) of `per_class` samples of each class, ascending (see module docstring)."""
    picks = [
        rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
        for c in range(len(CLASS_NAMES))
    ]
    return np.sort(np.concatenate(picks))


def build(src: Path) -> dict[str, np.ndarray]:
    """The arrays of the demo npz, drawn from the IDX files in `src`."""
    rng = np.random.default_rng(SEED)
    arrays: dict[str, np.ndarray] = {}
    for split, prefix in FILES.items():
        images = read_idx(src / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(src / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        keep = select(labels, PER_CLASS[split], rng)
        arrays[f"{split}_images"] = np.ascontiguousarray(images[keep])
        arrays[f"{split}_labels"] = labels[keep]
    arrays["class_names"] = np.array(CLASS_NAMES)
    return arrays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=SRC, help="folder with the IDX .gz files")
    parser.add_argument("--out", type=Path, default=OUT, help="output .npz")
    args = parser.parse_args(argv)

    needed = [f"{p}-images-idx3-ubyte.gz" for p in FILES.values()]
    needed += [f"{p}-labels-idx1-ubyte.gz" for p in FILES.values()]
    missing = [name for name in needed if not (args.src / name).is_file()]
    if missing:
        print(
            f"make_demo_data: error: {args.src} lacks {', '.join(missing)}; "
            "install the Debian package dataset-fashion-mnist",
            file=sys.stderr,
        )
        return 2

    arrays: dict[str, Any] = build(args.src)  # Any: numpy's stubs mistype **savez kwargs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)

    size_mb = args.out.stat().st_size / 1e6
    print(f"{'split':<6} {'count':>6} {'per class':>10}  file")
    for split in FILES:
        labels = arrays[f"{split}_labels"]
        counts = np.bincount(labels, minlength=len(CLASS_NAMES))
        per_class = str(counts[0]) if (counts == counts[0]).all() else ",".join(map(str, counts))
        print(f"{split:<6} {len(labels):>6} {per_class:>10}  {args.out} ({size_mb:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
