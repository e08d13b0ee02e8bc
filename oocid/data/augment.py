"""Augmentations (docs/method.md, "Defaults"), two ways.

- `BatchAugment`: batched, on the device (or in a DataLoader worker), for small images: random
  resized crop (area scale, aspect 3/4-4/3) and flip as one affine `grid_sample`, then per
  sample brightness, contrast and, for colour images, saturation, hue (torchvision's tensor
  RGB -> HSV -> RGB, each sample its own shift) and random grayscale. Fast on CPU and GPU; the
  jitter's four steps run in this fixed order where torchvision's ColorJitter shuffles them.
- `sample_transform`: torchvision transforms on PIL images, per sample: the paper's ImageNet and
  CIFAR recipes, and a grayscale recipe, as a plain `torchvision.transforms.Compose` (the
  reference; used for single query images).
- `StreamTrain` / `StreamEval`: the same recipes for the streaming path (`oocid/stream_aug.py`):
  the same random draws in the same order and, where the JPEG is not decoded at reduced size,
  the same uint8 pixels, several times faster; normalisation is left to `normalize_batch`, once
  per batch on the device.

Dimension letters: B batch, C channels, H, W input size, S output size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class BatchAugment:
    """Random resized crop + flip + colour jitter on a uint8 batch (B, C, H, W) -> float (B, C, S, S),
    normalised with mean/std. All randomness comes from the generator passed to `__call__`."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], *,
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip: bool = True, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.0, hue: float = 0.0, grayscale_p: float = 0.0) -> None:
        self.size = size
        self.mean_std = (tuple(mean), tuple(std))
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.flip = flip
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.hue = hue
        self.grayscale_p = grayscale_p

    def _uniform(self, n: int, lo: float, hi: float, g: torch.Generator, device: torch.device
                 ) -> Tensor:
        return torch.rand(n, generator=g, device=device) * (hi - lo) + lo

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        b, c = images.shape[:2]
        dev = images.device
        g = generator
        x = images.float().div_(255.0)  # (B, C, H, W)
        # crop: area fraction a, aspect r -> width/height fractions of the image side
        area = self._uniform(b, self.scale[0], self.scale[1], g, dev)
        ratio = torch.exp(self._uniform(b, self.log_ratio[0], self.log_ratio[1], g, dev))
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(b, generator=g, device=dev) * 2 - 1) * (1 - w)
        cy = (torch.rand(b, generator=g, device=dev) * 2 - 1) * (1 - h)
        sx = w
        if self.flip:
            sign = torch.where(torch.rand(b, generator=g, device=dev) < 0.5, -1.0, 1.0)
            sx = w * sign
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0] = sx
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = h
        theta[:, 1, 2] = cy
        grid = F.affine_grid(theta, [b, c, self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                          align_corners=False)  # (B, C, S, S)
        if self.brightness > 0:
            f = self._uniform(b, 1 - self.brightness, 1 + self.brightness, g, dev).view(b, 1, 1, 1)
            x = x * f
        if self.contrast > 0:
            f = self._uniform(b, 1 - self.contrast, 1 + self.contrast, g, dev).view(b, 1, 1, 1)
            gray = x.mean(dim=1, keepdim=True) if c > 1 else x
            m = gray.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - m) * f + m
        if c == 3 and self.saturation > 0:
            f = self._uniform(b, 1 - self.saturation, 1 + self.saturation, g, dev).view(b, 1, 1, 1)
            gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
            x = (x - gray) * f + gray
        if c == 3 and self.hue > 0:
            shift = self._uniform(b, -self.hue, self.hue, g, dev)
            x = adjust_hue_batch(x.clamp_(0.0, 1.0), shift)
        if c == 3 and self.grayscale_p > 0:
            pick = (torch.rand(b, generator=g, device=dev) < self.grayscale_p).view(b, 1, 1, 1)
            gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
            x = torch.where(pick, gray, x)
        x = x.clamp_(0.0, 1.0)
        m, s = norm_constants(*self.mean_std, dev)
        return (x - m) / s


