"""Image bytes -> PIL pixels, decoded at the smallest size that still serves the output.

Pillow (libjpeg-turbo) decodes; `tools/bench_decode.py` measured it against torchvision.io's
decoders on one core (tools/results/bench_decode.txt): torchvision is faster at producing a
tensor, but not once its output is turned into the PIL image the augmentation works on, and only
Pillow decodes a JPEG at 1/2, 1/4 or 1/8 of its size in the DCT ("draft" mode), faster when the
output is much smaller than the image. `load_image` uses that reduction only as far as the pixels
the caller needs (`need`, in reduced-image pixels) allow, so it never upsamples what a full
decode would have downsampled.

Every reader turns pixels into 8 bits the same way (`to_8bit`, called by `load_image`): 16-bit
modes (I;16, I;16B, I;16L, I;16N, and I, which holds 16-bit PNG/PGM/TIFF data) as round(v / 257)
of v clipped to 0..65535; float (F) images whose values all lie in [0, 1] as round(255 v), other
float images clipped to 0..255 and rounded (NaN as 0). Pillow itself reads 16-bit RGB(A) PNGs as
8 bits (the high byte of each value, within 1 of v / 257).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ORIENTATION = 0x0112  # the EXIF tag; 2..8 mirror and/or rotate, 5..8 swap width and height
_TURN = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,  # as Pillow's
         4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,  # exif_transpose
         6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def open_image(data: bytes) -> Image.Image:
    """Read the header only: size and mode are known, nothing is decoded yet. Bytes PIL cannot
    read raise UnidentifiedImageError with a message that suits a file's skip line (PIL's own
    names its in-memory buffer, `<_io.BytesIO object at 0x...>`)."""
    if not data:
        raise UnidentifiedImageError("empty file (0 bytes)")
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
    img = to_8bit(img)
    mode = "L" if channels == 1 else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    return img, scale


def decode_image(data: bytes, channels: int) -> Image.Image:
    """The whole image at full size, mode L (channels 1) or RGB."""
    return load_image(open_image(data), channels)[0]


def high_depth(img: Image.Image) -> bool:
    """True for an image from `open_image` whose values have more than 8 bits: a 16-bit or float
    mode, or a 16-bit colour PNG that Pillow reads as 8 bits (call before `load`)."""
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "F":
        return True
    tiles = img.tile if isinstance(img, ImageFile.ImageFile) else []
    return img.format == "PNG" and any(";16" in str(t[3]) for t in tiles)


def to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit or float image (a loaded one) as mode L, by the rule in this module's docstring;
    any other image as it is."""
    if img.mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.rint(np.clip(a, 0.0, 255.0)).astype(np.uint8))
    if img.mode in SIXTEEN_BIT_MODES:
        v = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return Image.fromarray(((v + 128) // 257).astype(np.uint8))  # round(v / 257): no ties
    return img


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (2..8) of an image, 1 for none or a broken one. Of a loaded image it
    is the turn still to make: Pillow's TIFF reader turns the image as it loads and drops the
    tag, a JPEG or PNG is loaded as stored."""
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # a broken EXIF block: the image as stored
        return 1
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def upright(img: Image.Image) -> Image.Image:
    """A loaded image in 8 bits (`to_8bit`), turned as it is shown (its EXIF orientation): how
    `oocid shard` stores an image, and how `decode_file` reads one."""
    turn = exif_orientation(img)  # after the load (a TIFF has turned itself by then)
    img = to_8bit(img)
    return img if turn == 1 else img.transpose(_TURN[turn])


def decode_file(data: bytes, channels: int) -> Image.Image:
    """A user's image file (a query), not a shard's member: decoded as `decode_image` does and
    turned `upright`, as `oocid shard` stores such an image."""
    img = open_image(data)
    img.load()
    return load_image(upright(img), channels)[0]


def need_for(width: int, height: int, box_w: float, box_h: float, out_w: int, out_h: int
             ) -> tuple[int, int]:
    """The reduced-image size at which a (box_w, box_h) region of a (width, height) image still
    spans at least (out_w, out_h) pixels: the `need` of `load_image`."""
    return (math.ceil(width * out_w / max(box_w, 1e-9)), math.ceil(height * out_h / max(box_h, 1e-9)))
