"""StreamData's epoch: whole batches of the configured size whatever the number of DataLoader
workers (each batches its own share; the short batches that leaves are joined), one short batch
at the end, `steps_per_epoch` the number of batches `epoch_batches` yields, and a mid-epoch
resume skips exactly the batches yielded before."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oocid.data.manifest import Manifest
from oocid.data.stream import StreamData
from oocid.data.writer import write_shards

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers, 2 CPUs


class AsTensor:
    """The transform: the 2 x 2 grey image as floats; the image of value `bad` fails."""

    def __init__(self, bad: int = -1) -> None:
        self.bad = bad

    def __call__(self, img: Image.Image) -> torch.Tensor:
        a = np.asarray(img, dtype=np.float32)
        if a.max() == self.bad:
            raise ValueError("broken")
        return torch.from_numpy(a.reshape(1, 2, 2).copy())


def shards(tmp_path: Path, n: int, shard_size: int) -> Manifest:
    """n 2 x 2 images, image k all of value k % 250, in shards of shard_size."""
    images = (np.arange(n) % 250).astype(np.uint8)[:, None, None].repeat(2, 1).repeat(2, 2)
    np.savez(tmp_path / "x.npz", images=images)
    return write_shards(tmp_path / "x.npz", tmp_path / f"s{n}-{shard_size}",
                        shard_size=shard_size, progress=False)


class Noisy(AsTensor):
    """AsTensor plus a random draw per pixel: the stream seeds each sample's draws."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return super().__call__(img) + torch.rand(1, 2, 2)


def stream(m: Manifest, batch: int, workers: int, bad: int = -1, noisy: bool = False) -> StreamData:
    return StreamData(m, 1, batch, (Noisy if noisy else AsTensor)(bad), seed=5, device=CPU,
                      workers=workers, shuffle_buffer=4, size=2)


def whole(sizes: list[int], batch: int) -> bool:
    """Every batch but the last has `batch` samples, the last at most that."""
    return all(k == batch for k in sizes[:-1]) and 0 < sizes[-1] <= batch


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
@pytest.mark.parametrize(("n", "shard_size", "batch"), [(23, 8, 5), (41, 6, 4), (10, 8, 4),
                                                        (30, 10, 7)])
def test_steps_per_epoch_is_the_number_of_batches(tmp_path: Path, workers: int, n: int,
                                                  shard_size: int, batch: int) -> None:
    """Shard counts that do not divide among the workers, a short last shard, fewer shards than
    workers: the batches are whole but the last, their count is ceil(n / batch) in every epoch,
    and every sample comes once."""
    data = stream(shards(tmp_path, n, shard_size), batch, workers)
    spe = data.steps_per_epoch()
    assert spe == -(-n // batch)
    for epoch in (0, 1):
        batches = list(data.epoch_batches(epoch))
        sizes = [len(b.index) for b in batches]
        assert len(batches) == spe and whole(sizes, batch), (epoch, sizes)
        assert sorted(i for b in batches for i in b.index.tolist()) == list(range(n))
    assert len(list(data.epoch_batches(1, start_step=spe - 1))) == 1


def test_the_short_batches_of_the_workers_are_joined(tmp_path: Path) -> None:
    """3 workers on 3 shards of 8 with batches of 5: each worker's share is 5 + 3; the three
    short batches make one of 5 and the epoch's short one of 4 (not three batches of 3)."""
    data = stream(shards(tmp_path, 24, 8), 5, 3)
    parts = [len(b["index"]) for b in data.worker_batches(0)]
    assert sorted(parts) == [3, 3, 3, 5, 5, 5]
    assert data.steps_per_epoch() == 5
    assert [len(b.index) for b in data.epoch_batches(0)] == [5, 5, 5, 5, 4]


@pytest.mark.parametrize(("n", "shard_size", "bad"), [(37, 20, -1), (47, 10, -1), (37, 20, 11),
                                                      (47, 10, 30)])
def test_three_workers_yield_whole_batches_the_same_every_time(tmp_path: Path, n: int,
                                                               shard_size: int, bad: int) -> None:
    """3 workers on 2 shards (fewer than workers) and on 5 (more), n not a multiple of the batch,
    with and without an undecodable image: every batch but the epoch's last has the batch size,
    each good index comes once, `steps_per_epoch` is the count yielded (one fewer at most where a
    sample is bad), a second pass gives the same batches, pixels included (a random transform),
    and a resume at any step s gives the uninterrupted epoch's batches from s on."""
    batch = 4
    data = stream(shards(tmp_path, n, shard_size), batch, 3, bad=bad, noisy=True)
    parts = [len(b["index"]) for b in data.worker_batches(1)]
    assert sum(0 < k < batch for k in parts) >= 2  # short worker batches to join
    batches = list(data.epoch_batches(1))
    sizes = [len(b.index) for b in batches]
    got = [i for b in batches for i in b.index.tolist()]
    good = n - (bad >= 0)  # the image of value `bad` has some index (the writer shuffles)
    assert whole(sizes, batch), sizes
    assert len(set(got)) == len(got) == good and set(got) <= set(range(n))
    assert len(batches) == -(-good // batch)
    assert data.steps_per_epoch() - len(batches) == (bad >= 0 and n % batch == 1)
    assert data.skips.count == (bad >= 0)

    def same(xs: list, ys: list) -> bool:
        return len(xs) == len(ys) and all(
            torch.equal(x.index, y.index) and torch.equal(x.images, y.images)
            and torch.equal(x.label, y.label) for x, y in zip(xs, ys, strict=True))

    assert same(list(data.epoch_batches(1)), batches)
    assert not same(list(data.epoch_batches(2)), batches)
    split = set()
    for s in range(len(batches) + 1):
        # a checkpoint after s batches has counted the bad samples seen so far; the resume
        # reports the others: the bad image once in all
        seen = data.skips.count
        first = data.epoch_batches(1)
        assert same(list(itertools.islice(first, s)), batches[:s])
        before = data.skips.count - seen
        first.close()
        assert same(list(data.epoch_batches(1, start_step=s)), batches[s:]), s
        after = data.skips.count - seen - before
        assert before + after == (bad >= 0), s
        split.add((before, after))
    assert split == ({(0, 1), (1, 0)} if bad >= 0 else {(0, 0)})


def test_a_resume_skips_the_batches_yielded_before_a_batch_of_bad_samples_only(
        tmp_path: Path) -> None:
    """Batches of 1 with one undecodable image: that batch is empty and not yielded, so the
    epoch yields one batch fewer than counted, and a resume at any yielded batch k yields
    exactly the batches from k on."""
    data = stream(shards(tmp_path, 12, 4), 1, 0, bad=7)
    batches = [b.index.tolist() for b in data.epoch_batches(0)]
    assert len(batches) == data.steps_per_epoch() - 1 == 11
    assert data.skips.count == 1
    for k in range(len(batches) + 1):
        assert [b.index.tolist() for b in data.epoch_batches(0, start_step=k)] == batches[k:], k
