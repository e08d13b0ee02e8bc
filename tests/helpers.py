"""Small synthetic data and configs shared by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from oocid.config import Config, demo_config


def tiny_npz(path: Path, n: int = 96, size: int = 16, classes: int = 4, seed: int = 0) -> Path:
    """Synthetic labeled grayscale images: each class a different bar orientation plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.zeros((n, size, size), dtype=np.uint8)
    for i, c in enumerate(labels):
        pattern = [(xx // 3) % 2, (yy // 3) % 2, ((xx + yy) // 3) % 2, ((xx - yy) // 3) % 2][c % 4]
        img = pattern * 180 + rng.integers(0, 60, (size, size))
        images[i] = np.clip(img, 0, 255)
    np.savez(path, images=images, labels=labels.astype(np.int64),
             class_names=np.array([f"c{i}" for i in range(classes)]))
    return path


def tiny_config(**loss: object) -> Config:
    cfg = demo_config()
    cfg.data.image_size = 16
    cfg.data.batch_size = 32
    cfg.optim.epochs = 3
    cfg.optim.lr = 0.05
    cfg.train.knn_k = 10
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    return cfg
