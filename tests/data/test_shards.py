"""Tests for the shards (oocid.data.writer, manifest, reader, ustar): round trips, determinism,
skipped inputs, and every error path."""

from __future__ import annotations

import io
import json
import re
import tarfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from oocid.data.manifest import MANIFEST_NAME, Manifest, read_manifest, verify_shards
from oocid.data.reader import RawSample, iter_samples
from oocid.data.writer import write_shards
from oocid.errors import DataError, InputError, OocidError

DEMO = Path(__file__).resolve().parents[2] / "oocid" / "data" / "fashion_mnist_demo.npz"


def make_npz(
    path: Path, n: int = 37, shape: tuple[int, ...] = (6, 5), labeled: bool = True
) -> Path:
    """An npz of n random uint8 images (n, *shape), labels i % 3, class names a/b/c."""
    rng = np.random.default_rng(123)
    arrays: dict[str, Any] = {"images": rng.integers(0, 256, (n, *shape), dtype=np.uint8)}
    if labeled:
        arrays["labels"] = np.arange(n) % 3
        arrays["class_names"] = np.array(["a", "b", "c"])
    np.savez(path, **arrays)
    return path


def save_image(path: Path, fmt: str, size: tuple[int, int] = (9, 7), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = (10, 200, 30) if mode == "RGB" else 77
    Image.new(mode, size, color).save(path, format=fmt)


def all_samples(m: Manifest) -> list[RawSample]:
    return [s for p in m.shard_paths() for s in iter_samples(p)]


def decode(s: RawSample) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(s.image)))


def member_names(m: Manifest) -> list[str]:
    names = []
    for p in m.shard_paths():
        with tarfile.open(p) as tar:
            names += tar.getnames()
    return names


@pytest.fixture
def npz_shards(tmp_path: Path) -> tuple[Path, Manifest]:
    src = make_npz(tmp_path / "data.npz")
    return src, write_shards(src, tmp_path / "shards", shard_size=10, seed=7, progress=False)


# ------------------------------------------------------------------------- round trips


def test_npz_round_trip(npz_shards: tuple[Path, Manifest]) -> None:
    src, m = npz_shards
    source = np.load(src)
    assert (m.n, m.shard_size, m.seed, m.source) == (37, 10, 7, str(src))
    assert m.classes == ("a", "b", "c") and m.labeled and m.skipped == ()
    assert [(s.name, s.start, s.stop) for s in m.shards] == [
        (f"shard-{k:06d}.tar", 10 * k, min(10 * k + 10, 37)) for k in range(4)
    ]
    assert [s.nbytes for s in m.shards] == [p.stat().st_size for p in m.shard_paths()]
    assert m.image_stats == {
        "height": {"min": 6, "max": 6, "mean": 6.0},
        "width": {"min": 5, "max": 5, "mean": 5.0},
        "channels": {"1": 37},
        "formats": {"png": 37},
        "original": {"height": {"min": 6, "max": 6, "mean": 6.0},
                     "width": {"min": 5, "max": 5, "mean": 5.0}},
        "resize": {"short_side": 256, "quality": 90, "resized": 0},
        "high_depth": 0,
    }
    positions = []
    for shard, p in zip(m.shards, m.shard_paths(), strict=True):
        samples = list(iter_samples(p))
        assert [s.index for s in samples] == list(range(shard.start, shard.stop))
        for s in samples:
            assert s.key == f"{s.index:09d}" and s.ext == "png"
            pos = int(s.path.removeprefix("npz:images:"))
            positions.append(pos)
            assert s.label == source["labels"][pos]
            np.testing.assert_array_equal(decode(s), source["images"][pos])
    assert sorted(positions) == list(range(37))
    assert positions != list(range(37))  # shuffled
    assert sum(name.endswith(".cls") for name in member_names(m)) == 37
    assert read_manifest(m.root) == m
    verify_shards(m)
    assert not list(m.root.glob("*.tmp"))


