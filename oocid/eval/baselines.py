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

import torch
from torch import Tensor

from oocid.config import DataConfig
from oocid.data.augment import norm_constants
from oocid.data.batch import image_channels, normalization_stats
from oocid.data.eval_data import eval_batches, extract_features
from oocid.data.manifest import Manifest
from oocid.eval.embed import iter_features
from oocid.eval.evaluate import QUERY_CHUNK
from oocid.eval.retrieval import topk_indexed
from oocid.method.knn import BLOCK_ROWS, knn_scores_from_topk, topk_accuracy
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
    """The network `arch` freshly initialised after torch.manual_seed(seed), as `oocid demo`
    builds it (the global random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, in_channels, dim)
    return model.to(device).eval()


def untrained_search(model: Embedder, train: Manifest, val: Manifest, data_cfg: DataConfig,
                     channels_last: bool, device: torch.device, k: int, progress: bool = False,
                     say: Say = _stderr) -> Found:
    """The untrained network's top-k: validation features against the training features,
    both with the test transform (the training side streamed, as `knn --recompute`)."""
    q, _, labels = extract_features(model, eval_batches(val, data_cfg, device), channels_last)
    say(f"oocid: baselines: the untrained network's features of {train.n} training images")
    batches = eval_batches(train, data_cfg, device)
    chunks = ((idx, f) for idx, f, _ in iter_features(model, batches, channels_last, progress,
                                                      train.n, "untrained"))
    sims, index = topk_indexed(q, chunks, k)
    return Found(sims, index, labels)


class _Pixels:
    """Normalised test-transformed images (B, C, S, S) -> their pixels (B, P) in [0, 1]."""

    def __init__(self, data_cfg: DataConfig, channels: int, device: torch.device) -> None:
        mean, std = normalization_stats(data_cfg, channels)
        self.mean, self.std = norm_constants(tuple(mean), tuple(std), device)
        self.width = channels * data_cfg.image_size ** 2  # P

    def __call__(self, images: Tensor) -> Tensor:
        return (images.float() * self.std + self.mean).flatten(1)


def _query_blocks(val: Manifest, data_cfg: DataConfig, device: torch.device, pixels: _Pixels,
                  rows: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The validation pixels (q, P) in [0, 1] and labels (q,), in blocks of `rows` queries."""
    held: list[tuple[Tensor, Tensor]] = []
    n = 0
    for b in eval_batches(val, data_cfg, device):
        held.append((pixels(b.images), b.label))
        n += b.label.shape[0]
        while n >= rows:
            x, y = torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held])
            yield x[:rows], y[:rows]
            held, n = [(x[rows:], y[rows:])], n - rows
    if n:
        yield torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held])


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
    raw = search(None, "raw pixels")
    center = (total / max(1, counted[0])).float().to(device)  # (P,) the training mean image
    say(f"oocid: baselines: the same pixels minus the training set's mean image{each}")
    return raw, search(center, "mean-centred pixels")


def scored(found: Found, train_labels: Tensor, ks: Sequence[int], temperature: float,
           num_classes: int) -> dict[str, Any]:
    """top-1 (and top-5 with more than 5 classes, as `knn` shows them) for every k: the largest
    k's at the top, each k's in "by_k" ("k" in each: the k used, min(k, training rows)).
    found.labels must already be training labels."""
    nl = train_labels.to(found.index.device)[found.index]
    by_k: dict[str, dict[str, Any]] = {}
    for k in ks:
        used = min(k, found.sims.shape[1])
        scores = knn_scores_from_topk(found.sims, nl, used, temperature, num_classes)
        acc = topk_accuracy(scores, found.labels.to(scores.device), (1, 5))
        top5 = {"top5": acc[5]} if num_classes > 5 else {}
        by_k[str(k)] = {"top1": acc[1], **top5, "k": used}
    return {**by_k[str(max(ks))], "by_k": by_k}


def format_baselines(res: dict[str, Any]) -> str:
    """`knn --baselines`' table: the learned features' top-1 (top-5) and each baseline's, a
    column per k, then a note when the learned top-1 does not beat the best baseline's."""
    ks, base = res["ks"], res["baselines"]
    learned = LEARNED_BANK if res["features"] == "memory bank" else LEARNED
    rows = [(learned, res["by_k"])] + [(NAMES[key], base[key]["by_k"]) for key in NAMES]
    top5 = "top5" in res
    several = len(ks) > 1
    tops = (1, 5) if top5 else (1,)
    used = [res["by_k"][str(k)]["k"] for k in ks]  # min(k, training rows)
    heads = [f"{f'k={k} ' if several else ''}top-{n}" for k in used for n in tops]
    width = max(6, *(len(h) for h in heads))
    lines = [f"baselines: weighted kNN (k={', '.join(map(str, used))}, t={res['temperature']}) on "
             f"{res['queries']} validation images, {res['bank_rows']} training images:",
             f"  {'features':<40}" + "".join(f" {h:>{width}}" for h in heads)]
    for name, by_k in rows:
        cells = [by_k[str(k)][f"top{n}"] for k in ks for n in tops]
        lines.append(f"  {name:<40}" + "".join(f" {v:>{width}.4f}" for v in cells))
    best = max(NAMES, key=lambda key: base[key]["top1"])
    if not res["top1"] > base[best]["top1"]:
        at = f" at k={res['k']}" if several else ""  # the largest k's numbers
        hint = ("; --recompute scores the network's features of the training images, not "
                "the bank's rows") if learned == LEARNED_BANK else ""
        lines.append(f"  note: learned top-1 {res['top1']:.4f} is not above the best baseline "
                     f"({NAMES[best]}, {base[best]['top1']:.4f}){at}{hint}")
    return "\n".join(lines)
