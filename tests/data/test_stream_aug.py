"""The streaming augmentation equals the torchvision reference (augment.sample_transform) draw
for draw and pixel for pixel, except where a large JPEG is decoded at reduced size."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from oocid.data.augment import normalize_batch, sample_transform
from oocid.data.decode import decode_image, load_image, open_image
from oocid.data.stream_aug import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    hue_tables,
    stream_transform,
)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def photo(seed: int, w: int, h: int, fmt: str = "JPEG", gray: bool = False) -> bytes:
    """A smooth colour field with blocks and noise, encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([128 + 100 * np.sin(xx / rng.uniform(5, 40) + c) * np.cos(yy / rng.uniform(5, 40))
                  for c in range(3)], -1)
    a += rng.normal(0, 12, a.shape)
    y0, x0 = h // 4, w // 4
    a[y0:y0 * 2, x0:x0 * 3] = rng.integers(0, 256, 3)
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if gray:
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def reference_uint8(recipe: str, size: int, scale_min: float, train: bool) -> T.Compose:
    """sample_transform's own steps, with PILToTensor in place of ToTensor + Normalize."""
    tf = sample_transform(recipe, size, MEAN, STD, scale_min, train=train)
    assert isinstance(tf.transforms[-1], T.Normalize) and isinstance(tf.transforms[-2], T.ToTensor)
    return T.Compose([*tf.transforms[:-2], T.PILToTensor()])


def test_hue_tables_are_pillows_conversions() -> None:
    hs, rgbx = hue_tables()
    rng = np.random.default_rng(0)
    trip = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    hsv = np.asarray(Image.fromarray(trip).convert("HSV"))
    key = (trip[..., 0].astype(np.uint32) << 16) | (trip[..., 1].astype(np.uint32) << 8) | trip[..., 2]
    assert np.array_equal(hs[key] >> 8, hsv[..., 0]) and np.array_equal(hs[key] & 255, hsv[..., 1])
    back = np.asarray(Image.frombytes("HSV", (64, 64), trip.tobytes()).convert("RGB"))
    got = rgbx[key].view(np.uint8).reshape(64, 64, 4)[..., :3]
    assert np.array_equal(got, back)


@pytest.mark.parametrize("factor", [-0.5, -0.4, -0.13, -0.001, 0.0, 0.07, 0.25, 0.4, 0.5])
def test_adjust_hue_equals_torchvision(factor: float) -> None:
    img = Image.open(io.BytesIO(photo(1, 97, 61))).convert("RGB")
    assert np.array_equal(np.asarray(adjust_hue(img, factor)), np.asarray(TF.adjust_hue(img, factor)))
    gray = img.convert("L")
    assert adjust_hue(gray, factor) is gray


@pytest.mark.parametrize("factor", [0.0, 0.6, 0.7431, 1.0, 1.0001, 1.29, 1.4, 2.5])
def test_brightness_and_contrast_tables_equal_pillow(factor: float) -> None:
    from PIL import ImageEnhance

    for k in range(3):
        img = Image.open(io.BytesIO(photo(k, 57, 33))).convert("RGB")
        for im in (img, img.convert("L")):
            want = ImageEnhance.Brightness(im).enhance(factor)
            assert adjust_brightness(im, factor).tobytes() == want.tobytes()
            want = ImageEnhance.Contrast(im).enhance(factor)
            assert adjust_contrast(im, factor).tobytes() == want.tobytes()
            assert adjust_contrast(im, factor).mode == im.mode