@pytest.mark.parametrize("shape", [(4, 3, 3), (4, 3, 1)])
def test_npz_channels(tmp_path: Path, shape: tuple[int, ...]) -> None:
    src = make_npz(tmp_path / "c.npz", n=5, shape=shape, labeled=False)
    m = write_shards(src, tmp_path / "out", shard_size=2, progress=False)
    assert m.classes is None and not m.labeled
    assert m.image_stats["channels"] == {str(shape[2]): 5}
    images = np.load(src)["images"]
    for s in all_samples(m):
        expected = images[int(s.path.split(":")[-1])]
        np.testing.assert_array_equal(decode(s), expected.reshape(decode(s).shape))
        assert s.label is None


def test_deterministic(tmp_path: Path) -> None:
    src = make_npz(tmp_path / "d.npz")
    a = write_shards(src, tmp_path / "a", shard_size=10, seed=3, progress=False)
    b = write_shards(src, tmp_path / "b", shard_size=10, seed=3, progress=False)
    c = write_shards(src, tmp_path / "c", shard_size=10, seed=4, progress=False)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert a.identity == b.identity != c.identity
    assert [s.path for s in all_samples(a)] != [s.path for s in all_samples(c)]


def test_demo_npz_split(tmp_path: Path) -> None:
    m = write_shards(DEMO, tmp_path / "out", shard_size=1000, split="test", progress=False)
    assert m.n == 2000 and len(m.shards) == 2 and m.classes is not None
    assert m.classes[0] == "T-shirt/top" and m.classes[9] == "Ankle boot"
    first = next(iter_samples(m.shard_paths()[0]))
    assert first.path.startswith("npz:test:") and decode(first).shape == (28, 28)


def test_overwrites_own_shard_dir(tmp_path: Path) -> None:
    src = make_npz(tmp_path / "o.npz")
    out = tmp_path / "out"
    write_shards(src, out, shard_size=5, progress=False)
    (out / "notes.md").write_text("mine")
    m = write_shards(src, out, shard_size=20, progress=False)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.tar", "shard-000001.tar"]
    assert (out / "notes.md").read_text() == "mine"
    assert read_manifest(out) == m


# ------------------------------------------------------------------------- folders


def test_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "photos"
    save_image(src / "cat" / "a.png", "PNG")
    save_image(src / "cat" / "b.JPG", "JPEG")
    save_image(src / "cat" / "sub" / "c.bmp", "BMP", mode="L")
    save_image(src / "dog" / "d.jpeg", "JPEG", size=(12, 4))
    save_image(src / "dog" / "e.webp", "WEBP")
    (src / "dog" / "broken.jpg").write_bytes(np.random.default_rng(0).bytes(300))
    (src / "cat" / "notes.txt").write_text("not an image")
    (src / "cat" / ".DS_Store").write_bytes(b"hidden")
    m = write_shards(src, tmp_path / "shards", shard_size=2, progress=False)

    assert m.n == 5 and len(m.shards) == 3 and m.classes == ("cat", "dog")
    assert {s["path"]: s["error"] for s in m.skipped}.keys() == {"cat/notes.txt", "dog/broken.jpg"}
    reasons = {s["path"]: s["error"] for s in m.skipped}
    assert reasons["cat/notes.txt"] == "not an image extension"
    err = capsys.readouterr().err
    assert f"oocid: warning: skipped {src / 'dog' / 'broken.jpg'}:" in err
    assert "skipped 2 of 7 inputs" in err

    samples = {s.path: s for s in all_samples(m)}
    assert sorted(s.index for s in samples.values()) == list(range(5))
    assert {p: s.label for p, s in samples.items()} == {
        "cat/a.png": 0,
        "cat/b.JPG": 0,
        "cat/sub/c.bmp": 0,
        "dog/d.jpeg": 1,
        "dog/e.webp": 1,
    }
    assert {p: s.ext for p, s in samples.items()} == {
        "cat/a.png": "png",
        "cat/b.JPG": "jpg",
        "cat/sub/c.bmp": "png",  # re-encoded
        "dog/d.jpeg": "jpg",
        "dog/e.webp": "webp",
    }
    for p in ("cat/a.png", "cat/b.JPG", "dog/e.webp"):  # original bytes kept
        assert samples[p].image == (src / p).read_bytes()
    assert decode(samples["cat/sub/c.bmp"]).tolist() == [[77] * 9] * 7
    assert m.image_stats["height"] == {"min": 4, "max": 7, "mean": (7 * 4 + 4) / 5}
    assert m.image_stats["channels"] == {"1": 1, "3": 4}
    assert m.image_stats["formats"] == {"jpg": 2, "png": 2, "webp": 1}


