"""One rank's view of a shared bank: its own chunks, numbered from 0, and the step's commit.

`RankStore` shows a `ChunkCache` the chunks of the rank's shards as if they were a whole bank
(the rows of a rank manifest, `oocid.distributed.partition.rank_manifest`), so the cache, the step
and the data run unchanged. What differs is the commit of a checkpoint (two-phase):

1. every rank writes its dirty chunks as durable journal parts under its own writer name;
2. the ranks exchange their parts' names (the collective is also where rank 0 learns that
   every part is durable); rank 0 writes the one record that names all of them: that rename
   is the commit point, for every rank at once, and rank 0 applies it to the rows;
3. a barrier, after which the other ranks drop their parts from their pending list (the rows
   now hold them). With node-local banks (`oocid.distributed.layout`) the leader of each other
   machine then commits its own bank's parts the same way, and a second barrier follows; a
   machine killed before its own record brings its bank to rank 0's step on resume
   (`BankStore.settle`).

A kill before the record leaves parts that no record names: the next writable open discards
them and the bank is the last checkpoint's. A kill after it replays the record on open.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from oocid.bank.meta import BankMeta
from oocid.bank.store import BankStore
from oocid.distributed.layout import BankLayout
from oocid.distributed.world import World


class RankStore:
    """The chunks `chunks` (ascending) of `base`, as chunks 0..len-1 of a bank of their rows."""

    def __init__(self, base: BankStore, chunks: list[int], world: World,
                 layout: BankLayout, launch: str = "") -> None:
        self.base, self.chunks, self.world, self.layout = base, list(chunks), world, layout
        self.chunk_rows = base.chunk_rows
        self.dim = base.dim
        self.dtype = base.dtype
        self.path: Path = base.path
        self._lo: list[int] = []
        at = 0
        for c in self.chunks:
            a, b = base.chunk_range(c)
            self._lo.append(at)
            at += b - a
        self.n_rows = at
        self.n_chunks = len(self.chunks)
        base.writer = f"r{world.rank}" + (f"-{launch}" if launch else "")

    @property
    def meta(self) -> BankMeta:
        return self.base.meta

    @property
    def bytes_read(self) -> int:
        return self.base.bytes_read

    @property
    def bytes_written(self) -> int:
        return self.base.bytes_written

    def chunk_range(self, c: int) -> tuple[int, int]:
        a, b = self.base.chunk_range(self.chunks[c])
        return self._lo[c], self._lo[c] + b - a

    def read_chunk(self, c: int) -> np.ndarray:
        return self.base.read_chunk(self.chunks[c])

    def _remap(self, chunks: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
        return {self.chunks[int(c)]: rows for c, rows in chunks.items()}

    def write_part(self, chunks: Mapping[int, np.ndarray]) -> None:
        self.base.write_part(self._remap(chunks))

    def write_chunks(self, chunks: Mapping[int, np.ndarray], step: int | None = None) -> None:
        """Without `step`: parts of the next commit. With it: the two-phase commit above (a
        collective: every rank calls it for the same step)."""
        self.base.write_part(self._remap(chunks))
        if step is None:
            return
        world, layout = self.world, self.layout
        names = world.gather(self.base.pending_names())
        leads = layout.leads(world)
        foreign = [n for r in layout.group if r != world.rank for n in names[r]]
        if world.main:  # the commit point of the step, for every rank
            self.base.write_chunks({}, step, foreign)
        world.barrier()
        if layout.node_local:  # each other machine's leader commits its bank, then all go on
            if leads and not world.main:
                self.base.write_chunks({}, step, foreign)
            world.barrier()
        if not leads:
            self.base.forget_pending()
