"""Benchmark image decoding on one core: Pillow against torchvision.io's decoders.

Decoders, each turning encoded bytes into 8-bit RGB pixels in memory:
    pil           PIL.Image.open + convert("RGB") (full size; what ImageFolder's loader does)
    oocid         oocid.data.decode.decode_image: Pillow, load, convert only when the mode differs
    pil-draft     Pillow's reduced-size JPEG decoding (draft: 1/2, 1/4 or 1/8 in the DCT), at the
                  largest reduction that still leaves >= 224 px on both sides, as oocid's stream
                  does when the crop's output is much smaller than the image (oocid.data.decode)
    tv-jpeg       torchvision.io.decode_jpeg(mode=RGB) on a uint8 tensor of the bytes (JPEG only)
    tv-image      torchvision.io.decode_image(mode=RGB) (any format)
    tv-image>pil  tv-image, then a PIL image of it (what a PIL-based augmentation would need)
Images (generated here, nothing downloaded): synthetic "photos" with realistic entropy (smooth
gradients, filled shapes, blur, multi-scale texture and pixel noise), JPEG quality 90, at
500x375 (ImageNet's typical size), 1024x768, 341x256 (what `oocid shard` stores by default:
shorter side 256) and 32x32 (CIFAR-size), plus 32x32 PNG.

Each decoder runs over the whole set in --rounds interleaved rounds with torch on 1 thread,
timed in CPU time of the decoding thread (time.thread_time: on a shared, oversubscribed machine
wall time mostly measures how long the thread waited for a core); the best round is reported.
`max |d|` is the largest pixel difference from the full Pillow decode, `mean |d|` the mean
(pil-draft is compared after resizing Pillow's full decode to its size with bilinear
antialiasing, so it shows a different downsampling filter on pixel noise, not an error).

Usage:
    python tools/bench_decode.py            # ~1 min on 2 cores
Prints a table; the LAST line is JSON (one object per image set and decoder).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFilter

TARGET = 224  # the training crop's output side


def synth_photo(rng: np.random.Generator, w: int, h: int, noise: float = 12.0) -> Image.Image:
    """A (w, h) RGB image with photo-like statistics: low-frequency colour waves, 8-19 filled
    shapes, a slight blur, 1/8-scale texture and per-pixel noise. At 500x375 and JPEG quality
    90 it is ~75 KB (ImageNet's JPEGs average ~110 KB at ~400x350)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        field[..., c] = rng.uniform(40, 200)
        for _ in range(3):
            fx, fy = rng.uniform(0.5, 4, 2) * 2 * np.pi / np.array([w, h])
            field[..., c] += rng.uniform(10, 40) * np.sin(fx * xx + fy * yy + rng.uniform(0, 6.3))
    img = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(8, 20))):
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.05, 0.5) * w, y0 + rng.uniform(0.05, 0.5) * h
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.polygon([(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(5)],
                         fill=colour)
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0))).astype(np.float32)
    coarse = rng.normal(128, noise * 1.5, (h // 8 + 1, w // 8 + 1, 3)).clip(0, 255).astype(np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR))
    a += texture.astype(np.float32) - 128 + rng.normal(0, noise, a.shape).astype(np.float32)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def image_sets(n_large: int, n_small: int, seed: int) -> dict[str, list[bytes]]:
    rng = np.random.default_rng(seed)
    sets: dict[str, list[bytes]] = {}
    for w, h, n in ((500, 375, n_large), (1024, 768, n_large // 2), (32, 32, n_small)):
        sets[f"jpeg {w}x{h}"] = [encode(synth_photo(rng, w, h), "JPEG") for _ in range(n)]
    # what `oocid shard` stores by default: the 500x375 set with the shorter side at 256
    from oocid.data.sources import _encode_bytes

    sets["jpeg 341x256 (shard default)"] = [_encode_bytes(d, 256, 90).data
                                            for d in sets["jpeg 500x375"]]
    sets["png 32x32"] = [encode(synth_photo(rng, 32, 32), "PNG") for _ in range(n_small)]
    return sets


def pil_full(data: bytes) -> Any:
    return Image.open(io.BytesIO(data)).convert("RGB")


def pil_draft(data: bytes) -> Any:
    from oocid.data.decode import load_image, open_image

    return load_image(open_image(data), 3, (TARGET, TARGET))[0]


def tv_jpeg(data: bytes) -> Any:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def tv_image(data: bytes) -> Any:
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def tv_image_pil(data: bytes) -> Any:
    t = tv_image(data)  # (C, H, W) uint8
    return Image.frombytes("RGB", (t.shape[2], t.shape[1]), t.permute(1, 2, 0).contiguous().numpy())


def oocid_decode(data: bytes) -> Any:
    from oocid.data.decode import decode_image

    return decode_image(data, 3)


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "pil": pil_full, "oocid": oocid_decode, "pil-draft": pil_draft, "tv-jpeg": tv_jpeg,
    "tv-image": tv_image, "tv-image>pil": tv_image_pil}


def as_hwc(x: Any) -> np.ndarray:
    return x.permute(1, 2, 0).numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def diff(name: str, data: bytes) -> np.ndarray:
    """|decoder - full Pillow decode| per pixel and channel (int)."""
    ref = pil_full(data)
    got = as_hwc(DECODERS[name](data))
    if got.shape[:2] != (ref.height, ref.width):
        ref = ref.resize((got.shape[1], got.shape[0]), Image.Resampling.BILINEAR)
    return np.abs(got.astype(np.int16) - np.asarray(ref).astype(np.int16))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--large", type=int, default=60, help="images per full-size JPEG set")
    p.add_argument("--small", type=int, default=1000, help="images per 32 px set")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    from PIL import features

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
          f"python {platform.python_version()}, Pillow {PIL.__version__} (libjpeg-turbo "
          f"{features.version('libjpeg_turbo')}), torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}; one core (torch threads 1), CPU time of the decoding thread, "
          f"best of {a.rounds} rounds")
    t0 = time.perf_counter()
    sets = image_sets(a.large, a.small, a.seed)
    print(f"# generated {sum(map(len, sets.values()))} images in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    rows = []
    header = (f"{'images':30s} {'KB/img':>7s} {'decoder':12s} {'ms/img':>8s} {'img/s':>8s} "
              f"{'vs pil':>7s} {'out size':>10s} {'max |d|':>8s} {'mean |d|':>9s}")
    print(header)
    print("-" * len(header))
    for set_name, items in sets.items():
        names = [n for n in DECODERS if not (n in ("tv-jpeg", "pil-draft") and "png" in set_name)]
        if "png" not in set_name and "32x32" in set_name:
            names.remove("pil-draft")  # nothing to reduce
        best = {n: float("inf") for n in names}
        for r in range(a.rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
                fn = DECODERS[n]
                t = time.thread_time()
                for d in items:
                    fn(d)
                best[n] = min(best[n], (time.thread_time() - t) / len(items))
        kb = float(np.mean([len(d) for d in items])) / 1024
        for n in names:
            out = as_hwc(DECODERS[n](items[0]))
            ds = [diff(n, d) for d in items[:10]]
            row = {"images": set_name, "kb_per_image": round(kb, 1), "decoder": n,
                   "ms_per_image": round(best[n] * 1000, 4), "images_per_s": round(1 / best[n], 1),
                   "speed_vs_pil": round(best["pil"] / best[n], 2),
                   "out_size": f"{out.shape[1]}x{out.shape[0]}",
                   "max_abs_diff": int(max(d.max() for d in ds)),
                   "mean_abs_diff": round(float(np.mean([d.mean() for d in ds])), 3)}
            rows.append(row)
            print(f"{set_name:30s} {kb:7.1f} {n:12s} {row['ms_per_image']:8.3f} "
                  f"{row['images_per_s']:8.0f} {row['speed_vs_pil']:7.2f} {row['out_size']:>10s} "
                  f"{row['max_abs_diff']:8d} {row['mean_abs_diff']:9.3f}")
    print(f"# load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