def test_flat_folder_unlabeled(tmp_path: Path) -> None:
    src = tmp_path / "flat"
    for i in range(4):
        save_image(src / f"{i}.png", "PNG")
    m = write_shards(src, tmp_path / "out", shard_size=3, progress=False)
    assert m.classes is None and m.n == 4
    assert all(s.label is None for s in all_samples(m))
    assert not [name for name in member_names(m) if name.endswith(".cls")]


def test_all_unreadable(tmp_path: Path) -> None:
    src = tmp_path / "bad"
    src.mkdir()
    (src / "x.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(InputError, match="no readable images"):
        write_shards(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


# ------------------------------------------------------------------------- write errors


def test_write_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope"):
        write_shards(tmp_path / "nope", tmp_path / "o1", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no image files"):
        write_shards(tmp_path / "empty", tmp_path / "o2", progress=False)
    np.savez(tmp_path / "noimg.npz", pixels=np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(InputError, match=r"noimg.npz.*no 'images'"):
        write_shards(tmp_path / "noimg.npz", tmp_path / "o3", progress=False)
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 3, 3), np.float32))
    with pytest.raises(InputError, match="dtype float32"):
        write_shards(tmp_path / "f.npz", tmp_path / "o4", progress=False)
    np.savez(tmp_path / "l.npz", images=np.zeros((2, 3, 3), np.uint8), labels=np.zeros(3, int))
    with pytest.raises(InputError, match="'labels' must be"):
        write_shards(tmp_path / "l.npz", tmp_path / "o5", progress=False)
    src = make_npz(tmp_path / "ok.npz")
    with pytest.raises(InputError, match="shard size"):
        write_shards(src, tmp_path / "o6", shard_size=0, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.pdf").write_text("precious")
    with pytest.raises(InputError, match="refusing to overwrite"):
        write_shards(src, other, progress=False)
    assert (other / "thesis.pdf").read_text() == "precious"


# ------------------------------------------------------------------------- read errors


def test_read_manifest_errors(npz_shards: tuple[Path, Manifest]) -> None:
    _, m = npz_shards
    path = m.root / MANIFEST_NAME
    good = json.loads(path.read_text())
    with pytest.raises(InputError, match="no such shard folder"):
        read_manifest(m.root / "missing")
    with pytest.raises(InputError, match=re.escape(f"{m.shard_paths()[0]}: is a file, not a "
                                                   "shard folder")):
        read_manifest(m.shard_paths()[0])  # was "no such shard folder"
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"manifest.json: unreadable or invalid JSON"):
        read_manifest(m.root)
    bad_range = json.loads(json.dumps(good))
    bad_range["shards"][1]["start"] = 11
    path.write_text(json.dumps(bad_range))
    with pytest.raises(DataError, match=r"shards\[1\].*contiguity"):
        read_manifest(m.root)
    no_n = {k: v for k, v in good.items() if k != "n"}
    path.write_text(json.dumps(no_n))
    with pytest.raises(DataError, match="missing key 'n'"):
        read_manifest(m.root)
    path.write_text(json.dumps(good))
    m.shard_paths()[2].unlink()
    with pytest.raises(DataError, match=r"shard-000002.tar: shard listed in .* is missing"):
        read_manifest(m.root)
    path.unlink()
    with pytest.raises(InputError, match=r"manifest.json: missing"):
        read_manifest(m.root)


def test_verify_detects_changed_shard(npz_shards: tuple[Path, Manifest]) -> None:
    """One bit changed in shards 1 and 3 of 4 (hashed in parallel): the first is named."""
    _, m = npz_shards
    verify_shards(m, progress=True)
    for p in (m.shard_paths()[3], m.shard_paths()[1]):
        data = bytearray(p.read_bytes())
        data[700] ^= 0x01
        p.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-000001.tar: sha256 does not match the manifest "
                                         r"\(the shard changed after `oocid shard`\)"):
        verify_shards(m)


