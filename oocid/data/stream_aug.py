"""The streaming path's per-sample augmentation: JPEG/PNG bytes -> uint8 tensor (C, S, S).

The recipes of `augment.sample_transform` (the torchvision reference), made faster without
changing what they compute:
- the crop is drawn from the image header before decoding, so a JPEG much larger than the
  crop's output is decoded at 1/2, 1/4 or 1/8 size in the DCT (`decode.load_image`); only
  then do pixels differ from the reference (a different, equally valid, downsampling filter);
- the hue shift is Pillow's RGB -> HSV -> RGB round trip read from two tables built with
  Pillow's own conversions (bit for bit the reference, faster than converting);
- brightness and contrast, Pillow blends with a constant image, are per-value maps: a 256-entry
  table made by that very blend on a ramp, applied with Image.point (bit for bit, and faster);
- an image turned grayscale stays one channel through the colour jitter (every later step
  gives the same values on it) and is expanded to three at the end;
- no float conversion here: `augment.normalize_batch` does it once per batch on the device.
Every random number is drawn from torch's global generator in the reference's order, so with
the same seed the output equals the reference's (tests/data/test_stream_aug.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageStat
from torch import Tensor

from oocid.data.augment import eval_resize
from oocid.data.decode import load_image, need_for

_HUE_TABLES: tuple[np.ndarray, np.ndarray] | None = None


def hue_tables() -> tuple[np.ndarray, np.ndarray]:
    """(HS, RGBX): HS[r << 16 | g << 8 | b] = h << 8 | s (uint16) and RGBX[h << 16 | s << 8 | v]
    = the RGB bytes (uint32, 4th byte unused) of Pillow's HSV conversions; 96 MB, built once
    per process (it takes a while), before the DataLoader forks so that its workers share them."""
    global _HUE_TABLES
    if _HUE_TABLES is None:
        every = np.arange(1 << 24, dtype=np.uint32)  # all 24-bit triples, first byte most significant
        trip = np.stack([(every >> 16).astype(np.uint8), (every >> 8).astype(np.uint8),
                         every.astype(np.uint8)], axis=-1).reshape(4096, 4096, 3)
        hsv = np.asarray(Image.frombytes("RGB", (4096, 4096), trip.tobytes()).convert("HSV"))
        hs = (hsv[..., 0].astype(np.uint16).reshape(-1) << 8) | hsv[..., 1].reshape(-1)
        rgb = np.asarray(Image.frombytes("HSV", (4096, 4096), trip.tobytes()).convert("RGB"))
        rgbx = np.zeros((1 << 24, 4), dtype=np.uint8)
        rgbx[:, :3] = rgb.reshape(-1, 3)
        _HUE_TABLES = (hs, rgbx.view(np.uint32).reshape(-1))
    return _HUE_TABLES


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision's PIL `adjust_hue`, bit for bit: h += int(hue_factor * 255) mod 256 in
    Pillow's 8-bit HSV; single-channel images are returned unchanged."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5].")
    if img.mode != "RGB":
        return img
    hs_table, rgb_table = hue_tables()
    a = np.asarray(img)  # (H, W, 3) uint8
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    key = (r.astype(np.uint32) << 16) | (g.astype(np.uint32) << 8) | b
    hs = np.take(hs_table, key, mode="clip")  # (H, W) h<<8|s; take(clip): no bounds checks
    shift = int(np.int32(hue_factor * 255).astype(np.uint8))
    hs += np.uint16(shift << 8)  # h + shift mod 256 in the high byte; s untouched
    v = np.maximum(np.maximum(r, g), b)
    rgbx = np.take(rgb_table, (hs.astype(np.uint32) << 8) | v, mode="clip")  # (H, W) R, G, B, 0
    return Image.frombytes("RGB", img.size, np.ascontiguousarray(rgbx), "raw", "RGBX")


_RAMP = Image.frombytes("L", (256, 1), bytes(range(256)))


def _blend_table(constant: int, factor: float, bands: int) -> list[int]:
    """Pillow's Image.blend(constant image, image, factor) as a table of every input value."""
    return list(Image.blend(Image.new("L", (256, 1), constant), _RAMP, factor).tobytes()) * bands


def adjust_brightness(img: Image.Image, factor: float) -> Image.Image:
    """ImageEnhance.Brightness(img).enhance(factor), bit for bit (a blend with black)."""
    return img.point(_blend_table(0, factor, len(img.getbands())))


def adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
    """ImageEnhance.Contrast(img).enhance(factor), bit for bit: a blend with the constant image
    of the rounded mean of the L conversion."""
    gray = img if img.mode == "L" else img.convert("L")
    mean = int(ImageStat.Stat(gray).mean[0] + 0.5)
    return img.point(_blend_table(mean, factor, len(img.getbands())))


