"""StreamData's epoch: `steps_per_epoch` is the number of batches `epoch_batches` yields for any
number of DataLoader workers (each batches its own share, so each may end with a short batch),
and a mid-epoch resume skips exactly the batches yielded before."""

from __future__ import annotations

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


def stream(m: Manifest, batch: int, workers: int, bad: int = -1) -> StreamData:
    return StreamData(m, 1, batch, AsTensor(bad), seed=5, device=CPU, workers=workers,
                      shuffle_buffer=4, size=2)


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
@pytest.mark.parametrize(("n", "shard_size", "batch"), [(23, 8, 5), (41, 6, 4), (10, 8, 4),
                                                        (30, 10, 7)])
def test_steps_per_epoch_is_the_number_of_batches(tmp_path: Path, workers: int, n: int,
                                                  shard_size: int, batch: int) -> None:
    """Shard counts that do not divide among the workers, a short last shard, fewer shards than
    workers: the count is exact in every epoch, and every sample comes once."""
    data = stream(shards(tmp_path, n, shard_size), batch, workers)
    spe = data.steps_per_epoch()
    assert spe >= -(-n // batch)
    for epoch in (0, 1):
        batches = list(data.epoch_batches(epoch))
        assert len(batches) == spe, (epoch, [len(b.index) for b in batches])
        assert sorted(i for b in batches for i in b.index.tolist()) == list(range(n))
    assert len(list(data.epoch_batches(1, start_step=spe - 1))) == 1


def test_a_worker_count_that_leaves_short_batches_counts_them(tmp_path: Path) -> None:
    """3 workers on 3 shards of 8 with batches of 5: each worker yields 5 + 3, so 6 batches
    where 24 / 5 rounds up to 5 (the count the loop used to assume)."""
    data = stream(shards(tmp_path, 24, 8), 5, 3)
    assert data.dataset.worker_samples(3) == [8, 8, 8]
    assert data.steps_per_epoch() == 6
    assert sorted(len(b.index) for b in data.epoch_batches(0)) == [3, 3, 3, 5, 5, 5]


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