def test_truncated_tar(npz_shards: tuple[Path, Manifest]) -> None:
    _, m = npz_shards
    p = m.shard_paths()[0]
    data = p.read_bytes()
    with tarfile.open(p) as tar:
        boundary = tar.getmembers()[6].offset  # header of sample 2's first member
    for cut in (len(data) // 2, boundary):
        p.write_bytes(data[:cut])
        with pytest.raises(DataError, match=r"shard-000000.tar: .*truncated"):
            list(iter_samples(p))
    p.write_bytes(b"")
    with pytest.raises(DataError, match=r"shard-000000.tar"):
        list(iter_samples(p))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("junk", [b"\x80" * 512, bytes(range(256)) * 2, b"\xff" + b"7" * 511])
def test_damage_inside_a_shard_of_unchanged_size_is_not_called_truncated(
        tmp_path: Path, fmt: int, junk: bytes) -> None:
    """512 bytes overwritten over the third member's header (the file keeps its size): the
    error says damaged, where, after which member, and points at --verify-checksums; in the
    plain reader and in tarfile's (pax). A first byte 0x80 / 0xff reads as a base-256 number,
    which once sent the shard to tarfile and came back as "truncated"."""
    p = tmp_path / "shard-000000.tar"
    with tarfile.open(p, "w", format=fmt) as tar:
        for i in range(3):
            for ext, data in (("png", b"img"), ("json", b'{"index": %d}' % i)):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(p) as tar:
        third = tar.getmembers()[2]
        at, after = third.offset, tar.getmembers()[1].name
    data = bytearray(p.read_bytes())
    data[at:at + 512] = junk
    p.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        list(iter_samples(p))
    msg = str(e.value)
    assert "truncated" not in msg, msg
    assert msg.startswith(f"{p}: damaged tar: ") and "--verify-checksums" in msg, msg
    if fmt == tarfile.USTAR_FORMAT:  # tarfile's reader tells no more than that it stopped
        assert f"at byte {at} (after member {after})" in msg, msg


def test_sample_missing_member(tmp_path: Path) -> None:
    p = tmp_path / "shard-000000.tar"
    with tarfile.open(p, "w") as tar:
        for name, data in (
            ("000000000.png", b"x"),
            ("000000000.json", b"{}"),
            ("000000001.png", b"y"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"shard-000000.tar: sample 000000000: bad json"):
        list(iter_samples(p))
    with tarfile.open(p, "w") as tar:
        info = tarfile.TarInfo("000000001.png")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match="sample 000000001: expected one image and one json"):
        list(iter_samples(p))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


KEYS = ["n", "shard_size", "shards", "classes", "identity", "seed", "skipped", "format"]


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    root = tmp_path_factory.mktemp("fuzz")
    return write_shards(make_npz(root / "f.npz", n=4), root / "s", shard_size=3, progress=False)


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(KEYS), value=JSON, whole=JSON)
def test_read_manifest_fuzz(small_shards: Manifest, key: str, value: object, whole: object) -> None:
    """Any JSON content gives a valid Manifest or an OocidError, never another exception."""
    path = small_shards.root / MANIFEST_NAME
    good = json.loads(path.read_text())
    try:
        for obj in ({**good, key: value}, whole):
            path.write_text(json.dumps(obj))
            try:
                read_manifest(small_shards.root)
            except OocidError:
                pass
    finally:
        path.write_text(json.dumps(good))


def test_demo_npz_bundled() -> None:
    with np.load(DEMO) as z:
        assert z["train_images"].shape == (10000, 28, 28) and z["train_images"].dtype == np.uint8
        assert z["test_images"].shape == (2000, 28, 28) and z["test_images"].dtype == np.uint8
        assert z["train_labels"].dtype == np.int64 and z["test_labels"].dtype == np.int64
        assert np.bincount(z["train_labels"]).tolist() == [1000] * 10
        assert np.bincount(z["test_labels"]).tolist() == [200] * 10
        assert z["class_names"].tolist()[::9] == ["T-shirt/top", "Ankle boot"]
    assert DEMO.stat().st_size < 8_000_000


# ------------------------------------------------------------------------- resize option


