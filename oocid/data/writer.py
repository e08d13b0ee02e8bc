"""Images -> WebDataset tar shards + `manifest.json` (`write_shards`, `oocid shard`).

The source's samples (`oocid.data.sources`) are shuffled once with
`numpy.random.default_rng(seed)` and numbered 0..N-1 in that order; shard s holds the
contiguous indices [s*S, min((s+1)*S, N)). Per sample, with key = f"{index:09d}":

    {key}.{png|jpg|webp}  image bytes (JPEG/PNG/WEBP as given, other formats re-encoded to PNG;
                          with `short_side` N > 0 (default 256), an image whose shorter side
                          exceeds N is stored resized to N on that side, aspect kept, as JPEG)
    {key}.json            {"index": i, "label": y or null, "path": source path}
    {key}.cls             label as ASCII digits (labeled sources only)

Tars are byte-deterministic (mtime 0, uid/gid 0, mode 0o644): the same source and seed give
the same shards and the same manifest identity. Each shard is written to a temp name and
renamed (`oocid.atomic`); manifest.json is written last, atomically. Unreadable inputs and
files without an image extension are skipped, reported on stderr and listed in the manifest;
they take no index. Images with 16-bit or float pixels are counted (image_stats "high_depth")
and named in one warning: the readers scale them to 8 bits (`oocid.data.decode.to_8bit`).

Storing images at a training size is the usual practice (FFCV and others write resized
ImageNet): RandomResizedCrop(224) and Resize(256) + CenterCrop(224) need no more than a 256 px
shorter side, and a smaller JPEG decodes faster (docs/benchmarks.md, "Decoding"). The
manifest's image_stats record the option ("resize") and the original sizes ("original").
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import tarfile
import warnings
from collections import Counter
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import numpy as np
from PIL import Image
from tqdm import tqdm

from oocid.atomic import AtomicFile, write_error
from oocid.data.manifest import FORMAT, MANIFEST_NAME, Manifest, ShardInfo, manifest_identity, write_manifest
from oocid.data.sources import DEFAULT_QUALITY, DEFAULT_SHORT_SIDE, NOT_IMAGE, Encoded, open_source
from oocid.errors import InputError, WriteError, one_line
from oocid.progress import progress_bar

DEFAULT_SHARD_SIZE = 4096
_OWN_NAME = re.compile(r"^(manifest\.json(\.tmp)?|shard-[0-9]+\.tar(\.tmp)?)$")


class _HashingFile:
    """Write-through file wrapper that hashes and counts what passes."""

    def __init__(self, f: BinaryIO) -> None:
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
        self._file: AtomicFile | None = None
        self._hash: _HashingFile | None = None
        self._tar: tarfile.TarFile | None = None

    def path(self) -> Path:
        """The shard being written (or the next one)."""
        return self.out / f"shard-{len(self.shards):06d}.tar"

    def add(self, enc: Encoded, label: int | None, path: str) -> None:
        if self._tar is None:
            self._file = AtomicFile(self.path(), "shard")
            self._hash = _HashingFile(self._file.file)
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
        self._file.commit()
        start = len(self.shards) * self.size
        self.shards.append(
            ShardInfo(self.path().name, start, self.n, self._hash.sha.hexdigest(), self._hash.nbytes)
        )
        self._tar = self._file = self._hash = None

    def abort(self) -> None:
        if self._tar is not None:  # its stream would flush into the aborted file when collected
            tar: Any = self._tar  # tarfile's _Stream and TarFile both skip their flush
            tar.fileobj.closed = tar.closed = True  # once closed
            self._tar = None
        if self._file is not None:
            self._file.abort()


def _is_shard_dir(out: Path) -> bool:
    """True if `out` holds an oocid manifest, or only oocid's own file names."""
    names = [p.name for p in out.iterdir()]
    if MANIFEST_NAME in names:
        try:
            return bool(json.loads((out / MANIFEST_NAME).read_text()).get("format") == FORMAT)
        except (OSError, ValueError, AttributeError, RecursionError):
            return False
    return all(_OWN_NAME.match(name) for name in names)


