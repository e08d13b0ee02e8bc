"""Where the bank lives when several processes train it.

- shared (the default): one bank directory that every process reaches (one machine, or a
  file system all machines mount). Rank 0 holds the lock and writes the commit records.
- node-local (`--node-local-bank`): each machine keeps, at its own `--bank` path, a bank of the
  same format in which only the chunks of its processes' shards are trained; a `part.json`
  beside the rows names them. The lowest rank of each machine writes that machine's records,
  after rank 0's, whose record is the run's commit point (`oocid.distributed.rank_store`).
  `oocid bank verify` checks a set of parts, `oocid bank assemble` joins them into one bank,
  and `oocid knn` can read the parts directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from oocid.bank.parts import part_path, read_part, write_part_info
from oocid.data.manifest import Manifest
from oocid.distributed.partition import deal_shards
from oocid.distributed.world import World
from oocid.errors import InputError


@dataclass(frozen=True)
class BankLayout:
    node_local: bool
    group: tuple[int, ...]  # the ranks writing into this process's bank directory, ascending
    deal: tuple[tuple[int, ...], ...]  # each rank's shards = its bank chunks; () for one process

    def leads(self, world: World) -> bool:
        """Whether this process opens, locks and commits its bank directory."""
        return world.rank == self.group[0]

    def group_chunks(self) -> list[int]:
        """The chunks the ranks of this bank directory train."""
        return sorted(c for r in self.group for c in self.deal[r])


def bank_layout(world: World, node_local: bool, manifest: Manifest) -> BankLayout:
    """The layout of `world` over the shards of `manifest`, dealt once for the run (a
    collective when node-local: the ranks tell their machines)."""
    if not world.distributed:  # one process: no deal
        return BankLayout(False, (0,), ())
    deal = tuple(tuple(d) for d in deal_shards(manifest, world.size))
    if not node_local:
        return BankLayout(False, tuple(range(world.size)), deal)
    nodes = world.gather(world.node)
    return BankLayout(True, tuple(r for r, n in enumerate(nodes) if n == world.node), deal)


def claim_part(bank: Path, chunks: list[int], world: World, manifest_id: str) -> None:
    """Record which chunks this machine's bank trains; a resume must find the same ones."""
    old = read_part(bank)
    if old is not None and (old["chunks"] != chunks or old["world_size"] != world.size):
        raise InputError(f"{part_path(bank)}: this machine's bank trained chunks of a "
                         f"{old['world_size']}-process run and another deal; node-local banks "
                         "cannot be re-dealt: join them with `oocid bank assemble` and resume "
                         "on the assembled bank")
    write_part_info(bank, chunks, world.size, world.node, manifest_id)
