"""The inputs `write_shards` reads, and each image as it is stored in a shard.

A source is an ImageFolder tree (class sub-folders -> labels), a flat folder of images
(unlabeled) or an `.npz` with `images` (N, H, W[, C]) uint8 [+ `labels` (N,), `class_names`].
`open_source` lists its candidates (paths, labels, class names; files without an image
extension skipped, hidden files and folders and `__MACOSX` left out, empty class folders left
out with a note) and gives an `encode` that turns candidate i into the bytes a shard stores:
JPEG/PNG/WEBP as given, other formats re-encoded to PNG, npz arrays encoded to PNG; with a short
side N > 0, an image whose shorter side exceeds N is stored resized to N on that side, aspect
kept, as JPEG. Whatever is re-encoded is first made 8-bit by `decode.to_8bit`, the rule every
reader applies to the images stored as given.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from oocid.data.decode import exif_orientation, high_depth, open_image, to_8bit, upright
from oocid.data.manifest import IMAGE_EXTS
from oocid.errors import InputError, OocidError

DEFAULT_SHORT_SIDE = 256  # store images with a shorter side above this resized to it (0: never)
DEFAULT_QUALITY = 90  # JPEG quality of resized images
_KEEP = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> stored ext
_GRAY_MODES = frozenset({"1", "L", "LA"})  # after `to_8bit`
NOT_IMAGE = "not an image extension"  # the skip reason of a file whose name is not an image's
_LEFT_OUT = frozenset({"__MACOSX"})  # the resource forks a macOS zip adds, like hidden files


@dataclass
class Encoded:
    """One image as stored: its bytes, member extension and stored size."""

    data: bytes
    ext: str
    height: int
    width: int
    channels: int
    orig_height: int = 0  # the source's size where it was resized, else 0
    orig_width: int = 0
    high_depth: bool = False  # 16-bit or float pixels in the source, read as 8-bit


@dataclass
class Source:
    """The candidates of one source and how to encode each."""

    paths: list[str]  # (M,) stored path of each candidate, in listing order
    labels: list[int] | None  # (M,) or None if unlabeled
    classes: tuple[str, ...] | None
    skipped: list[dict]  # files without an image extension met while listing
    encode: Callable[[int, int, int], Encoded]  # (position, short side, quality) -> checked bytes
    notes: list[str] = field(default_factory=list)  # warnings of the listing (empty classes)


def _resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(w, h) with the shorter side `short`, the longer int(short * long / short_side), as
    torchvision's Resize(short) computes it."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def _shrink(img: Image.Image, short: int, quality: int) -> Encoded:
    """Decode (a JPEG at reduced size down to 2x the target, like Image.thumbnail), turn it
    upright by its EXIF orientation, resize with bicubic antialiasing to the shorter side
    `short`, encode as JPEG (mode L or RGB)."""
    jpeg = img.format == "JPEG"  # decoded reduced: its size as shown comes from the header
    orient = exif_orientation(img) if jpeg else 1
    width, height = img.size if orient < 5 else img.size[::-1]
    if jpeg:
        nw, nh = _resized_size(width, height, short)
        img.draft(img.mode, (2 * nw, 2 * nh) if orient < 5 else (2 * nh, 2 * nw))
    img.load()
    img = upright(img)  # (Pillow's TIFF reader turns an image itself, even its header's size)
    if not jpeg:
        width, height = img.size
    nw, nh = _resized_size(width, height, short)
    mode = "L" if img.mode in _GRAY_MODES else "RGB"
    small = img.convert(mode).resize((nw, nh), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    return Encoded(buf.getvalue(), "jpg", nh, nw, 1 if mode == "L" else 3, height, width)


def _encode_bytes(data: bytes, short: int = 0, quality: int = DEFAULT_QUALITY) -> Encoded:
    """Fully decode `data`; keep JPEG/PNG/WEBP bytes as is, re-encode others to PNG; an image
    whose shorter side exceeds `short` > 0 is resized (`_shrink`)."""
    with open_image(data) as img:
        deep = high_depth(img)
        enc = _encode_open(img, data, short, quality)
    enc.high_depth = deep
    return enc


def _encode_open(img: Image.Image, data: bytes, short: int, quality: int) -> Encoded:
    if short > 0 and min(img.size) > short:
        return _shrink(img, short, quality)
    img.load()
    if exif_orientation(img) != 1:  # stored upright: the shard readers do not look at EXIF
        return _upright(img, quality)
    width, height = img.size
    if img.format in _KEEP:  # as given: a 16-bit PNG too, which the readers make 8-bit
        channels = {"P": 3, "PA": 4}.get(img.mode, len(img.getbands()))
        return Encoded(data, _KEEP[img.format], height, width, channels)
    img = to_8bit(img)
    mode = "L" if img.mode in _GRAY_MODES else "RGB"
    return Encoded(_png(img.convert(mode)), "png", height, width, 1 if mode == "L" else 3)


def _upright(img: Image.Image, quality: int) -> Encoded:
    """An image with an EXIF orientation, turned as it is shown: a JPEG re-encoded as JPEG
    (`quality`), other formats as PNG."""
    jpeg = img.format == "JPEG"
    up = upright(img)
    mode = "L" if up.mode in _GRAY_MODES else "RGB"
    up = up.convert(mode)
    if jpeg:
        buf = io.BytesIO()
        up.save(buf, format="JPEG", quality=quality)
        data = buf.getvalue()
    else:
        data = _png(up)
    return Encoded(data, "jpg" if jpeg else "png", up.height, up.width, 1 if mode == "L" else 3)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _visible(entries: list[os.DirEntry]) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".") and e.name not in _LEFT_OUT),
                  key=lambda e: e.name)


def _list_files(folder: Path) -> list[Path]:
    """Files under `folder`, recursively, in sorted order; hidden ones and `__MACOSX` left out."""
    out: list[Path] = []
    with os.scandir(folder) as it:
        entries = _visible(list(it))
    for e in entries:
        if e.is_dir():
            out.extend(_list_files(Path(e.path)))
        elif e.is_file():
            out.append(Path(e.path))
    return out


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS


def _folder_source(src: Path) -> Source:
    with os.scandir(src) as it:
        entries = _visible(list(it))
    dirs = [Path(e.path) for e in entries if e.is_dir()]
    files = [Path(e.path) for e in entries if e.is_file()]
    listed = {d: _list_files(d) for d in dirs}
    labeled = any(_is_image(f) for fs in listed.values() for f in fs)
    skipped: list[dict] = []
    notes: list[str] = []
    rel: list[Path] = []
    labels: list[int] | None = None
    classes: tuple[str, ...] | None = None
    if labeled:
        if any(_is_image(f) for f in files):
            raise InputError(
                f"{src}: mixes images and class sub-folders; use either an ImageFolder layout "
                "(images only inside class folders) or a flat folder of images"
            )
        skipped += [{"path": f.name, "error": NOT_IMAGE} for f in files]
        empty = [d for d in dirs if not any(_is_image(f) for f in listed[d])]
        notes += [f"{d}: class folder has no image files; left out (the classes are the other "
                  "folders)" for d in empty]
        kept = [d for d in dirs if d not in empty]
        classes, labels = tuple(d.name for d in kept), []
        for d in empty:
            skipped += [{"path": f.relative_to(src).as_posix(), "error": NOT_IMAGE}
                        for f in listed[d]]
        for label, d in enumerate(kept):
            for f in listed[d]:
                if _is_image(f):
                    rel.append(f.relative_to(src))
                    labels.append(label)
                else:
                    skipped.append({"path": f.relative_to(src).as_posix(), "error": NOT_IMAGE})
    else:
        for f in files:
            if _is_image(f):
                rel.append(f.relative_to(src))
            else:
                skipped.append({"path": f.name, "error": NOT_IMAGE})
    if not rel:
        raise InputError(f"{src}: no image files found ({', '.join(sorted(IMAGE_EXTS))})")

    def encode(i: int, short: int, quality: int) -> Encoded:
        return _encode_bytes((src / rel[i]).read_bytes(), short, quality)

    return Source([p.as_posix() for p in rel], labels, classes, skipped, encode, notes)


def _npz_source(src: Path, split: str) -> Source:
    try:
        z = np.load(src, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise InputError(f"{src}: not an .npz archive")
        with z:
            prefix = "" if "images" in z.files else f"{split}_"
            if f"{prefix}images" not in z.files:
                raise InputError(
                    f"{src}: no 'images' or '{split}_images' array (has: {', '.join(z.files)})"
                )
            images = z[f"{prefix}images"]
            labels = z[f"{prefix}labels"] if f"{prefix}labels" in z.files else None
            names = z["class_names"] if "class_names" in z.files else None
    except OocidError:
        raise
    except Exception as e:  # zipfile/ValueError/OSError from a malformed file
        raise InputError(f"{src}: cannot read .npz: {e}") from None
    key = f"{prefix}images"
    if images.dtype != np.uint8:
        raise InputError(f"{src}: '{key}' has dtype {images.dtype}, expected uint8")
    bad_c = images.ndim == 4 and images.shape[3] not in (1, 3)
    if images.ndim not in (3, 4) or bad_c or 0 in images.shape:
        raise InputError(f"{src}: '{key}' has shape {images.shape}, expected (N, H, W[, 1|3])")
    n = images.shape[0]
    classes: tuple[str, ...] | None = None
    label_list: list[int] | None = None
    if labels is not None:
        lkey = f"{prefix}labels"
        if labels.ndim != 1 or labels.shape[0] != n or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(
                f"{src}: '{lkey}' must be ({n},) integers, got {labels.shape} {labels.dtype}"
            )
        if labels.min() < 0:
            raise InputError(f"{src}: '{lkey}' has negative labels")
        if names is None:
            classes = tuple(str(c) for c in range(int(labels.max()) + 1))
        elif names.ndim != 1 or names.dtype.kind not in "US" or len(names) <= labels.max():
            raise InputError(f"{src}: 'class_names' must be a 1-D str array covering every label")
        else:
            classes = tuple(str(c) for c in names.tolist())
        label_list = [int(y) for y in labels]
    tag = split if prefix else "images"

    def encode(i: int, short: int, quality: int) -> Encoded:
        a = images[i]
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        h, w = a.shape[:2]
        img = Image.fromarray(np.ascontiguousarray(a))  # (H, W) -> L, (H, W, 3) -> RGB
        if short > 0 and min(h, w) > short:
            return _shrink(img, short, quality)
        data = _png(img)
        return Encoded(data, "png", h, w, 1 if a.ndim == 2 else 3)

    return Source([f"npz:{tag}:{i}" for i in range(n)], label_list, classes, [], encode)


def open_source(src: Path, split: str) -> Source:
    """The source at `src`: a folder or an .npz (`split` picks `{split}_images` where the npz
    has no `images` array); InputError if it is neither or holds no images."""
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    if src.is_dir():
        return _folder_source(src)
    if src.suffix.lower() == ".npz":
        return _npz_source(src, split)
    raise InputError(f"{src}: expected an image folder or an .npz file")
