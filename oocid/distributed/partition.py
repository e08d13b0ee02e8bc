"""Which rank trains on which shards, and so owns which rows of the bank.

The bank is chunked by shards (chunk c holds the rows of shard c), so dealing shards to ranks
deals the bank's chunks with them: each rank reads only its shards, and only it writes their
rows. The deal is a pure function of the shard sizes and the world size, fixed for a run: the
same world size always gets the same deal, so between two commits every row is written by
exactly one rank. A resume with another world size deals anew at the checkpoint, where the
bank on disk is complete and consistent. Nothing is padded or duplicated: every sample belongs
to exactly one rank.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from oocid.data.manifest import Manifest, ShardInfo
from oocid.errors import InputError


def deal_shards(manifest: Manifest, world_size: int) -> list[list[int]]:
    """Shard numbers of each rank, in order: the largest shards first, each to the rank with the
    fewest samples so far (ties: the lowest rank), so ranks' sample counts differ by at most
    one shard."""
    if world_size > len(manifest.shards):
        raise InputError(f"{manifest.root}: {len(manifest.shards)} shards cannot be shared by "
                         f"{world_size} processes (each needs at least one); write smaller "
                         "shards with `oocid shard --shard-size` or start fewer processes")
    sizes = [s.stop - s.start for s in manifest.shards]
    load = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owned[r].append(i)
        load[r] += sizes[i]
    return [sorted(o) for o in owned]


def check_chunked_by_shards(manifest: Manifest, chunk_rows: int) -> None:
    """InputError unless shard i holds exactly the rows of bank chunk i."""
    for i, s in enumerate(manifest.shards):
        if s.start != i * chunk_rows or not (s.stop - s.start == chunk_rows or s.stop == manifest.n):
            raise InputError(f"{manifest.root / s.name}: rows [{s.start}, {s.stop}) are not bank "
                             f"chunk {i} (chunks of {chunk_rows} rows); several processes need "
                             "a bank chunked by shards (as `oocid train` creates it)")


def rank_manifest(manifest: Manifest, shards: list[int]) -> Manifest:
    """The manifest of `shards` alone, their samples numbered 0..n-1 in shard order."""
    infos, origin, at = [], [], 0
    for i in shards:
        s = manifest.shards[i]
        n = s.stop - s.start
        infos.append(ShardInfo(s.name, at, at + n, s.sha256, s.nbytes))
        origin.append(s.start)
        at += n
    return dataclasses.replace(manifest, n=at, shards=tuple(infos), origin=tuple(origin))


def global_rows(local: Manifest) -> np.ndarray:
    """(n,) the whole set's index of each of a rank manifest's samples."""
    if not local.origin:
        return np.arange(local.n, dtype=np.int64)
    return np.concatenate([np.arange(o, o + s.stop - s.start, dtype=np.int64)
                           for s, o in zip(local.shards, local.origin, strict=True)]) \
        if local.shards else np.zeros(0, dtype=np.int64)