def photo(size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth gradient with a block and noise (w, h) = size."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    a = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1) + rng.normal(0, 6, (h, w, 3))
    a[h // 3:h // 2, w // 4:w // 2] = (250, 20, 40)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert(mode)


def test_large_images_are_stored_resized(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    photo((600, 400)).save(src / "a" / "wide.jpg", quality=95)
    photo((300, 700), 1).save(src / "b" / "tall.png")  # lossless source, large: JPEG too
    photo((520, 260), 2, "L").save(src / "b" / "gray.jpg", quality=95)
    photo((200, 150), 3).save(src / "a" / "small.jpg", quality=95)
    photo((32, 32), 4).save(src / "a" / "tiny.png")
    photo((256, 900), 5).save(src / "a" / "edge.jpg", quality=95)  # shorter side = 256: kept
    m = write_shards(src, tmp_path / "out", shard_size=4, progress=False)
    got = {s.path: s for s in all_samples(m)}
    assert sorted(s.index for s in got.values()) == list(range(6))
    assert {p: s.label for p, s in got.items()} == {
        "a/edge.jpg": 0, "a/small.jpg": 0, "a/tiny.png": 0, "a/wide.jpg": 0,
        "b/gray.jpg": 1, "b/tall.png": 1}
    sizes = {p: Image.open(io.BytesIO(s.image)).size for p, s in got.items()}
    assert sizes["a/wide.jpg"] == (384, 256)  # aspect kept: int(256 * 600 / 400)
    assert sizes["b/tall.png"] == (256, 597)  # int(256 * 700 / 300)
    assert sizes["b/gray.jpg"] == (512, 256)
    assert {p: (s.ext, Image.open(io.BytesIO(s.image)).mode) for p, s in got.items()
            if p in ("a/wide.jpg", "b/tall.png", "b/gray.jpg")} == {
        "a/wide.jpg": ("jpg", "RGB"), "b/tall.png": ("jpg", "RGB"), "b/gray.jpg": ("jpg", "L")}
    for p in ("a/small.jpg", "a/tiny.png", "a/edge.jpg"):  # not larger: byte for byte
        assert got[p].image == (src / p).read_bytes()
    # the same picture, scaled: compare with a plain resize of the source
    want = np.asarray(Image.open(src / "a" / "wide.jpg").convert("RGB").resize((384, 256)), float)
    assert np.abs(decode(got["a/wide.jpg"]).astype(float) - want).mean() < 3
    st = m.image_stats
    assert st["resize"] == {"short_side": 256, "quality": 90, "resized": 3}
    assert st["original"]["height"] == {"min": 32, "max": 900, "mean": (400 + 700 + 260 + 150 + 32 + 900) / 6}
    assert st["original"]["width"]["max"] == 600
    assert st["height"]["max"] == 900 and st["width"]["max"] == 512 and st["channels"] == {"1": 1, "3": 5}
    assert read_manifest(m.root).image_stats == st
    assert json.loads((m.root / MANIFEST_NAME).read_text())["image_stats"]["resize"]["resized"] == 3


def test_resize_disabled_keeps_every_byte(tmp_path: Path) -> None:
    src = tmp_path / "flat"
    src.mkdir()
    photo((640, 480)).save(src / "big.jpg", quality=92)
    photo((300, 280), 1).save(src / "big.png")
    m = write_shards(src, tmp_path / "out", short_side=0, progress=False)
    for s in all_samples(m):
        assert s.image == (src / s.path).read_bytes()
    assert m.image_stats["resize"] == {"short_side": 0, "quality": 90, "resized": 0}
    assert m.image_stats["original"] == {k: m.image_stats[k] for k in ("height", "width")}


def test_resize_options_checked_and_npz_resized(tmp_path: Path) -> None:
    src = tmp_path / "big.npz"
    np.savez(src, images=np.stack([np.asarray(photo((80, 60), k)) for k in range(3)]))
    with pytest.raises(InputError, match="short side"):
        write_shards(src, tmp_path / "x", short_side=-1, progress=False)
    with pytest.raises(InputError, match="quality"):
        write_shards(src, tmp_path / "x", quality=0, progress=False)
    m = write_shards(src, tmp_path / "out", short_side=30, quality=80, progress=False)
    assert {Image.open(io.BytesIO(s.image)).size for s in all_samples(m)} == {(40, 30)}
    assert m.image_stats["resize"] == {"short_side": 30, "quality": 80, "resized": 3}
    assert m.image_stats["original"]["width"] == {"min": 80, "max": 80, "mean": 80.0}


def test_cli_short_side_option(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from oocid.cli.app import app
    from oocid.data.sources import DEFAULT_QUALITY, DEFAULT_SHORT_SIDE

    src = tmp_path / "flat"
    src.mkdir()
    photo((400, 300)).save(src / "a.jpg", quality=95)
    runner = CliRunner()
    res = runner.invoke(app, ["shard", str(src), str(tmp_path / "d"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert read_manifest(tmp_path / "d").image_stats["resize"] == {
        "short_side": DEFAULT_SHORT_SIDE, "quality": DEFAULT_QUALITY, "resized": 1}
    res = runner.invoke(app, ["shard", str(src), str(tmp_path / "k"), "--short-side", "0",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    (s,) = all_samples(read_manifest(tmp_path / "k"))
    assert s.image == (src / "a.jpg").read_bytes()


@pytest.mark.parametrize("short_side", [0, 8], ids=["kept-size", "resized"])
def test_exif_orientation_is_applied_when_sharding(tmp_path: Path, short_side: int) -> None:
    """A 30 x 20 (w x h) JPEG tagged orientation 6 (shown rotated 90 degrees) is stored upright:
    20 wide, 30 high (resized: 8 x 12), its left column (red) on top; an untagged one as is."""
    src = tmp_path / "imgs"
    src.mkdir()
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:, :6] = (255, 0, 0)  # left edge red: after a 90-degree clockwise turn, the top
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(src / "a.jpg", quality=95, exif=exif.tobytes())
    Image.fromarray(pixels).save(src / "b.jpg", quality=95)
    m = write_shards(src, tmp_path / "out", short_side=short_side, progress=False)
    by_path = {Path(s.path).name: s for s in all_samples(m)}
    up = Image.open(io.BytesIO(by_path["a.jpg"].image))
    assert up.size == ((20, 30) if short_side == 0 else (8, 12))
    assert up.getexif().get(0x0112, 1) == 1  # nothing left to turn it again
    top = np.asarray(up.convert("RGB"))[0].mean(axis=0)
    assert top[0] > 200 and top[1] < 60, top
    assert Image.open(io.BytesIO(by_path["b.jpg"].image)).size == ((30, 20) if short_side == 0
                                                                   else (12, 8))


def test_skip_lines_name_the_file_not_a_buffer(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A file with an image name but no image inside: the skip line and the manifest name the
    file and say why, never Pillow's `<_io.BytesIO object at 0x...>`."""
    src = tmp_path / "src"
    src.mkdir()
    Image.new("L", (8, 8), 50).save(src / "good.png")
    (src / "fake.jpg").write_bytes(b"not an image at all")
    m = write_shards(src, tmp_path / "out", shard_size=4, progress=False)
    err = capsys.readouterr().err
    assert "fake.jpg" in err and "BytesIO" not in err
    assert [s["error"] for s in m.skipped] == ["not an image format Pillow can read"]


def test_a_decompression_bomb_warning_names_its_file(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow warns of images over MAX_IMAGE_PIXELS without naming them: one line naming the
    file instead, and the image is still sharded (only twice the limit is refused)."""
    src = tmp_path / "src"
    src.mkdir()
    Image.new("L", (40, 40), 50).save(src / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 pixels: over, not twice over
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a raw warning escaping would fail the test
        m = write_shards(src, tmp_path / "out", shard_size=4, progress=False)
    err = [ln for ln in capsys.readouterr().err.splitlines() if "big.png" in ln]
    assert m.n == 1 and len(err) == 1 and "decompression bomb" in err[0].lower()
    Image.new("L", (40, 60), 50).save(src / "huge.png")  # 2,400 pixels: over twice the limit
    m = write_shards(src, tmp_path / "out2", shard_size=4, progress=False)
    err = [ln for ln in capsys.readouterr().err.splitlines() if "huge.png" in ln]
    assert m.n == 1 and len(err) == 1 and err[0].endswith(
        "(Pillow's limit; make the image smaller first)"), err
