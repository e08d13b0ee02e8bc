"""A fast reader of plain ustar archives: the tars `write_shards` writes.

`ustar_members` reads one buffered header and one member at a time instead of going through
tarfile's TarInfo machinery: several times faster per sample (docs/benchmarks.md, "Input
pipeline"), which matters at small image sizes, where reading the tar would otherwise cost as
much as decoding the image. It follows tarfile's rules for names, the header's numeric fields
and checksum, directories and the end of the archive, and raises `NotPlainUstar` at a member
it does not handle (pax or GNU headers, links, base-256 sizes), so that the caller reads that
shard with tarfile instead.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

from oocid.errors import DataError

# Appended to the errors of a shard whose bytes are damaged (not cut short): the file may have
# its size in the manifest and still have changed since `oocid shard`.
HINT = "; run with --verify-checksums to check every shard against its manifest sha256"


class NotPlainUstar(Exception):
    """A member `ustar_members` leaves to tarfile (pax or GNU headers, links, base-256 sizes)."""


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
        raise NotPlainUstar
    return int(b.split(b"\0", 1)[0].strip() or b"0", 8)


def ustar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """The (name, data) of each file of a plain ustar shard (what `write_shards` writes), read
    with one buffered read per header and per member instead of tarfile's TarInfo machinery.
    Names, the header's numeric fields and checksum, directories and where the archive ends
    follow tarfile's rules; a member type it does not handle raises NotPlainUstar before that
    member is yielded."""
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            file_size = os.fstat(f.fileno()).st_size
            offset, last = 0, None  # `last`: the name of the member read before

            def damaged(why: str) -> DataError:
                where = f"after member {last}" if last else "the first member"
                return DataError(f"{path}: damaged tar: {why} at byte {offset} ({where}){HINT}")

            while True:
                hdr = f.read(_BLOCK)
                if hdr == _NUL_BLOCK:  # end-of-archive marker
                    break
                if len(hdr) < _BLOCK:
                    what = ("empty file" if not hdr and offset == 0 else
                            f"no end-of-archive marker at byte {offset}" if not hdr else
                            f"header cut short at byte {offset}")
                    raise DataError(f"{path}: truncated tar ({what})")
                try:  # the checksum first, as tarfile: damage is a bad header, not a format
                    chksum = _octal(hdr[148:156])
                except ValueError:
                    raise damaged("corrupt header") from None
                if chksum != 256 + sum(hdr) - sum(hdr[148:156]) and \
                        chksum != 256 + sum(_HEADER_SIGNED.unpack(hdr)):  # as tarfile: either
                    raise damaged("header with a bad checksum")
                try:
                    size = _octal(hdr[124:136])
                    for a, b in _NUMERIC_FIELDS:  # tarfile rejects the header if one is not a number
                        _octal(hdr[a:b])
                except ValueError:
                    raise damaged("corrupt header") from None
                kind = hdr[156:157]
                if kind not in (b"0", b"\0", b"5"):
                    raise NotPlainUstar
                name, prefix = _nts(hdr[0:100]), _nts(hdr[345:500])
                if prefix:
                    name = prefix + "/" + name
                if size < 0:
                    raise damaged(f"header of size {size}")
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
                last = name
                yield name, data
    except OSError as e:
        raise DataError(f"{path}: cannot read shard: {e}") from None