def _check_out(out: Path, force: bool) -> None:
    """Refuse an `out` that `_prepare_out` may not create or clear (InputError)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not _is_shard_dir(out):
        raise InputError(f"{out}: not empty and not an oocid shard folder; refusing to overwrite")
    own = [p.name for p in out.iterdir() if _OWN_NAME.match(p.name)] if out.is_dir() else []
    if not force and MANIFEST_NAME in own:
        raise InputError(f"{out}: already holds shards; pass --force to replace them")
    if own and MANIFEST_NAME not in own:  # shards without the manifest, which is written last
        _warn(f"{out}: holds shards but no {MANIFEST_NAME} (an unfinished `oocid shard`, "
              "killed); replacing them")


def _prepare_out(out: Path) -> None:
    """Create `out`, or clear an earlier oocid shard dir there (manifest first); called once
    the first image has been read, so a source with none leaves `out` as it was."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        for p in sorted(out.iterdir()):
            if _OWN_NAME.match(p.name):
                p.unlink()
    except OSError as e:
        raise WriteError(f"{out}: cannot prepare output folder: {e}") from None


def _undo(writer: _ShardWriter, out: Path, prepared: bool, created: bool) -> str:
    """Ctrl-C before the manifest: remove what this call wrote (the shard being written, the
    shards finished, the folder if this call made it and it is empty), nothing else; returns
    the line that says so. A manifest in place means the set was complete: it is kept."""
    writing = writer.n % writer.size != 0  # a shard was open (its temporary file goes now)
    writer.abort()
    if not prepared:
        return f"interrupted; nothing written to {out}"
    if (out / MANIFEST_NAME).is_file():
        return f"interrupted after {out} was complete; its shards and {MANIFEST_NAME} are kept"
    try:
        for info in writer.shards:
            (out / info.name).unlink(missing_ok=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    except OSError as e:
        return f"interrupted; could not remove the partial shards in {out} ({e})"
    k = len(writer.shards)
    done = f"the {k} shard{'s' if k != 1 else ''}" if k else "the shard"
    return (f"interrupted; removed {done} this run had written to {out}"
            f"{' and the one it was writing' if k and writing else ''}, and nothing else (run "
            "the same command again)")


def _stats(encs: list[Encoded], short: int, quality: int) -> dict:
    """{"height"/"width": {min, max, mean} as stored, "channels"/"formats": {value: count},
    "original": the sources' "height"/"width", "resize": {short_side, quality, resized}}."""

    def mmm(values: list[int]) -> dict:
        a = np.array(values)
        return {"min": int(a.min()), "max": int(a.max()), "mean": float(a.mean())}

    channels = Counter(str(e.channels) for e in encs)
    deep = sum(1 for e in encs if e.high_depth)
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
        "high_depth": deep,
    }


def _count(k: int, one: str, many: str) -> str:
    return f"{k} {one if k == 1 else many}"


def skip_counts(skipped: tuple[dict, ...] | list[dict]) -> str:
    """"N unreadable[, M without an image extension]": the skipped inputs by kind."""
    names = sum(1 for s in skipped  # "non-image file": the same reason in older manifests
                if s.get("error") in (NOT_IMAGE, "non-image file"))
    bad = len(skipped) - names
    return f"{bad} unreadable" + (f", {names} without an image extension" if names else "")


