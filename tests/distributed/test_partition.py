"""The deal of shards (and bank chunks) to ranks: disjoint, complete, balanced, fixed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_npz

from oocid.data.augment import batch_augment_for
from oocid.data.manifest import read_manifest
from oocid.data.memory import InMemoryData
from oocid.data.stream import DecodeFixed, StreamData
from oocid.data.writer import write_shards
from oocid.distributed.partition import check_chunked_by_shards, deal_shards, global_rows, rank_manifest
from oocid.distributed.world import World, world_from_env
from oocid.errors import InputError
from oocid.train.ddp import padded


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("part")
    write_shards(tiny_npz(root / "t.npz", n=100), root / "shards", shard_size=16, progress=False)
    return root / "shards"


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_deal_is_disjoint_complete_and_balanced(shards: Path, world: int) -> None:
    m = read_manifest(shards)  # 7 shards: six of 16 samples and one of 4
    owned = deal_shards(m, world)
    flat = sorted(i for o in owned for i in o)
    assert flat == list(range(len(m.shards)))
    counts = [sum(m.shards[i].stop - m.shards[i].start for i in o) for o in owned]
    assert max(counts) - min(counts) <= m.shard_size
    assert owned == deal_shards(m, world)  # a pure function of the sizes and the world size


def test_more_processes_than_shards_is_refused(shards: Path) -> None:
    with pytest.raises(InputError, match="7 shards cannot be shared by 8 processes"):
        deal_shards(read_manifest(shards), 8)


def test_rank_manifest_renumbers_its_samples(shards: Path) -> None:
    m = read_manifest(shards)
    owned = deal_shards(m, 2)
    rows = [global_rows(rank_manifest(m, o)) for o in owned]
    assert sorted(np.concatenate(rows).tolist()) == list(range(m.n))
    for o, r in zip(owned, rows, strict=True):
        local = rank_manifest(m, o)
        assert local.n == len(r) and local.identity == m.identity
        # the data path sees local indices 0..n-1 whose images are the global rows' images
        data = InMemoryData(local, 1, 8, batch_augment_for("gray", 16, [0.5], [0.25], 0.5), 0,
                            torch.device("cpu"))
        whole = InMemoryData(m, 1, 8, batch_augment_for("gray", 16, [0.5], [0.25], 0.5), 0,
                             torch.device("cpu"))
        assert torch.equal(data.images, whole.images[torch.from_numpy(r)])
        assert torch.equal(data.labels, whole.labels[torch.from_numpy(r)])


def test_a_streamed_rank_reads_each_of_its_samples_once(shards: Path) -> None:
    m = read_manifest(shards)
    local = rank_manifest(m, deal_shards(m, 3)[1])
    data = StreamData(local, 1, 8, DecodeFixed(1, 16, 16), 0, torch.device("cpu"), 0,
                      batch_augment=batch_augment_for("gray", 16, [0.5], [0.25], 0.5))
    seen = torch.cat([b.index for b in data.epoch_batches(0)])
    assert sorted(seen.tolist()) == list(range(local.n))


def test_a_bank_not_chunked_by_shards_is_refused(shards: Path) -> None:
    m = read_manifest(shards)
    check_chunked_by_shards(m, m.shard_size)
    with pytest.raises(InputError, match="rows \\[0, 16\\) are not bank chunk 0"):
        check_chunked_by_shards(m, 8)
    odd = dataclasses.replace(m, shards=(m.shards[1], *m.shards[1:]))
    with pytest.raises(InputError, match="not bank chunk 0"):
        check_chunked_by_shards(odd, m.shard_size)


def test_padded_evens_out_the_steps_of_an_epoch() -> None:
    two = World(0, 2)
    assert list(padded(iter([1, 2]), 4, two)) == [1, 2, None, None]
    assert list(padded(iter([1, 2]), 2, two)) == [1, 2]
    assert list(padded(iter([1, 2]), 4, World())) == [1, 2]  # one process: never padded


def test_world_from_torchrun_environment() -> None:
    assert world_from_env({}) == World()
    assert world_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}) == World(2, 4, 0)
    with pytest.raises(InputError, match="inconsistent"):
        world_from_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(InputError, match="malformed"):
        world_from_env({"WORLD_SIZE": "two"})
