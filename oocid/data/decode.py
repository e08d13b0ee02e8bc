"""Image bytes -> PIL pixels, decoded at the smallest size that still serves the output.

Pillow (libjpeg-turbo) decodes; `tools/bench_decode.py` measured it against torchvision.io's
decoders on one core (tools/results/bench_decode.txt): torchvision is faster at producing a
tensor, but not once its output is turned into the PIL image the augmentation works on, and only
Pillow decodes a JPEG at 1/2, 1/4 or 1/8 of its size in the DCT ("draft" mode), faster when the
output is much smaller than the image. `load_image` uses that reduction only as far as the pixels
the caller needs (`need`, in reduced-image pixels) allow, so it never upsamples what a full
decode would have downsampled.
"""

from __future__ import annotations

import io
import math

from PIL import Image, UnidentifiedImageError


def open_image(data: bytes) -> Image.Image:
    """Read the header only: size and mode are known, nothing is decoded yet. Bytes PIL cannot
    read raise UnidentifiedImageError with a message that suits a file's skip line (PIL's own
    names its in-memory buffer, `<_io.BytesIO object at 0x...>`)."""
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError("not an image format Pillow can read") from None


def load_image(img: Image.Image, channels: int, need: tuple[int, int] | None = None
               ) -> tuple[Image.Image, float]:
    """Decode an image from `open_image` into mode L (channels 1) or RGB, and its scale s.

    With `need` = (w, h), a JPEG is decoded at the largest reduction 1/s (s in 1, 2, 4, 8) whose
    size is still at least (w, h); pixel (x, y) of the original is at (x / s, y / s) in the
    result. Other formats decode at full size (s = 1)."""
    scale = 1.0
    if need is not None and img.format == "JPEG":
        width = img.size[0]
        got = img.draft(img.mode, (max(1, need[0]), max(1, need[1])))
        if got is not None:  # (mode, (0, 0, width / s, height / s))
            scale = width / got[1][2]
    img.load()
    mode = "L" if channels == 1 else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    return img, scale


def decode_image(data: bytes, channels: int) -> Image.Image:
    """The whole image at full size, mode L (channels 1) or RGB."""
    return load_image(open_image(data), channels)[0]


def need_for(width: int, height: int, box_w: float, box_h: float, out_w: int, out_h: int
             ) -> tuple[int, int]:
    """The reduced-image size at which a (box_w, box_h) region of a (width, height) image still
    spans at least (out_w, out_h) pixels: the `need` of `load_image`."""
    return (math.ceil(width * out_w / max(box_w, 1e-9)), math.ceil(height * out_h / max(box_h, 1e-9)))
