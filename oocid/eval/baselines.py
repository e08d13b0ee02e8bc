"""Baselines for learned features (`oocid knn --baselines`, `oocid demo`): the same weighted kNN
over features a trained network should beat.

- the same network, untrained: the checkpoint's architecture freshly initialised with the
  config's seed (`untrained_model`), embedding the training and validation images with the
  test transform;
- raw pixels: the test-transformed images (the tensors the network sees) un-normalised back to
  [0, 1] (x * std + mean), flattened and L2-normalised (`unit_pixels`);
- mean-centred pixels: the same minus the training set's mean image, then L2-normalised.

The training side is streamed batch by batch through the streaming top-k (never an N x P
matrix of pixels); the validation pixels are taken in blocks of at most `PIXEL_BYTES`, each
block one pass over the training images. The mean image is summed on the first raw-pixel pass.
Q queries, N training images, P = C * S * S pixel values, k neighbours.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from oocid.config import DataConfig
from oocid.data.augment import norm_constants
from oocid.data.batch import image_channels, normalization_stats
from oocid.data.eval_data import eval_batches, extract_features
from oocid.data.manifest import Manifest
from oocid.eval.classes import training_labels
from oocid.eval.evaluate import QUERY_CHUNK, blocks_of, knn_report
from oocid.eval.retrieval import TrainingSide, embedded_chunks, topk_indexed
from oocid.method.knn import BLOCK_ROWS
from oocid.models import Embedder, build_model
from oocid.progress import progress_bar

# the rows of `oocid demo`'s table and of `oocid knn --baselines`'s, in this order
LEARNED = "learned features (NPID)"
LEARNED_BANK = "learned, memory bank as train features"
UNTRAINED = "same network, untrained"
PIXELS = "raw pixels"
PIXELS_CENTERED = "mean-centred pixels"
NAMES = {"untrained": UNTRAINED, "pixels": PIXELS, "pixels_centered": PIXELS_CENTERED}

PIXEL_BYTES = 256 << 20  # float32 pixels of a block of queries, and of a block of training rows
SLOW_PASSES = 4  # more passes over the training images than this: a warning says the cost

Say = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass
class Found:
    """The top-k of every query: sims (Q, k') sorted decreasing, training index (Q, k'), and the
    queries' labels (Q,) as their shards give them."""

    sims: Tensor
    index: Tensor
    labels: Tensor


def unit_pixels(x: Tensor, center: Tensor | None = None) -> Tensor:
    """(N, P) float pixels in [0, 1] -> L2-normalised rows (optionally minus a mean image (P,))."""
    if center is not None:
        x = x - center.reshape(1, -1)
    return torch.nn.functional.normalize(x, dim=1)


def untrained_model(arch: str, in_channels: int, dim: int, seed: int, device: torch.device
                    ) -> Embedder:
    """The network `arch` initialised on the CPU after seeding the CPU generator with `seed`
    (the weights torch.manual_seed(seed) gives, as `oocid demo` builds it), then moved to
    `device`; the global random state, every device's, is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = build_model(arch, in_channels, dim)
    return model.to(device).eval()


def untrained_search(model: Embedder, train: Manifest, val: Manifest, data_cfg: DataConfig,
                     channels_last: bool, device: torch.device, k: int, progress: bool = False,
                     say: Say = _stderr) -> Found:
    """The untrained network's top-k: validation features against the training features,
    both with the test transform (the training side streamed, as `knn --recompute`)."""
    q, _, labels = extract_features(model, eval_batches(val, data_cfg, device,
                                                        channels=model.in_channels), channels_last)
    say(f"oocid: baselines: the untrained network's features of {train.n} training images")
    chunks = embedded_chunks(model, train, data_cfg, device, channels_last, progress, "untrained")
    sims, index = topk_indexed(q, chunks, k)
    return Found(sims, index, labels)


class _Pixels:
    """Normalised test-transformed images (B, C, S, S) -> their pixels (B, P) in [0, 1]."""

    def __init__(self, data_cfg: DataConfig, channels: int, device: torch.device) -> None:
        mean, std = normalization_stats(data_cfg, channels)
        self.mean, self.std = norm_constants(tuple(mean), tuple(std), device)
        self.channels = channels
        self.width = channels * data_cfg.image_size ** 2  # P

    def __call__(self, images: Tensor) -> Tensor:
        return (images.float() * self.std + self.mean).flatten(1)


def _query_blocks(val: Manifest, data_cfg: DataConfig, device: torch.device, pixels: _Pixels,
                  rows: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The validation pixels (q, P) in [0, 1] and labels (q,), in blocks of `rows` queries,
    decoded with the training set's channels."""
    batches = eval_batches(val, data_cfg, device, channels=pixels.channels)
    return blocks_of(((pixels(b.images), b.label) for b in batches), rows)