@pytest.mark.parametrize("recipe", ["imagenet", "cifar", "gray"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_train_transform_equals_reference(recipe: str, fmt: str) -> None:
    channels = 1 if recipe == "gray" else 3
    ref = reference_uint8(recipe, 32, 0.2, train=True)
    ours = stream_transform(recipe, 32, 0.2, channels, train=True)
    grays = 0
    for k in range(40):
        data = photo(k, 40 + k % 20, 30 + k % 25, fmt)  # under 2x the output: full decode
        torch.manual_seed(k)
        want = ref(decode_image(data, channels))
        next_ref = torch.rand(1)
        torch.manual_seed(k)
        got = ours(open_image(data))
        assert torch.equal(torch.rand(1), next_ref)  # the same number of random draws
        assert got.dtype == torch.uint8 and got.shape == want.shape == (channels, 32, 32)
        assert torch.equal(got, want), (recipe, fmt, k)
        grays += int(channels == 3 and torch.equal(got[0], got[1]) and torch.equal(got[1], got[2]))
    if recipe != "gray":
        assert 2 <= grays <= 20  # RandomGrayscale(0.2) did fire, not always


def test_normalised_batch_matches_to_tensor_normalize() -> None:
    ref = sample_transform("imagenet", 24, MEAN, STD, 0.2, train=True)
    ours = stream_transform("imagenet", 24, 0.2, 3, train=True)
    xs, want = [], []
    for k in range(6):
        data = photo(k, 50, 40)
        torch.manual_seed(k)
        want.append(ref(decode_image(data, 3)))
        torch.manual_seed(k)
        xs.append(ours(open_image(data)))
    got = normalize_batch(torch.stack(xs), MEAN, STD)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.stack(want), atol=2e-6, rtol=0)


@pytest.mark.parametrize("recipe", ["imagenet", "cifar"])
def test_eval_transform_equals_reference(recipe: str) -> None:
    ref = reference_uint8(recipe, 32, 0.2, train=False)
    ours = stream_transform(recipe, 32, 0.2, 3, train=False)
    for k in range(5):
        data = photo(k, 50 + 3 * k, 44, "PNG")
        assert torch.equal(ours(open_image(data)), ref(decode_image(data, 3)))


def test_large_jpeg_is_decoded_reduced_and_stays_the_same_picture() -> None:
    data = photo(7, 1024, 768)
    img, scale = load_image(open_image(data), 3, (224, 224))
    assert scale == 2.0 and img.size == (512, 384)
    full = decode_image(data, 3)
    # eval: resize to 256 + centre crop 224, from a 1/2-size decode vs from the full image
    got = stream_transform("imagenet", 224, 0.2, 3, train=False)(open_image(data))
    want = reference_uint8("imagenet", 224, 0.2, train=False)(full)
    diff = (got.float() - want.float()).abs()
    assert diff.mean() < 2.0 and diff.max() < 60, (diff.mean(), diff.max())
    # train: a crop at least twice the output is cut from the reduced decode, same window
    ours = stream_transform("imagenet", 64, 0.9, 3, train=True)
    ref = reference_uint8("imagenet", 64, 0.9, train=True)
    torch.manual_seed(3)
    got = ours(open_image(data))
    torch.manual_seed(3)
    want = ref(full)
    diff = (got.float() - want.float()).abs()
    assert diff.mean() < 2.0, diff.mean()


def test_grayscale_source_in_a_colour_set() -> None:
    data = photo(2, 40, 40, "PNG", gray=True)
    ref = reference_uint8("imagenet", 16, 0.2, train=True)
    ours = stream_transform("imagenet", 16, 0.2, 3, train=True)
    for k in range(8):
        torch.manual_seed(k)
        want = ref(decode_image(data, 3))
        torch.manual_seed(k)
        assert torch.equal(ours(open_image(data)), want)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_data_batches_equal_the_reference_per_sample(tmp_path: Path, workers: int) -> None:
    """StreamData as `oocid train` builds it (data.in_memory = no): every streamed image equals
    the torchvision reference seeded as the stream seeds that sample."""
    from oocid.config import DataConfig
    from oocid.data.batch import mix_seed
    from oocid.data.manifest import read_manifest
    from oocid.data.reader import iter_samples
    from oocid.data.stream import StreamData, make_train_data
    from oocid.data.writer import write_shards

    src = tmp_path / "src"
    for k in range(23):
        (src / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        (src / f"c{k % 2}" / f"{k}.jpg").write_bytes(photo(k, 40 + k, 36, "JPEG", gray=k == 5))
    write_shards(src, tmp_path / "shards", shard_size=8, progress=False)
    m = read_manifest(tmp_path / "shards")
    cfg = DataConfig(image_size=24, in_memory="no", batch_size=5, workers=workers, shuffle_buffer=4)
    data = make_train_data(m, cfg, seed=11, device=torch.device("cpu"))
    assert isinstance(data, StreamData)
    ref = sample_transform("imagenet", 24, cfg.mean, cfg.std, cfg.crop_scale_min, train=True)
    by_index = {s.index: s.image for p in m.shard_paths() for s in iter_samples(p)}
    seen = []
    for b in data.epoch_batches(epoch=1):
        assert b.images.dtype == torch.float32 and b.images.shape[1:] == (3, 24, 24)
        for x, i in zip(b.images, b.index.tolist(), strict=True):
            torch.manual_seed(mix_seed(11, 3, 1, i))
            torch.testing.assert_close(x, ref(decode_image(by_index[i], 3)), atol=2e-6, rtol=0)
            seen.append(i)
    assert sorted(seen) == list(range(23)) and seen != list(range(23))


@pytest.mark.parametrize(("n", "size", "nw"), [(23, 8, 2), (2000, 4096, 2), (40, 8, 3), (32, 8, 2),
                                               (9, 8, 4), (100, 10, 1)])
def test_workers_share_every_sample_once_and_evenly(tmp_path: Path, n: int, size: int, nw: int
                                                    ) -> None:
    """Whole shards while each worker gets one, the rest split sample by sample: with fewer
    shards than workers (a 2,000-image set is one default shard) every worker still works."""
    from oocid.data.reader import iter_samples
    from oocid.data.stream import ShardStream
    from oocid.data.writer import write_shards

    np.savez(tmp_path / "x.npz", images=np.zeros((n, 2, 2), np.uint8))
    m = write_shards(tmp_path / "x.npz", tmp_path / "s", shard_size=size, progress=False)
    ds = ShardStream(m, 1, lambda im: im, seed=3, shuffle=True, shuffle_buffer=4, size=2)
    ds.set_epoch(2)
    got: list[list[int]] = []
    for w in range(nw):
        got.append([s.index for p, off, stride in ds.worker_parts(w, nw)
                    for k, s in enumerate(iter_samples(p)) if k % stride == off])
    flat = sorted(i for g in got for i in g)
    assert flat == list(range(n))
    counts = [len(g) for g in got]
    assert max(counts) - min(counts) <= max(1, nw - 1 + (n % size > 0)), counts


def test_shuffle_buffer_yields_early_and_every_sample_once(tmp_path: Path) -> None:
    from oocid.data.stream import SHUFFLE_START, ShardStream
    from oocid.data.writer import write_shards

    np.savez(tmp_path / "x.npz", images=np.zeros((700, 2, 2), np.uint8))
    m = write_shards(tmp_path / "x.npz", tmp_path / "s", shard_size=100, progress=False)
    calls = []

    def tf(img: Image.Image) -> torch.Tensor:
        calls.append(1)
        return torch.zeros(1, 2, 2)

    ds = ShardStream(m, 1, tf, seed=0, shuffle=True, shuffle_buffer=512, size=2)
    it = iter(ds)
    first = next(it)
    assert len(calls) == SHUFFLE_START  # not a whole buffer (512) before the first sample
    order = [first[1]] + [item[1] for item in it]
    assert sorted(order) == list(range(700))
    early = order[:SHUFFLE_START]
    assert early != sorted(early) and max(order[:100]) > 100


def _same_size_set(tmp_path: Path, n: int, bad: int | None = None) -> Path:
    """n 20x16 PNGs in two classes (one of another size at `bad`), sharded by 8."""
    from oocid.data.writer import write_shards

    src = tmp_path / "src"
    for k in range(n):
        (src / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        w, h = (24, 16) if k == bad else (20, 16)
        (src / f"c{k % 2}" / f"{k:03d}.png").write_bytes(photo(k, w, h, "PNG"))
    write_shards(src, tmp_path / "shards", shard_size=8, progress=False)
    return tmp_path / "shards"


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers, 2 CPUs
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_batched_stream_equals_batch_augment_of_the_decoded_images(tmp_path: Path, workers: int
                                                                   ) -> None:
    """Same-size small images stream decoded per sample and augmented a batch at a time in the
    worker: each worker batch equals BatchAugment on those images with the generator seeded by
    (seed, epoch, first index); each batch trained on is a whole worker batch as it is or, for
    the short ones joined into whole batches, the concatenation of its parts' BatchAugment
    outputs (3 workers: one part is cut across two batches); every index once, in a shuffled
    order, the same on a second pass and on a resume at any step."""
    from oocid.config import DataConfig
    from oocid.data.augment import batch_augment_for
    from oocid.data.batch import mix_seed
    from oocid.data.manifest import read_manifest
    from oocid.data.reader import iter_samples
    from oocid.data.stream import DecodeFixed, StreamData, make_train_data

    m = read_manifest(_same_size_set(tmp_path, 23))
    cfg = DataConfig(image_size=12, augment="cifar", in_memory="no", batch_size=5, workers=workers,
                     shuffle_buffer=4)
    data = make_train_data(m, cfg, seed=11, device=torch.device("cpu"))
    assert isinstance(data, StreamData) and isinstance(data.transform, DecodeFixed)
    aug = batch_augment_for("cifar", 12, cfg.mean, cfg.std, cfg.crop_scale_min)
    by_index = {s.index: s.image for p in m.shard_paths() for s in iter_samples(p)}
    pixels: dict[int, torch.Tensor] = {}  # each sample's pixels in its worker batch
    parts: list[list[int]] = []
    for w in data.worker_batches(epoch=1):
        idx = w["index"].tolist()
        raw = torch.stack([torch.from_numpy(np.asarray(decode_image(by_index[i], 3)).copy())
                           .permute(2, 0, 1) for i in idx])
        g = torch.Generator().manual_seed(mix_seed(11, 7, 1, idx[0]))
        torch.testing.assert_close(w["x"], aug(raw, g), atol=1e-6, rtol=0)
        pixels.update(zip(idx, w["x"], strict=True))
        parts.append(idx)
    batches = list(data.epoch_batches(epoch=1))
    seen: list[int] = []
    for b in batches:
        assert b.images.dtype == torch.float32 and b.images.shape[1:] == (3, 12, 12)
        idx = b.index.tolist()
        assert torch.equal(b.images, torch.stack([pixels[i] for i in idx]))
        seen += idx
    full = [p for p in parts if len(p) == 5]
    assert [b.index.tolist() for b in batches if b.index.tolist() in full] == full
    joined = [i for b in batches if b.index.tolist() not in full for i in b.index.tolist()]
    assert joined == [i for p in parts if len(p) < 5 for i in p]  # in the loader's order
    assert [len(b.index) for b in batches] == [5, 5, 5, 5, 3]
    cut = any(not set(p) <= set(b.index.tolist()) and set(p) & set(b.index.tolist())
              for p in parts for b in batches)
    assert cut == (workers == 3)
    assert sorted(seen) == list(range(23)) and seen != list(range(23))
    for s in range(len(batches) + 1):  # a mid-epoch resume's batches
        again = list(data.epoch_batches(epoch=1, start_step=s))
        assert len(again) == len(batches) - s and all(
            torch.equal(x.images, y.images) and torch.equal(x.index, y.index)
            for x, y in zip(batches[s:], again, strict=True)), s


def test_batched_stream_skips_an_image_of_another_size_and_sample_mode_is_per_sample(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from oocid.config import DataConfig
    from oocid.data.augment import batch_augment_for
    from oocid.data.manifest import read_manifest
    from oocid.data.stream import DecodeFixed, StreamData, make_train_data
    from oocid.errors import DataError

    m = read_manifest(_same_size_set(tmp_path, 12))
    m_bad = read_manifest(_same_size_set(tmp_path / "b", 12, bad=5))
    cpu = torch.device("cpu")
    base = {"image_size": 12, "augment": "cifar", "in_memory": "no", "batch_size": 4, "workers": 0,
            "shuffle_buffer": 4}
    per_sample = make_train_data(m, DataConfig(**base, stream_augment="sample"), 0, cpu)
    assert isinstance(per_sample, StreamData) and not isinstance(per_sample.transform, DecodeFixed)
    auto = make_train_data(m_bad, DataConfig(**base), 0, cpu)  # two sizes: per sample
    assert isinstance(auto, StreamData) and not isinstance(auto.transform, DecodeFixed)
    with pytest.raises(DataError, match="differ in size"):
        make_train_data(m_bad, DataConfig(**base, stream_augment="batch"), 0, cpu)
    # a shard whose image is not the size the set was batched for: reported, skipped, counted
    aug = batch_augment_for("cifar", 12, [0.5] * 3, [0.25] * 3, 0.2)
    data = StreamData(m_bad, 3, 4, DecodeFixed(3, 16, 20), 0, cpu, 0, shuffle_buffer=4,
                      batch_augment=aug)
    got = [i for b in data.epoch_batches(0) for i in b.index.tolist()]
    assert len(set(got)) == len(got) == 11 and set(got) <= set(range(12))
    assert data.skips.count == 1 and data.skips.keys[0].startswith("shard-")
    assert "size 24x16, expected 20x16" in capsys.readouterr().err


def test_batched_hue_equals_torchvision_per_sample() -> None:
    """BatchAugment's hue step: torchvision's tensor adjust_hue, one shift per sample (gray and
    saturated pixels, both ends of the range, a shift that wraps around the circle)."""
    from oocid.data.augment import adjust_hue_batch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 9, 7, generator=g)
    x[:, :, 0, :] = x[:, :1, 0, :]  # a gray row: hue undefined, left as is
    x[:, 0, 1, :], x[:, 1, 1, :], x[:, 2, 1, :] = 1.0, 0.0, 0.0  # pure red
    x[1] = torch.round(x[1] * 4) / 4  # ties between channels
    shift = torch.tensor([-0.5, -0.4, -0.01, 0.0, 0.3, 0.5])
    got = adjust_hue_batch(x, shift)
    for k in range(6):
        torch.testing.assert_close(got[k], TF.adjust_hue(x[k], float(shift[k])), atol=1e-6, rtol=0)
    assert not torch.allclose(got[4], x[4], atol=0.05)  # it did rotate the hue


def test_batch_augment_colour_recipe_jitters_hue() -> None:
    """The colour recipes' batched path applies the paper's ColorJitter hue 0.4: with every
    other step switched off, the output is the input's hue rotated by a per-sample shift."""
    from oocid.data.augment import BatchAugment, adjust_hue_batch, batch_augment_for

    assert batch_augment_for("cifar", 8, [0.5] * 3, [0.5] * 3, 0.2).hue == 0.4
    assert batch_augment_for("gray", 8, [0.5], [0.5], 0.2).hue == 0.0
    aug = BatchAugment(8, [0.0] * 3, [1.0] * 3, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False,
                       brightness=0.0, contrast=0.0, hue=0.4)
    x = (torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    got = aug(x, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    for _ in range(4):  # the crop's and flip's draws come first
        torch.rand(5, generator=g)
    shift = torch.rand(5, generator=g) * 0.8 - 0.4
    want = adjust_hue_batch(x.float() / 255.0, shift)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    assert float((got - x.float() / 255.0).abs().max()) > 0.05


def test_normalisation_constants_are_made_once_per_device() -> None:
    """mean/std tensors are built once per (mean, std, device), not per batch (on a GPU each
    would be a blocking copy); the normalised batch is the formula's, bit for bit."""
    from oocid.data.augment import norm_constants, normalize_batch

    mean, std = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    before = norm_constants.cache_info().misses
    a, b = normalize_batch(x, mean, std), normalize_batch(x, list(mean), list(std))
    assert norm_constants.cache_info().misses <= before + 1
    assert norm_constants(mean, std, x.device)[0] is norm_constants(mean, std, x.device)[0]
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    want = x.float().sub_(m * 255.0).mul_(1.0 / (255.0 * s))
    assert torch.equal(a, want) and torch.equal(b, want)


@pytest.mark.parametrize("flip", [True, False], ids=["flip", "no-flip"])
def test_data_flip_false_never_mirrors(flip: bool) -> None:
    """A left-to-right ramp stays dark-left after every augmentation path with flip=False (the
    gray recipe's brightness/contrast keep the order); with flip=True about half are mirrored."""
    from oocid.config import Config
    from oocid.data.augment import batch_augment_for

    assert Config().data.flip is True  # the default keeps the recipes' flip
    ramp = np.tile(np.linspace(0, 255, 24).astype(np.uint8), (24, 1))  # (H, W), dark left
    n = 64

    def mirrored(x: torch.Tensor) -> int:  # (N, C, S, S) float
        left, right = x[..., :, :4].mean(dim=(1, 2, 3)), x[..., :, -4:].mean(dim=(1, 2, 3))
        return int((left > right).sum())

    aug = batch_augment_for("gray", 16, [0.5], [0.25], 0.5, flip=flip)
    batch = torch.from_numpy(ramp)[None, None].expand(n, 1, 24, 24).contiguous()
    counts = [mirrored(aug(batch, torch.Generator().manual_seed(0)))]
    torch.manual_seed(0)
    ours = stream_transform("gray", 16, 0.5, 1, train=True, flip=flip)
    counts.append(mirrored(torch.stack([ours(Image.fromarray(ramp)) for _ in range(n)]).float()))
    ref = sample_transform("gray", 16, [0.5], [0.25], 0.5, train=True, flip=flip)
    counts.append(mirrored(torch.stack([ref(Image.fromarray(ramp)) for _ in range(n)])))
    if flip:
        assert all(10 < c < n - 10 for c in counts), counts
    else:
        assert counts == [0, 0, 0]