def shard_summary(m: Manifest, out: Path) -> str:
    """The line `oocid shard` ends with."""
    cls = f", {_count(len(m.classes), 'class', 'classes')}" if m.classes else ", unlabeled"
    return (f"wrote {_count(m.n, 'sample', 'samples')} in {_count(len(m.shards), 'shard', 'shards')}"
            f" to {out}{cls}; skipped {skip_counts(m.skipped)}")


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
    force: bool = True,
) -> Manifest:
    """Shard `src` (folder or .npz) into `out`; return the manifest written last.

    `split` picks `{split}_images`/`{split}_labels` of an npz that has no `images` array.
    Images whose shorter side exceeds `short_side` are stored resized to it (JPEG `quality`);
    the others byte for byte; `short_side` 0 stores every image as given. An earlier shard set
    in `out` is replaced when `force` (the library's default), an InputError otherwise (the
    default of `oocid shard`, which has --force).
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
    source = open_source(src, split)
    skipped = list(source.skipped)
    for s in skipped:
        _warn(f"skipped {_shown(src, s['path'])}: {s['error']}")
    for note in source.notes:
        _warn(note)
    _check_out(out, force)

    writer = _ShardWriter(out, shard_size)
    created = prepared = False
    sizes: list[Encoded] = []
    order = np.random.default_rng(seed).permutation(len(source.paths))
    try:
        bar = progress_bar(len(order), "shard", "img", enabled=progress)
        for j in order.tolist():
            bar.update(1)
            path = source.paths[j]
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", Image.DecompressionBombWarning)
                    enc = source.encode(j, short_side, quality)
                for w in caught:  # Pillow's warning names no file: say which, in one line
                    _warn(f"{_shown(src, path)}: {' '.join(str(w.message).split())}")
            except Exception as e:  # any decode failure: record, warn, go on
                reason = one_line(e)
                if isinstance(e, Image.DecompressionBombError):
                    reason += " (Pillow's limit; make the image smaller first)"
                skipped.append({"path": path, "error": reason})
                _warn(f"skipped {_shown(src, path)}: {reason}")
                continue
            if writer.n == 0:
                created = not out.exists()
                _prepare_out(out)
                prepared = True
            writer.add(enc, None if source.labels is None else source.labels[j], path)
            enc.data = b""  # written; keep only the sizes
            sizes.append(enc)
        writer.finish()
        bar.close()
    except OSError as e:
        writer.abort()
        if writer.n <= shard_size and created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # made here and still empty: leave nothing behind
        raise write_error(writer.path(), "shard", e) from None
    except KeyboardInterrupt:  # Ctrl-C: leave no partial set to block the same command
        raise KeyboardInterrupt(_undo(writer, out, prepared, created)) from None
    if writer.n == 0:  # nothing written, not even the folder: no manifest lists the skipped
        raise InputError(f"{src}: no readable images ({len(skipped)} skipped, each named "
                         f"above); nothing written to {out}")
    if skipped:  # the progress bar counted only the files with an image extension
        _warn(f"skipped {len(skipped)} of {len(source.paths) + len(source.skipped)} inputs: "
              f"{skip_counts(skipped)} (listed in {out / MANIFEST_NAME})")
    deep = sum(1 for e in sizes if e.high_depth)
    if deep:
        _warn(f"{_count(deep, 'image has', 'images have')} 16-bit or floating-point pixels; "
              "they are read as 8-bit (16-bit values / 257, floats in [0, 1] x 255, other "
              "floats clipped to 0..255)")
    try:
        return _write_manifest(src, out, source.classes, writer, skipped, sizes, short_side,
                               quality, seed)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_undo(writer, out, prepared, created)) from None


def _write_manifest(src: Path, out: Path, classes: tuple[str, ...] | None, writer: _ShardWriter,
                    skipped: list[dict[str, str]], sizes: list[Encoded], short_side: int,
                    quality: int, seed: int) -> Manifest:
    """manifest.json, the last file of a shard set: written once every shard is in place."""
    shard_size = writer.size
    shards = tuple(writer.shards)
    manifest = Manifest(
        root=out,
        n=writer.n,
        shard_size=shard_size,
        shards=shards,
        classes=classes,
        image_stats=_stats(sizes, short_side, quality),
        source=str(src),
        seed=seed,
        skipped=tuple(skipped),
        identity=manifest_identity(writer.n, shard_size, shards),
    )
    write_manifest(manifest)
    return manifest
