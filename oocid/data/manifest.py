"""A shard folder's `manifest.json`: what it records, reading and checking it, writing it.

The manifest lists the shards (`shard-NNNNNN.tar`, each with its global index range
[start, stop), sha256 and size), the class names of a labeled set, statistics of the stored
images (`image_stats`), the source and seed the shards were written from, the inputs skipped,
and an `identity`: a hash over the shard list that a bank stores to check that it belongs to
these shards. `write_shards` (`oocid.data.writer`) writes it last, atomically; `read_manifest`
refuses any manifest that is malformed or does not match the files beside it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from oocid.atomic import atomic_write
from oocid.errors import DataError, InputError
from oocid.progress import progress_bar

MANIFEST_NAME = "manifest.json"
FORMAT = "oocid-shards"
VERSION = 1
# The file names `oocid shard` and a `knn --query` folder take as images (JPEG's .jfif and .jpe,
# and the Netpbm family, which Pillow reads, included); every other file is skipped by its name.
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif",
                        ".tiff", ".pbm", ".pgm", ".ppm", ".pnm"})
STORED_EXTS = frozenset({"jpg", "png", "webp"})  # the image members a shard holds
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
    # A rank's share of a set (oocid.distributed.partition): each shard's global start, its samples
    # renumbered from 0 here (`shifts`). Empty for a whole set; never written to disk.
    origin: tuple[int, ...] = ()

    @property
    def labeled(self) -> bool:
        return self.classes is not None

    def shard_paths(self) -> list[Path]:
        return [self.root / s.name for s in self.shards]

    @property
    def spans(self) -> dict[str, tuple[int, int]]:
        """Shard file name -> its [start, stop) indices (the `span` of `iter_samples`)."""
        return {s.name: (s.start, s.stop) for s in self.shards}

    @property
    def shifts(self) -> dict[str, int]:
        """Shard file name -> what to subtract from its stored indices (`iter_samples`)."""
        if not self.origin:
            return dict.fromkeys((s.name for s in self.shards), 0)
        return {s.name: o - s.start for s, o in zip(self.shards, self.origin, strict=True)}


def manifest_identity(n: int, shard_size: int, shards: tuple[ShardInfo, ...]) -> str:
    """sha256 hex over n, S and each shard's name and sha256: what banks store to match."""
    h = hashlib.sha256(f"{FORMAT}/{VERSION}\n{n}\n{shard_size}\n".encode())
    for s in shards:
        h.update(f"{s.name}\t{s.sha256}\n".encode())
    return h.hexdigest()


def write_manifest(m: Manifest) -> None:
    """Write `m` to `m.root/manifest.json` all or nothing; WriteError on failure."""
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
    atomic_write(m.root / MANIFEST_NAME, json.dumps(obj, indent=1) + "\n", "manifest")


def _get(obj: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise DataError(f"{where}: missing key '{key}'")
    v = obj[key]
    if (isinstance(v, bool) and kind is not bool) or not isinstance(v, kind):
        raise DataError(f"{where}: '{key}' has the wrong type ({type(v).__name__})")
    return v


def _check_stats(stats: Any, where: str) -> dict:
    """The manifest's image statistics, as `write_shards` records them; DataError otherwise."""
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
    sized = base | {"original", "resize"}  # "high_depth": written since 16-bit images are scaled
    ok = (isinstance(stats, dict) and set(stats) in (base, sized, sized | {"high_depth"})
          and mmm(stats["height"]) and mmm(stats["width"])
          and all(isinstance(stats[k], dict) and all(map(count, stats[k].values()))
                  for k in ("channels", "formats"))
          and (len(stats) == 4 or (original(stats["original"]) and resize(stats["resize"])))
          and count(stats.get("high_depth", 0)))
    if not ok:
        raise DataError(f"{where}: 'image_stats' must hold height and width {{min, max, mean}} "
                        "and channels and formats counts (and optionally original sizes, "
                        "the resize option and the count of 16-bit or float images)")
    return cast(dict, stats)


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
    if shard_dir.exists() and not shard_dir.is_dir():
        raise InputError(f"{shard_dir}: is a file, not a shard folder (give the folder "
                         "`oocid shard` wrote)")
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


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)  # releases the GIL: shards hash in parallel threads
    return h.hexdigest()


def verify_shards(manifest: Manifest, *, progress: bool = False) -> None:
    """Recompute each shard's sha256 and compare it with the manifest's (`--verify-checksums`);
    DataError naming the first shard, in order, that cannot be read or has changed since
    `oocid shard` wrote it. Up to 8 shards are hashed at a time (one per CPU)."""
    pairs = list(zip(manifest.shards, manifest.shard_paths(), strict=True))
    pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1, len(pairs))))
    try:
        futures = [pool.submit(_sha256_of, p) for _, p in pairs]
        with progress_bar(len(pairs), "verify", "shard", enabled=progress, leave=False) as bar:
            for (info, p), future in zip(pairs, futures, strict=True):
                try:
                    digest = future.result()
                except OSError as e:
                    raise DataError(f"{p}: cannot read shard: {e}") from None
                if digest != info.sha256:
                    raise DataError(f"{p}: sha256 does not match the manifest (the shard changed "
                                    "after `oocid shard`)")
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def verify_shard_dirs(dirs: list[Path | None], progress: bool = False) -> None:
    """`verify_shards` of each shard folder given (None: skipped), reading its manifest."""
    for d in dirs:
        if d is not None:
            verify_shards(read_manifest(d), progress=progress)
