"""A bank split across machines: node-local banks, each training some chunks (`part.json`).

Each part is a bank of the whole size and the usual format; `part.json` beside its rows names
the chunks it trained (`oocid train --node-local-bank` under torchrun writes it). A set of parts
is whole when every chunk is named exactly once, all belong to the same shards and all are at
the same committed step. `assemble` copies each part's chunks into one ordinary bank.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oocid.atomic import atomic_write
from oocid.bank.create import create_store, remove_bank
from oocid.bank.store import BankStore, open_store
from oocid.errors import DataError, InputError
from oocid.progress import chunk_bar

PART_FORMAT = "oocid-bank-part"


def part_path(bank: Path) -> Path:
    return bank / "part.json" if bank.suffix == ".zarr" else bank.with_name(bank.name + ".part.json")


def read_part(bank: Path) -> dict[str, Any] | None:
    """A node-local bank's part.json (None: a whole bank)."""
    path = part_path(Path(bank))
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        if info.get("format") != PART_FORMAT:
            raise ValueError(f"format {info.get('format')!r}")
        info["chunks"] = [int(c) for c in info["chunks"]]
        return dict(info)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable bank part description ({e})") from e


def write_part_info(bank: Path, chunks: list[int], world_size: int, node: int,
                    manifest_id: str | None) -> None:
    info = {"format": PART_FORMAT, "world_size": world_size, "node": node,
            "manifest_id": manifest_id, "chunks": chunks}
    atomic_write(part_path(bank), json.dumps(info) + "\n", "bank part description")


def chunks_of(banks: Sequence[Path]) -> list[tuple[Path, list[int]]]:
    """Each bank with the chunks to read from it: all of a single whole bank's, or each part's
    own; DataError unless the parts are a whole bank (each chunk once, same shards and step)."""
    infos = [read_part(b) for b in banks]
    if len(banks) == 1 and infos[0] is None:
        with open_store(banks[0], read_only=True) as s:
            return [(banks[0], list(range(s.n_chunks)))]
    if any(i is None for i in infos):
        whole = banks[[i is None for i in infos].index(True)]
        raise InputError(f"{whole}: a whole bank (no part.json) cannot be combined with others")
    stats = []
    for b in banks:
        with open_store(b, read_only=True) as s:
            stats.append((s.n_chunks, s.meta.manifest_id, committed(s), s.meta.bank_id))
    if len(set(stats)) > 1:
        raise DataError(f"{banks[0]} and the other parts disagree on (chunks, shards, committed "
                        f"step, bank id): {sorted(set(stats), key=str)}")
    owner: dict[int, Path] = {}
    out = []
    for b, info in zip(banks, infos, strict=True):
        assert info is not None
        for c in info["chunks"]:
            if c in owner:
                raise DataError(f"{b}: chunk {c} is also trained by {owner[c]}")
            owner[c] = b
        out.append((b, info["chunks"]))
    missing = sorted(set(range(stats[0][0])) - set(owner))
    if missing:
        raise DataError(f"the parts {', '.join(map(str, banks))} lack chunk(s) {missing[:10]} "
                        f"({len(missing)} of {stats[0][0]}): a machine's part is missing")
    return out


def committed(store: BankStore) -> int:
    """The step a read sees: a committed record not yet replayed counts."""
    return store.pending_step if store.pending_journal and store.pending_step is not None \
        else store.meta.committed_step


def iter_part_chunks(banks: Sequence[Path]) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of every chunk of a whole bank or of a set of parts, each chunk from
    the part that trained it; DataError at the first damaged row (oocid.bank.damage)."""
    for b, chunks in chunks_of(banks):
        with open_store(b, read_only=True) as s:
            for c in chunks:
                yield s.chunk_range(c)[0], s.read_chunk(c)


def assemble(banks: Sequence[Path], out: Path, progress: bool = False) -> int:
    """Join node-local parts into one ordinary bank at `out`; returns its committed step.
    A part that cannot be read, or holds a damaged row, stops it and leaves no bank at `out`.
    The bank takes the parts' id last: a killed assemble leaves one with an id of its own,
    which `knn` and `--resume` refuse as another run's."""
    plan = chunks_of(banks)
    with open_store(banks[0], read_only=True) as s0:
        meta, step = s0.meta, committed(s0)
    store = create_store(out, meta.n_rows, meta.dim, dtype=meta.dtype, chunk_rows=meta.chunk_rows,
                         manifest_id=meta.manifest_id, momentum=meta.momentum, seed=meta.seed)
    try:
        with chunk_bar(meta.n_rows and -(-meta.n_rows // meta.chunk_rows), "assembling",
                       progress) as bar:
            for b, chunks in plan:
                with open_store(b, read_only=True) as s:
                    for c in chunks:
                        store.write_part({c: s.read_chunk(c)})
                        bar.update()
        store.write_chunks({}, step)  # one commit of every part, at the parts' step
        store._upgrade(meta.bank_id)  # the run's id, once every row is in
    except BaseException:
        try:
            store.close()
        finally:
            remove_bank(out)
        raise
    store.close()
    return step