def adjust_hue_batch(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of each RGB image of x (B, 3, H, W) in [0, 1] by shift[b] (in [-0.5, 0.5],
    a fraction of the hue circle): torchvision's tensor `adjust_hue` (its RGB -> HSV -> RGB
    conversions), with one shift per sample instead of one per call."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)  # torchvision: (h + factor) % 1.0
    # HSV -> RGB as channel = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1
    # for R, G, B: torchvision's six-sector table in closed form (the same values to float
    # rounding, tested), a few passes instead of stacking the six sectors per channel
    h6 = h * 6.0
    vs = maxc * s
    out = torch.empty_like(x)
    for ch, n in enumerate((5.0, 3.0, 1.0)):
        k = torch.remainder(h6 + n, 6.0)
        out[:, ch] = maxc - vs * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return out


def batch_augment_for(recipe: str, size: int, mean: Sequence[float], std: Sequence[float],
                      scale_min: float, flip: bool = True) -> BatchAugment:
    """The batched version of a named recipe (imagenet | cifar | gray); `flip`: data.flip."""
    if recipe == "gray":
        return BatchAugment(size, mean, std, scale=(scale_min, 1.0), flip=flip, brightness=0.4,
                            contrast=0.4)
    return BatchAugment(size, mean, std, scale=(scale_min, 1.0), flip=flip, brightness=0.4,
                        contrast=0.4, saturation=0.4, hue=0.4, grayscale_p=0.2)


def eval_resize(recipe: str, size: int) -> int:
    """The shorter side the test transform resizes to before its centre crop of `size`: the
    paper's 256 for 224 under the imagenet recipe (8 % of each side cropped away), else `size`."""
    return round(size * 256 / 224) if recipe == "imagenet" else size


def batch_eval_transform(recipe: str, size: int, mean: Sequence[float], std: Sequence[float]
                         ) -> Callable[[Tensor], Tensor]:
    """uint8 (B, C, H, W) -> normalised float (B, C, S, S): the test transform of
    `sample_transform` on a batch, torchvision's Resize(R) + CenterCrop(S) with R =
    `eval_resize(recipe, size)`; a square S x S batch passes unresized except under imagenet."""
    mean_std = (tuple(mean), tuple(std))
    resize = eval_resize(recipe, size)

    def apply(images: Tensor) -> Tensor:
        x = images.float().div_(255.0)
        h, w = x.shape[-2:]
        # Resize(R): the shorter side to R, the longer in proportion (truncated, as torchvision)
        out_h, out_w = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
        if (out_h, out_w) != (h, w):
            x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True,
                              align_corners=False)
        top, left = round((out_h - size) / 2), round((out_w - size) / 2)
        x = x[..., top:top + size, left:left + size]
        m, s = norm_constants(*mean_std, x.device)
        return (x - m) / s

    return apply


def sample_transform(recipe: str, size: int, mean: Sequence[float], std: Sequence[float],
                     scale_min: float, train: bool, flip: bool = True) -> Callable:
    """Per-sample torchvision transform on a PIL image -> float tensor (C, S, S); `flip`:
    data.flip (the random horizontal flip of training)."""
    from torchvision import transforms as T  # lazily: slow to import

    norm = [T.ToTensor(), T.Normalize(list(mean), list(std))]
    steps: list[Callable]
    if not train:
        steps = [T.Resize(eval_resize(recipe, size)), T.CenterCrop(size), *norm]
    else:
        crop = T.RandomResizedCrop(size, scale=(scale_min, 1.0))
        if recipe == "imagenet":
            steps = [crop, T.RandomGrayscale(0.2), T.ColorJitter(0.4, 0.4, 0.4, 0.4),
                     T.RandomHorizontalFlip(), *norm]
        elif recipe == "cifar":
            steps = [crop, T.ColorJitter(0.4, 0.4, 0.4, 0.4), T.RandomGrayscale(0.2),
                     T.RandomHorizontalFlip(), *norm]
        else:
            steps = [crop, T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4), *norm]
        if not flip:
            steps = [s for s in steps if not isinstance(s, T.RandomHorizontalFlip)]
    tf: Callable = T.Compose(steps)
    return tf


def normalize_batch(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (B, C, S, S) -> float (x / 255 - mean) / std, in two passes over the batch."""
    m, s = norm_constants(tuple(mean), tuple(std), x.device)
    return x.float().sub_(m * 255.0).mul_(1.0 / (255.0 * s))


@functools.lru_cache(maxsize=16)
def norm_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                   ) -> tuple[Tensor, Tensor]:
    """mean and std as float32 (1, C, 1, 1) tensors on `device`, made once per device (a
    fresh tensor per batch is a blocking host-to-device copy on a GPU). Shared: read only."""
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return m, s
