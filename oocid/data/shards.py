"""Images -> WebDataset tar shards + `manifest.json`, and raw reading back.

A source is an ImageFolder tree (class sub-folders -> labels), a flat folder of images
(unlabeled) or an `.npz` with `images` (N, H, W[, C]) uint8 [+ `labels` (N,), `class_names`].
Its samples are shuffled once with `numpy.random.default_rng(seed)` and numbered 0..N-1 in
that order; shard s holds the contiguous indices [s*S, min((s+1)*S, N)). Per sample, with
key = f"{index:09d}":

    {key}.{png|jpg|webp}  image bytes (JPEG/PNG/WEBP as given, other formats re-encoded to PNG;
                          with `short_side` N > 0 (default 256), an image whose shorter side
                          exceeds N is stored resized to N on that side, aspect kept, as JPEG)
    {key}.json            {"index": i, "label": y or null, "path": source path}
    {key}.cls             label as ASCII digits (labeled sources only)

Tars are byte-deterministic (mtime 0, uid/gid 0, mode 0o644): the same source and seed give
the same shards and the same manifest identity. Each shard is written to a temp name and
renamed; manifest.json is written last, atomically. Unreadable inputs are skipped, reported
on stderr and listed in the manifest; they take no index.

Storing images at a training size is the usual practice (FFCV and others write resized
ImageNet): RandomResizedCrop(224) and Resize(256) + CenterCrop(224) need no more than a 256 px
shorter side, and decoding a 500x375 JPEG costs ~2.5x a 341x256 one. The manifest's
image_stats record the option ("resize") and the original sizes ("original").
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import struct
import sys
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
from PIL import Image
from tqdm import tqdm

from oocid.errors import DataError, InputError, OocidError, WriteError

MANIFEST_NAME = "manifest.json"
DEFAULT_SHARD_SIZE = 4096
DEFAULT_SHORT_SIDE = 256  # store images with a shorter side above this resized to it (0: never)
DEFAULT_QUALITY = 90  # JPEG quality of resized images
FORMAT = "oocid-shards"
VERSION = 1
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_KEEP = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> stored ext
_STORED_EXTS = frozenset(_KEEP.values())
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
_OWN_NAME = re.compile(r"^(manifest\.json(\.tmp)?|shard-[0-9]+\.tar(\.tmp)?)$")
_SHARD_NAME = re.compile(r"^shard-[0-9]+\.tar$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ShardInfo:
    """One tar file: name relative to the shard dir, global index range [start, stop)."""

    name: str
    start: int
    stop: int
    sha256: str
    nbytes: int


@dataclass(frozen=True)
class Manifest:
    """What `write_shards` wrote; `root` is the folder holding it (not serialised)."""

    root: Path
    n: int
    shard_size: int
    shards: tuple[ShardInfo, ...]
    classes: tuple[str, ...] | None
    image_stats: dict
    source: str
    seed: int
    skipped: tuple[dict, ...]
    identity: str

    @property
    def labeled(self) -> bool:
        return self.classes is not None

    def shard_paths(self) -> list[Path]:
        return [self.root / s.name for s in self.shards]

    @property
    def spans(self) -> dict[str, tuple[int, int]]:
        """Shard file name -> its [start, stop) indices (the `span` of `iter_samples`)."""
        return {s.name: (s.start, s.stop) for s in self.shards}


@dataclass(frozen=True)
class RawSample:
    """One undecoded sample of a shard; `path` is the source path ("npz:train:123" for npz)."""

    key: str
    index: int
    label: int | None
    image: bytes
    ext: str
    path: str


def manifest_identity(n: int, shard_size: int, shards: tuple[ShardInfo, ...]) -> str:
    """sha256 hex over n, S and each shard's name and sha256: what banks store to match."""
    h = hashlib.sha256(f"{FORMAT}/{VERSION}\n{n}\n{shard_size}\n".encode())
    for s in shards:
        h.update(f"{s.name}\t{s.sha256}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------- sources


@dataclass
class _Encoded:
    data: bytes
    ext: str
    height: int
    width: int
    channels: int
    orig_height: int = 0  # the source's size where it was resized, else 0
    orig_width: int = 0


@dataclass
class _Source:
    paths: list[str]  # (M,) stored path of each candidate, in listing order
    labels: list[int] | None  # (M,) or None if unlabeled
    classes: tuple[str, ...] | None
    skipped: list[dict]  # non-image files met while listing
    encode: Callable[[int, int, int], _Encoded]  # (position, short side, quality) -> checked bytes


def _resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(w, h) with the shorter side `short`, the longer int(short * long / short_side), as
    torchvision's Resize(short) computes it."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def _shrink(img: Image.Image, short: int, quality: int) -> _Encoded:
    """Decode (a JPEG at reduced size down to 2x the target, like Image.thumbnail), resize with
    bicubic antialiasing to the shorter side `short`, encode as JPEG (mode L or RGB)."""
    width, height = img.size
    nw, nh = _resized_size(width, height, short)
    img.draft(img.mode, (2 * nw, 2 * nh))
    img.load()
    mode = "L" if img.mode in _GRAY_MODES or img.mode == "LA" else "RGB"
    small = img.convert(mode).resize((nw, nh), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    return _Encoded(buf.getvalue(), "jpg", nh, nw, 1 if mode == "L" else 3, height, width)


def _encode_bytes(data: bytes, short: int = 0, quality: int = DEFAULT_QUALITY) -> _Encoded:
    """Fully decode `data`; keep JPEG/PNG/WEBP bytes as is, re-encode others to PNG; an image
    whose shorter side exceeds `short` > 0 is resized (`_shrink`)."""
    with Image.open(io.BytesIO(data)) as img:
        if short > 0 and min(img.size) > short:
            return _shrink(img, short, quality)
        img.load()
        width, height = img.size
        if img.format in _KEEP:
            channels = {"P": 3, "PA": 4}.get(img.mode, len(img.getbands()))
            return _Encoded(data, _KEEP[img.format], height, width, channels)
        mode = "L" if img.mode in _GRAY_MODES else "RGB"
        return _Encoded(_png(img.convert(mode)), "png", height, width, 1 if mode == "L" else 3)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _visible(entries: list[os.DirEntry]) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _list_files(folder: Path) -> list[Path]:
    """Non-hidden files under `folder`, recursively, in sorted order."""
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


def _folder_source(src: Path) -> _Source:
    with os.scandir(src) as it:
        entries = _visible(list(it))
    dirs = [Path(e.path) for e in entries if e.is_dir()]
    files = [Path(e.path) for e in entries if e.is_file()]
    listed = {d: _list_files(d) for d in dirs}
    labeled = any(_is_image(f) for fs in listed.values() for f in fs)
    skipped: list[dict] = []
    rel: list[Path] = []
    labels: list[int] | None = None
    classes: tuple[str, ...] | None = None
    if labeled:
        if any(_is_image(f) for f in files):
            raise InputError(
                f"{src}: mixes images and class sub-folders; use either an ImageFolder layout "
                "(images only inside class folders) or a flat folder of images"
            )
        classes, labels = tuple(d.name for d in dirs), []
        skipped += [{"path": f.name, "error": "non-image file"} for f in files]
        for label, d in enumerate(dirs):
            if not any(_is_image(f) for f in listed[d]):
                raise InputError(f"{d}: class folder has no image files")
            for f in listed[d]:
                if _is_image(f):
                    rel.append(f.relative_to(src))
                    labels.append(label)
                else:
                    skipped.append(
                        {"path": f.relative_to(src).as_posix(), "error": "non-image file"}
                    )
    else:
        for f in files:
            if _is_image(f):
                rel.append(f.relative_to(src))
            else:
                skipped.append({"path": f.name, "error": "non-image file"})
    if not rel:
        raise InputError(f"{src}: no image files found ({', '.join(sorted(IMAGE_EXTS))})")

    def encode(i: int, short: int, quality: int) -> _Encoded:
        return _encode_bytes((src / rel[i]).read_bytes(), short, quality)

    return _Source([p.as_posix() for p in rel], labels, classes, skipped, encode)


def _npz_source(src: Path, split: str) -> _Source:
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

    def encode(i: int, short: int, quality: int) -> _Encoded:
        a = images[i]
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        h, w = a.shape[:2]
        img = Image.fromarray(np.ascontiguousarray(a))  # (H, W) -> L, (H, W, 3) -> RGB
        if short > 0 and min(h, w) > short:
            return _shrink(img, short, quality)
        data = _png(img)
        return _Encoded(data, "png", h, w, 1 if a.ndim == 2 else 3)

    return _Source([f"npz:{tag}:{i}" for i in range(n)], label_list, classes, [], encode)


def _open_source(src: Path, split: str) -> _Source:
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    if src.is_dir():
        return _folder_source(src)
    if src.suffix.lower() == ".npz":
        return _npz_source(src, split)
    raise InputError(f"{src}: expected an image folder or an .npz file")


# ---------------------------------------------------------------------------- writing


class _HashingFile:
    """Write-through file wrapper that hashes and counts what passes."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.nbytes += len(b)
        return self.f.write(b)


class _ShardWriter:
    """Appends samples with consecutive indices; closes a shard every `shard_size` samples."""

    def __init__(self, out: Path, shard_size: int) -> None:
        self.out, self.size, self.n = out, shard_size, 0
        self.shards: list[ShardInfo] = []
        self._file: io.BufferedWriter | None = None
        self._hash: _HashingFile | None = None
        self._tar: tarfile.TarFile | None = None

    def _name(self) -> str:
        return f"shard-{len(self.shards):06d}.tar"

    def add(self, enc: _Encoded, label: int | None, path: str) -> None:
        if self._tar is None:
            self._file = open(self.out / (self._name() + ".tmp"), "wb")
            self._hash = _HashingFile(self._file)
            sink = cast("IO[bytes]", self._hash)
            self._tar = tarfile.open(fileobj=sink, mode="w|", format=tarfile.USTAR_FORMAT)
        key = f"{self.n:09d}"
        meta = {"index": self.n, "label": label, "path": path}
        self._member(f"{key}.{enc.ext}", enc.data)
        self._member(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        if label is not None:
            self._member(f"{key}.cls", str(label).encode())
        self.n += 1
        if self.n % self.size == 0:
            self.finish()

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    def finish(self) -> None:
        """Close the open shard (if any): fsync, rename into place, record it."""
        if self._tar is None or self._file is None or self._hash is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self._name()
        os.replace(self.out / (name + ".tmp"), self.out / name)
        start = len(self.shards) * self.size
        self.shards.append(
            ShardInfo(name, start, self.n, self._hash.sha.hexdigest(), self._hash.nbytes)
        )
        self._tar = self._file = self._hash = None

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            (self.out / (self._name() + ".tmp")).unlink(missing_ok=True)


def _is_shard_dir(out: Path) -> bool:
    """True if `out` holds an oocid manifest, or only oocid's own file names."""
    names = [p.name for p in out.iterdir()]
    if MANIFEST_NAME in names:
        try:
            return json.loads((out / MANIFEST_NAME).read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError, RecursionError):
            return False
    return all(_OWN_NAME.match(name) for name in names)


def _prepare_out(out: Path, src: Path) -> None:
    """Create `out`, or clear an earlier oocid shard dir there (manifest first)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not _is_shard_dir(out):
        raise InputError(f"{out}: not empty and not an oocid shard folder; refusing to overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        for p in sorted(out.iterdir()):
            if _OWN_NAME.match(p.name):
                p.unlink()
    except OSError as e:
        raise WriteError(f"{out}: cannot prepare output folder: {e}") from None


def _stats(encs: list[_Encoded], short: int, quality: int) -> dict:
    """{"height"/"width": {min, max, mean} as stored, "channels"/"formats": {value: count},
    "original": the sources' "height"/"width", "resize": {short_side, quality, resized}}."""

    def mmm(values: list[int]) -> dict:
        a = np.array(values)
        return {"min": int(a.min()), "max": int(a.max()), "mean": float(a.mean())}

    channels = Counter(str(e.channels) for e in encs)
    formats = Counter(e.ext for e in encs)
    resized = sum(1 for e in encs if e.orig_height)
    return {
        "height": mmm([e.height for e in encs]),
        "width": mmm([e.width for e in encs]),
        "channels": dict(sorted(channels.items())),
        "formats": dict(sorted(formats.items())),
        "original": {"height": mmm([e.orig_height or e.height for e in encs]),
                     "width": mmm([e.orig_width or e.width for e in encs])},
        "resize": {"short_side": short, "quality": quality, "resized": resized},
    }


def _shown(src: Path, path: str) -> str:
    """A stored source path as the user knows it."""
    return f"{src} ({path})" if path.startswith("npz:") else str(src / path)


def _warn(msg: str) -> None:
    tqdm.write(f"oocid: warning: {msg}", file=sys.stderr)


def write_shards(
    src: Path,
    out: Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    seed: int = 0,
    split: str = "train",
    progress: bool = True,
    short_side: int = DEFAULT_SHORT_SIDE,
    quality: int = DEFAULT_QUALITY,
) -> Manifest:
    """Shard `src` (folder or .npz) into `out`; return the manifest written last.

    `split` picks `{split}_images`/`{split}_labels` of an npz that has no `images` array.
    Images whose shorter side exceeds `short_side` are stored resized to it (JPEG `quality`);
    the others byte for byte; `short_side` 0 stores every image as given.
    """
    src, out = Path(src), Path(out)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise InputError(f"shard size must be a positive integer, got {shard_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(short_side, bool) or not isinstance(short_side, int) or short_side < 0:
        raise InputError(f"short side must be a non-negative integer (0: keep sizes), got {short_side!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise InputError(f"JPEG quality must be an integer in 1..100, got {quality!r}")
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise InputError(f"{out}: output folder must not be inside the source folder {src}")
    source = _open_source(src, split)
    skipped = list(source.skipped)
    for s in skipped:
        _warn(f"skipped {_shown(src, s['path'])}: {s['error']}")
    _prepare_out(out, src)

    writer = _ShardWriter(out, shard_size)
    sizes: list[_Encoded] = []
    order = np.random.default_rng(seed).permutation(len(source.paths))
    try:
        for j in tqdm(
            order.tolist(), desc="shard", unit="img", file=sys.stderr, disable=not progress
        ):
            path = source.paths[j]
            try:
                enc = source.encode(j, short_side, quality)
            except Exception as e:  # any decode failure: record, warn, go on
                reason = " ".join(str(e).split()) or type(e).__name__
                skipped.append({"path": path, "error": reason})
                _warn(f"skipped {_shown(src, path)}: {reason}")
                continue
            writer.add(enc, None if source.labels is None else source.labels[j], path)
            enc.data = b""  # written; keep only the sizes
            sizes.append(enc)
        writer.finish()
    except OSError as e:
        writer.abort()
        raise WriteError(f"{out}: writing shards failed: {e}") from None
    if skipped:
        _warn(
            f"skipped {len(skipped)} of {len(source.paths) + len(source.skipped)} inputs "
            f"(listed in {out / MANIFEST_NAME})"
        )
    if writer.n == 0:
        raise InputError(f"{src}: no readable images ({len(skipped)} skipped)")

    shards = tuple(writer.shards)
    manifest = Manifest(
        root=out,
        n=writer.n,
        shard_size=shard_size,
        shards=shards,
        classes=source.classes,
        image_stats=_stats(sizes, short_side, quality),
        source=str(src),
        seed=seed,
        skipped=tuple(skipped),
        identity=manifest_identity(writer.n, shard_size, shards),
    )
    _write_manifest(manifest)
    return manifest


def _write_manifest(m: Manifest) -> None:
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "n": m.n,
        "shard_size": m.shard_size,
        "shards": [vars(s) for s in m.shards],
        "classes": None if m.classes is None else list(m.classes),
        "image_stats": m.image_stats,
        "source": m.source,
        "seed": m.seed,
        "skipped": list(m.skipped),
        "identity": m.identity,
    }
    path, tmp = m.root / MANIFEST_NAME, m.root / (MANIFEST_NAME + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(m.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise WriteError(f"{path}: cannot write manifest: {e}") from None


# ---------------------------------------------------------------------------- reading


def _get(obj: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise DataError(f"{where}: missing key '{key}'")
    v = obj[key]
    if (isinstance(v, bool) and kind is not bool) or not isinstance(v, kind):
        raise DataError(f"{where}: '{key}' has the wrong type ({type(v).__name__})")
    return v


def _check_stats(stats: Any, where: str) -> dict:
    """The manifest's image statistics, as `_stats` writes them; DataError otherwise."""
    def count(v: Any) -> bool:
        return type(v) is int and v >= 0

    def mmm(d: Any) -> bool:
        return (isinstance(d, dict) and set(d) == {"min", "max", "mean"}
                and type(d["min"]) is int and type(d["max"]) is int and 1 <= d["min"] <= d["max"]
                and type(d["mean"]) in (int, float) and d["min"] <= d["mean"] <= d["max"])

    def resize(d: Any) -> bool:  # written since the resize option; absent from older manifests
        return (isinstance(d, dict) and set(d) == {"short_side", "quality", "resized"}
                and all(map(count, d.values())))

    def original(d: Any) -> bool:
        return isinstance(d, dict) and set(d) == {"height", "width"} and all(map(mmm, d.values()))

    base = {"height", "width", "channels", "formats"}
    ok = (isinstance(stats, dict) and set(stats) in (base, base | {"original", "resize"})
          and mmm(stats["height"]) and mmm(stats["width"])
          and all(isinstance(stats[k], dict) and all(map(count, stats[k].values()))
                  for k in ("channels", "formats"))
          and (len(stats) == 4 or (original(stats["original"]) and resize(stats["resize"]))))
    if not ok:
        raise DataError(f"{where}: 'image_stats' must hold height and width {{min, max, mean}} "
                        "and channels and formats counts (and optionally original sizes and "
                        "the resize option)")
    return stats


def _parse(obj: Any, root: Path, where: str) -> Manifest:
    """Validate the decoded JSON of a manifest; raises DataError on any bad content."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: not a JSON object")
    keys = {"format", "version", "n", "shard_size", "shards", "classes", "image_stats",
            "source", "seed", "skipped", "identity"}  # fmt: skip
    if unknown := sorted(set(obj) - keys):
        raise DataError(f"{where}: unknown keys {unknown}")
    if _get(obj, "format", str, where) != FORMAT or _get(obj, "version", int, where) != VERSION:
        raise DataError(f"{where}: not an {FORMAT} v{VERSION} manifest")
    n, size = _get(obj, "n", int, where), _get(obj, "shard_size", int, where)
    if n < 1 or size < 1:
        raise DataError(f"{where}: n and shard_size must be >= 1")
    raw = _get(obj, "shards", list, where)
    if len(raw) != math.ceil(n / size):
        raise DataError(f"{where}: {len(raw)} shards listed, {math.ceil(n / size)} expected")
    shards = []
    for s, d in enumerate(raw):
        w = f"{where}: shards[{s}]"
        if not isinstance(d, dict) or set(d) != {"name", "start", "stop", "sha256", "nbytes"}:
            raise DataError(f"{w}: expected keys name, start, stop, sha256, nbytes")
        fields = (("name", str), ("start", int), ("stop", int), ("sha256", str), ("nbytes", int))
        info = ShardInfo(*(_get(d, k, t, w) for k, t in fields))
        if (info.start, info.stop) != (s * size, min((s + 1) * size, n)):
            raise DataError(f"{w}: range [{info.start}, {info.stop}) breaks contiguity")
        if not _SHARD_NAME.match(info.name) or not _HEX64.match(info.sha256) or info.nbytes < 0:
            raise DataError(f"{w}: bad name, sha256 or nbytes")
        shards.append(info)
    classes = _get(obj, "classes", (list, type(None)), where)
    if classes is not None and (
        not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes)
    ):
        raise DataError(f"{where}: 'classes' must be null or a non-empty list of strings")
    skipped = _get(obj, "skipped", list, where)
    if not all(isinstance(s, dict) and isinstance(s.get("path"), str) for s in skipped):
        raise DataError(f"{where}: 'skipped' entries must be objects with a 'path'")
    m = Manifest(
        root=root,
        n=n,
        shard_size=size,
        shards=tuple(shards),
        classes=None if classes is None else tuple(classes),
        image_stats=_check_stats(_get(obj, "image_stats", dict, where), where),
        source=_get(obj, "source", str, where),
        seed=_get(obj, "seed", int, where),
        skipped=tuple(skipped),
        identity=_get(obj, "identity", str, where),
    )
    if m.identity != manifest_identity(n, size, m.shards):
        raise DataError(f"{where}: identity does not match the shard list (edited manifest?)")
    return m


def read_manifest(shard_dir: Path) -> Manifest:
    """Load and validate `shard_dir/manifest.json`; check every shard file is there."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST_NAME
    if not shard_dir.is_dir():
        raise InputError(f"{shard_dir}: no such shard folder")
    if not path.is_file():
        raise InputError(f"{path}: missing; not an oocid shard folder (run `oocid shard`)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"{path}: unreadable or invalid JSON: {e}") from None
    m = _parse(obj, shard_dir, str(path))
    for info, p in zip(m.shards, m.shard_paths(), strict=True):
        if not p.is_file():
            raise DataError(f"{p}: shard listed in {path} is missing")
        if p.stat().st_size != info.nbytes:
            raise DataError(f"{p}: size {p.stat().st_size} B, manifest says {info.nbytes} B")
    return m


def verify_shards(manifest: Manifest) -> None:
    """Recompute each shard's sha256; DataError naming the first missing or changed shard."""
    for info, p in zip(manifest.shards, manifest.shard_paths(), strict=True):
        h = hashlib.sha256()
        try:
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        except OSError as e:
            raise DataError(f"{p}: cannot read shard: {e}") from None
        if h.hexdigest() != info.sha256:
            raise DataError(f"{p}: sha256 differs from the manifest (corrupt or replaced shard)")


def _sample(shard: Path, key: str, members: dict[str, bytes]) -> RawSample:
    """Build a RawSample from the members of one key; DataError naming shard + key."""
    where = f"{shard}: sample {key}"
    images = [e for e in members if e in _STORED_EXTS or e == "jpeg"]
    if len(images) != 1 or "json" not in members:
        raise DataError(f"{where}: expected one image and one json member, got {sorted(members)}")
    try:
        meta = json.loads(members["json"])
        index, label, path = meta["index"], meta["label"], meta["path"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else f"{type(e).__name__} {e}"
        raise DataError(f"{where}: bad json member: {why}") from None
    ok = isinstance(index, int) and isinstance(path, str)
    if not ok or isinstance(index, bool) or not (label is None or type(label) is int):
        raise DataError(f"{where}: bad json member types")
    if "cls" in members and members["cls"].strip() != str(label).encode():
        raise DataError(f"{where}: cls member disagrees with json label")
    return RawSample(key, index, label, members[images[0]], images[0], path)


def iter_samples(path: Path, span: tuple[int, int] | None = None) -> Iterator[RawSample]:
    """Stream the raw samples of one tar shard, in order; DataError if it is corrupt.

    With `span`, the manifest's [start, stop) of this shard, the samples must carry exactly the
    indices start, start+1, ..., stop-1 (as `write_shards` writes them): a DataError otherwise,
    so an index that does not match the manifest never reaches the bank."""
    n = 0
    for s in _iter_raw(Path(path)):
        if span is not None and s.index != span[0] + n:
            raise DataError(f"{path}: sample {s.key} has index {s.index} where the manifest's "
                            f"range [{span[0]}, {span[1]}) expects {span[0] + n}")
        n += 1
        yield s
    if span is not None and n != span[1] - span[0]:
        raise DataError(f"{path}: holds {n} samples, the manifest lists {span[1] - span[0]}")


def _iter_raw(path: Path) -> Iterator[RawSample]:
    """The samples of one shard: `_iter_ustar`, and tarfile for shards it does not read."""
    n = 0
    try:
        for s in _iter_ustar(path):
            n += 1
            yield s
        return
    except _NotPlainUstar:
        pass
    for k, s in enumerate(_iter_tarfile(path)):  # the same grouping: skip what was yielded
        if k >= n:
            yield s


class _NotPlainUstar(Exception):
    """A member `_iter_ustar` leaves to tarfile (pax or GNU headers, links, base-256 sizes)."""


_BLOCK = 512
_NUL_BLOCK = bytes(_BLOCK)
_HEADER_SIGNED = struct.Struct("148b8x356b")  # the header's bytes as signed, but the checksum
# mode, uid, gid, mtime, devmajor, devminor: numbers tarfile checks (size and checksum apart)
_NUMERIC_FIELDS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))


def _nts(b: bytes) -> str:
    """tarfile's nts: up to the first NUL, decoded as tarfile decodes names."""
    return b.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _octal(b: bytes) -> int:
    if b[:1] in (b"\x80", b"\xff"):  # base-256 (sizes over 8 GB)
        raise _NotPlainUstar
    return int(b.split(b"\0", 1)[0].strip() or b"0", 8)


def _group(path: Path, members: Iterator[tuple[str, bytes]]) -> Iterator[RawSample]:
    """Consecutive members whose names share a key (the name up to the first dot of its last
    part) make one sample."""
    key, got = None, {}
    for name, data in members:
        head, _, base = name.rpartition("/")
        stem, _, ext = base.partition(".")
        k = f"{head}/{stem}" if head else stem
        if k != key and key is not None:
            yield _sample(path, key, got)
            got = {}
        key = k
        got[ext.lower()] = data
    if key is not None:
        yield _sample(path, key, got)


def _iter_ustar(path: Path) -> Iterator[RawSample]:
    return _group(path, _ustar_members(path))


def _iter_tarfile(path: Path) -> Iterator[RawSample]:
    return _group(path, _tarfile_members(path))


def _ustar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """The (name, data) of each file of a plain ustar shard (what `write_shards` writes), read
    with one buffered read per header and per member instead of tarfile's TarInfo machinery:
    ~10x less time per sample, which at 32 px is as much as decoding the image. Names, the
    header's numeric fields and checksum, directories and where the archive ends follow
    tarfile's rules; a member type it does not handle raises _NotPlainUstar before that member
    is yielded."""
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            file_size = os.fstat(f.fileno()).st_size
            offset = 0
            while True:
                hdr = f.read(_BLOCK)
                if hdr == _NUL_BLOCK:  # end-of-archive marker
                    break
                if len(hdr) < _BLOCK:
                    what = ("empty file" if not hdr and offset == 0 else
                            f"no end-of-archive marker at byte {offset}" if not hdr else
                            f"header cut short at byte {offset}")
                    raise DataError(f"{path}: truncated tar ({what})")
                try:
                    chksum = _octal(hdr[148:156])
                    size = _octal(hdr[124:136])
                    for a, b in _NUMERIC_FIELDS:  # tarfile rejects the header if one is not a number
                        _octal(hdr[a:b])
                except ValueError:
                    raise DataError(f"{path}: corrupt tar header at byte {offset}") from None
                if chksum != 256 + sum(hdr) - sum(hdr[148:156]) and \
                        chksum != 256 + sum(_HEADER_SIGNED.unpack(hdr)):  # as tarfile: either
                    raise DataError(f"{path}: corrupt tar header at byte {offset} (bad checksum)")
                kind = hdr[156:157]
                if kind not in (b"0", b"\0", b"5"):
                    raise _NotPlainUstar
                name, prefix = _nts(hdr[0:100]), _nts(hdr[345:500])
                if prefix:
                    name = prefix + "/" + name
                if size < 0:
                    raise DataError(f"{path}: corrupt tar header at byte {offset} (size {size})")
                offset += _BLOCK
                if kind == b"5" or (kind == b"\0" and name.endswith("/")):  # a directory: no data
                    continue
                if offset + size > file_size:  # before reading: a size field can claim GBs
                    raise DataError(f"{path}: truncated tar (member {name} ends early)")
                data = f.read(size)
                if len(data) < size:
                    raise DataError(f"{path}: truncated tar (member {name} ends early)")
                pad = -size % _BLOCK
                if pad and len(f.read(pad)) < pad:
                    raise DataError(f"{path}: truncated tar (no end-of-archive marker)")
                offset += size + pad
                yield name, data
    except OSError as e:
        raise DataError(f"{path}: cannot read shard: {e}") from None


def _tarfile_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """The (name, data) of each file member, read by tarfile (any tar format)."""
    try:
        with open(path, "rb") as f:
            tar = tarfile.open(fileobj=f, mode="r|")
            files = 0
            for info in tar:
                if not info.isfile():
                    continue
                data = tar.extractfile(info)
                files += 1
                yield info.name, data.read() if data else b""
            if files:  # tarfile stops at a bad header as at the end: the marker must be there
                f.seek(tar.offset)
                if f.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                    raise DataError(f"{path}: truncated tar (no end-of-archive marker)")
    except (tarfile.TarError, EOFError) as e:
        raise DataError(f"{path}: corrupt or truncated tar: {e}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read shard: {e}") from None
