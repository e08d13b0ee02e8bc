"""Reading a tar shard back: its samples, in order, undecoded.

`iter_samples` yields one `RawSample` per key (the image, its index, label and source path),
reading the shard with the fast plain-ustar reader (`oocid.data.ustar`) and falling back to
tarfile for a shard written otherwise (pax or GNU headers, links). Any corrupt or truncated
shard, or a sample whose index does not match the manifest, is a DataError naming the shard.
"Truncated" is said only where the file ends early; bytes changed inside a shard are "damaged",
with a pointer to `--verify-checksums` (the manifest's sha256 of each shard, `verify_shards`).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from oocid.data.manifest import STORED_EXTS
from oocid.data.ustar import HINT, NotPlainUstar, ustar_members
from oocid.errors import DataError


@dataclass(frozen=True)
class RawSample:
    """One undecoded sample of a shard; `path` is the source path ("npz:train:123" for npz)."""

    key: str
    index: int
    label: int | None
    image: bytes
    ext: str
    path: str


def _sample(shard: Path, key: str, members: dict[str, bytes]) -> RawSample:
    """Build a RawSample from the members of one key; DataError naming shard + key."""
    where = f"{shard}: sample {key}"
    images = [e for e in members if e in STORED_EXTS or e == "jpeg"]
    if len(images) != 1 or "json" not in members:
        raise DataError(f"{where}: expected one image and one json member, got "
                        f"{sorted(members)}{HINT}")
    try:
        meta = json.loads(members["json"])
        index, label, path = meta["index"], meta["label"], meta["path"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else f"{type(e).__name__} {e}"
        raise DataError(f"{where}: bad json member: {why}{HINT}") from None
    ok = isinstance(index, int) and isinstance(path, str)
    if not ok or isinstance(index, bool) or not (label is None or type(label) is int):
        raise DataError(f"{where}: bad json member types{HINT}")
    if "cls" in members and members["cls"].strip() != str(label).encode():
        raise DataError(f"{where}: cls member disagrees with json label{HINT}")
    return RawSample(key, index, label, members[images[0]], images[0], path)


def iter_samples(path: Path, span: tuple[int, int] | None = None, shift: int = 0
                 ) -> Iterator[RawSample]:
    """Stream the raw samples of one tar shard, in order; DataError if it is corrupt.

    With `span`, the manifest's [start, stop) of this shard, the samples must carry exactly the
    indices start, start+1, ..., stop-1 (as `write_shards` writes them): a DataError otherwise,
    so an index that does not match the manifest never reaches the bank. A `shift` (a rank's
    share of the shards, `Manifest.shifts`) is subtracted from the stored index first."""
    n = 0
    for s in _iter_raw(Path(path)):
        if shift:
            s = replace(s, index=s.index - shift)
        if span is not None and s.index != span[0] + n:
            raise DataError(f"{path}: sample {s.key} has index {s.index + shift} where the "
                            f"manifest's range [{span[0] + shift}, {span[1] + shift}) expects "
                            f"{span[0] + n + shift}{HINT}")
        n += 1
        yield s
    if span is not None and n != span[1] - span[0]:
        raise DataError(f"{path}: holds {n} samples, the manifest lists {span[1] - span[0]}"
                        f"{HINT}")


def _iter_raw(path: Path) -> Iterator[RawSample]:
    """The samples of one shard: `_iter_ustar`, and tarfile for shards it does not read."""
    n = 0
    try:
        for s in _iter_ustar(path):
            n += 1
            yield s
        return
    except NotPlainUstar:
        pass
    for k, s in enumerate(_iter_tarfile(path)):  # the same grouping: skip what was yielded
        if k >= n:
            yield s


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
    return _group(path, ustar_members(path))


def _iter_tarfile(path: Path) -> Iterator[RawSample]:
    return _group(path, _tarfile_members(path))


def _tarfile_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """The (name, data) of each file member, read by tarfile (any tar format)."""
    try:
        with open(path, "rb") as f:
            tar = tarfile.open(fileobj=f, mode="r|")
            files, last = 0, ""
            for info in tar:
                if not info.isfile():
                    continue
                data = tar.extractfile(info)
                files, last = files + 1, info.name
                yield info.name, data.read() if data else b""
            if files:  # tarfile stops at a bad header as at the end: the marker must be there
                f.seek(tar.offset)
                block = f.read(tarfile.BLOCKSIZE)
                if len(block) < tarfile.BLOCKSIZE:
                    raise DataError(f"{path}: truncated tar (no end-of-archive marker)")
                if block != tarfile.NUL * tarfile.BLOCKSIZE:
                    raise DataError(f"{path}: damaged tar: bad header at byte {tar.offset} "
                                    f"(after member {last}){HINT}")
    except EOFError:
        raise DataError(f"{path}: truncated tar (it ends inside a member)") from None
    except tarfile.TarError as e:
        if any(w in str(e) for w in ("end of data", "truncated header", "empty file")):
            raise DataError(f"{path}: truncated tar ({e})") from None
        raise DataError(f"{path}: damaged tar: {e}{HINT}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read shard: {e}") from None