class _Jitter:
    """torchvision's ColorJitter(b, c, s, h) on PIL images, with the table-driven hue."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float) -> None:
        from torchvision import transforms as T

        cj = T.ColorJitter(brightness, contrast, saturation, hue)
        self.ranges = (cj.brightness, cj.contrast, cj.saturation, cj.hue)
        self.get_params = T.ColorJitter.get_params

    def __call__(self, img: Image.Image) -> Image.Image:
        fn_idx, b, c, s, h = self.get_params(*self.ranges)
        for fn_id in fn_idx.tolist():
            if fn_id == 0 and b is not None:
                img = adjust_brightness(img, b)
            elif fn_id == 1 and c is not None:
                img = adjust_contrast(img, c)
            elif fn_id == 2 and s is not None:
                img = ImageEnhance.Color(img).enhance(s)
            elif fn_id == 3 and h is not None:
                img = adjust_hue(img, h)
        return img


class _Gray:
    """RandomGrayscale(p), leaving the image one channel (expanded by `_to_uint8`)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.convert("L") if torch.rand(1) < self.p else img


def _flip(img: Image.Image) -> Image.Image:
    """RandomHorizontalFlip(0.5)."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if torch.rand(1) < 0.5 else img


def _to_uint8(img: Image.Image, channels: int) -> Tensor:
    """(C, S, S) uint8; a one-channel image of a 3-channel set is repeated (as the reference's
    grayscale step does)."""
    a = torch.from_numpy(np.asarray(img).copy())
    if a.ndim == 2:
        return a.unsqueeze(0).expand(channels, -1, -1)
    return a.permute(2, 0, 1)


class StreamTrain:
    """The training recipe (imagenet | cifar | gray) on an image from `decode.open_image`."""

    decodes = True  # takes an undecoded image (stream.ShardStream checks this)

    def __init__(self, recipe: str, size: int, scale_min: float, channels: int,
                 flip: bool = True) -> None:
        from torchvision.transforms import RandomResizedCrop

        self.get_params = RandomResizedCrop.get_params
        self.size, self.channels = size, channels
        self.scale, self.ratio = (scale_min, 1.0), (3 / 4, 4 / 3)
        self.needs_hue_tables = recipe in ("imagenet", "cifar") and channels == 3
        after: list[Callable[[Image.Image], Image.Image]]
        if recipe == "imagenet":
            after = [_Gray(0.2), _Jitter(0.4, 0.4, 0.4, 0.4), _flip]
        elif recipe == "cifar":
            after = [_Jitter(0.4, 0.4, 0.4, 0.4), _Gray(0.2), _flip]
        else:
            after = [_flip, _Jitter(0.4, 0.4, 0.0, 0.0)]
        self.after = after if flip else [step for step in after if step is not _flip]

    def __call__(self, img: Image.Image) -> Tensor:
        width, height = img.size
        i, j, h, w = self.get_params(img, list(self.scale), list(self.ratio))
        s = self.size
        img, k = load_image(img, self.channels, need_for(width, height, w, h, s, s))
        if k == 1.0:
            img = img.crop((j, i, j + w, i + h)).resize((s, s), Image.Resampling.BILINEAR)
        else:
            box = (j / k, i / k, (j + w) / k, (i + h) / k)
            img = img.resize((s, s), Image.Resampling.BILINEAR, box=box)
        for step in self.after:
            img = step(img)
        return _to_uint8(img, self.channels)


class StreamEval:
    """The test transform: resize the shorter side to R (imagenet: round(S * 256 / 224), else
    S), centre crop S; torchvision's Resize + CenterCrop on the (reduced-size) decoded image."""

    decodes = True
    needs_hue_tables = False

    def __init__(self, recipe: str, size: int, channels: int) -> None:
        self.size, self.channels = size, channels
        self.resize = eval_resize(recipe, size)

    def __call__(self, img: Image.Image) -> Tensor:
        from torchvision.transforms import functional as F

        width, height = img.size
        short = min(width, height)
        img, _ = load_image(img, self.channels,
                            need_for(width, height, short, short, self.resize, self.resize))
        img = F.center_crop(F.resize(img, [self.resize]), [self.size])
        return _to_uint8(img, self.channels)


def stream_transform(recipe: str, size: int, scale_min: float, channels: int, train: bool,
                     flip: bool = True) -> StreamTrain | StreamEval:
    """The per-sample transform of `stream.StreamData` (uint8 out); `flip`: data.flip."""
    return StreamTrain(recipe, size, scale_min, channels, flip) if train else StreamEval(
        recipe, size, channels)