def pixel_search(train: Manifest, val: Manifest, data_cfg: DataConfig, device: torch.device,
                 k: int, progress: bool = False, say: Say = _stderr,
                 budget: int = PIXEL_BYTES) -> tuple[Found, Found]:
    """The top-k of raw pixels, then of mean-centred pixels (see the module docstring). Each
    block of queries (at most `budget` bytes of float32 pixels) is one pass over the training
    images, in blocks of rows of the same budget; the first pass also sums the mean image."""
    channels = image_channels(train)
    pixels = _Pixels(data_cfg, channels, device)
    rows = max(1, min(QUERY_CHUNK, budget // (4 * pixels.width)))  # queries per pass
    block = max(1, min(BLOCK_ROWS, budget // (4 * pixels.width)))  # training rows per GEMM
    passes = max(1, math.ceil(val.n / rows))
    total = torch.zeros(pixels.width, dtype=torch.float64)  # on the CPU: float64 everywhere
    counted = [0]

    def chunks(center: Tensor | None, desc: str, first: bool) -> Iterator[tuple[Tensor, Tensor]]:
        with progress_bar(train.n, desc, "img", enabled=progress, leave=False) as bar:
            for b in eval_batches(train, data_cfg, device):
                x = pixels(b.images)
                if first:
                    total.add_(x.sum(dim=0).cpu().double())
                    counted[0] += x.shape[0]
                yield b.index, unit_pixels(x, center)
                bar.update(int(b.index.numel()))

    def search(center: Tensor | None, name: str) -> Found:
        found = []
        for i, (x, y) in enumerate(_query_blocks(val, data_cfg, device, pixels, rows)):
            desc = name if passes == 1 else f"{name} {i + 1}/{passes}"
            train_rows = chunks(center, desc, first=i == 0 and center is None)
            sims, index = topk_indexed(unit_pixels(x, center), train_rows, k, block_rows=block)
            found.append((sims, index, y))
        return Found(*(torch.cat([f[j] for f in found]) for j in range(3)))

    size = data_cfg.image_size
    each = "" if passes == 1 else f", in {passes} passes of {rows} queries"
    say(f"oocid: baselines: raw pixels ({channels} x {size} x {size}, in [0, 1]) of {val.n} "
        f"validation images against {train.n} training images{each}, and their mean image")
    if passes > SLOW_PASSES:
        say(f"oocid: warning: the pixel baselines read the {train.n} training images "
            f"{2 * passes} times ({passes} passes each); a sample of the validation set as "
            f"--shards (`oocid shard` of a few thousand images) takes one pass each")
    raw = search(None, "raw pixels")
    center = (total / max(1, counted[0])).float().to(device)  # (P,) the training mean image
    say(f"oocid: baselines: the same pixels minus the training set's mean image{each}")
    return raw, search(center, "mean-centred pixels")


def scored(found: Found, train_labels: Tensor, ks: Sequence[int], temperature: float,
           num_classes: int) -> dict[str, Any]:
    """top-1 (and top-5 with more than 5 classes, as `knn` shows them) for every k, by
    `knn_report`: the largest k's at the top, each k's in "by_k" ("k" in each: the k used,
    min(k, training rows)). found.labels must already be training labels."""
    nl = train_labels.to(found.index.device)[found.index]
    names = [str(c) for c in range(num_classes)]
    by_k: dict[str, dict[str, Any]] = {}
    for k in ks:
        r = knn_report(found.sims, nl, found.labels.to(nl.device), k, temperature, names)
        by_k[str(k)] = {key: r[key] for key in ("top1", "top5", "k") if key in r}
    return {**by_k[str(max(ks))], "by_k": by_k}


def baseline_results(side: TrainingSide, vm: Manifest, mapping: np.ndarray | None,
                     labels: np.ndarray, ks: Sequence[int], temperature: float,
                     classes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The weighted kNN of the validation set `vm` over each baseline's features: the
    checkpoint's network untrained (seeded with train.seed), raw pixels, mean-centred pixels;
    the same ks and temperature as the learned features', validation classes matched to the
    training `classes` by `mapping` (oocid.eval.classes)."""
    cfg, dev, kmax = side.cfg, side.device, max(ks)
    model = untrained_model(side.model.arch, side.model.in_channels, side.model.out_dim,
                            cfg.train.seed, dev)
    if cfg.model.channels_last:  # as the learned model runs (the same numbers, its speed)
        model = model.to(memory_format=torch.channels_last)
    found = {"untrained": untrained_search(model, side.manifest, vm, cfg.data,
                                           cfg.model.channels_last, dev, kmax, side.progress)}
    found["pixels"], found["pixels_centered"] = pixel_search(side.manifest, vm, cfg.data, dev,
                                                             kmax, side.progress)
    train_labels = torch.from_numpy(labels)
    out = {}
    for key, f in found.items():
        f.labels = training_labels(f.labels, mapping, vm.root)
        out[key] = scored(f, train_labels, ks, temperature, len(classes))
    return out


def format_baselines(res: dict[str, Any]) -> str:
    """`knn --baselines`' table: the learned features' top-1 (top-5) and each baseline's, a
    column per k used (two --k above the training rows use the same k: one column), then a
    note when the learned top-1 is below the best baseline's, or ties it short of 1."""
    base = res["baselines"]
    learned = LEARNED_BANK if res["features"] == "memory bank" else LEARNED
    rows = [(learned, res["by_k"])] + [(NAMES[key], base[key]["by_k"]) for key in NAMES]
    tops = (1, 5) if "top5" in res else (1,)
    asked = {res["by_k"][str(k)]["k"]: k for k in res["ks"]}  # k used -> a k asked that gives it
    several = len(asked) > 1
    heads = [f"{f'k={k} ' if several else ''}top-{n}" for k in asked for n in tops]
    width = max(6, *(len(h) for h in heads))
    lines = [f"baselines: weighted kNN (k={', '.join(map(str, asked))}, t={res['temperature']}) "
             f"on {res['queries']} validation images, {res['bank_rows']} training images:",
             f"  {'features':<40}" + "".join(f" {h:>{width}}" for h in heads)]
    for name, by_k in rows:
        cells = [by_k[str(k)][f"top{n}"] for k in asked.values() for n in tops]
        lines.append(f"  {name:<40}" + "".join(f" {v:>{width}.4f}" for v in cells))
    best = max(NAMES, key=lambda key: base[key]["top1"])
    mine, theirs = res["top1"], base[best]["top1"]
    if mine < theirs or (mine == theirs < 1.0):
        at = f" at k={res['k']}" if several else ""  # the largest k's numbers
        hint = ("; try --recompute: it scores the network's features of the training images, "
                "not the bank's rows") if learned == LEARNED_BANK else ""
        how = "is below" if mine < theirs else "only ties"
        lines.append(f"  note: learned top-1 {mine:.4f} {how} the best baseline "
                     f"({NAMES[best]}, {theirs:.4f}){at}{hint}")
    return "\n".join(lines)
