"""Decoding to 8 bits: 16-bit and float images are scaled by one rule (`decode.to_8bit`) on
every path (in memory, streamed, lazily streamed, queries, and the images `oocid shard`
re-encodes); a user's file is turned upright by its EXIF orientation as `oocid shard` does."""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oocid.data.decode import decode_file, decode_image, load_image, open_image, to_8bit
from oocid.data.manifest import MANIFEST_NAME, read_manifest
from oocid.data.memory import decode_all
from oocid.data.reader import iter_samples
from oocid.data.stream import DecodeFixed
from oocid.data.writer import write_shards
from oocid.errors import DataError

RAMP16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value once
RAMP_F = (np.arange(256 * 256, dtype=np.float32) / (256 * 256 - 1)).reshape(256, 256)


def saved(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png16(a: np.ndarray) -> bytes:
    """A 16-bit PNG of (H, W) gray or (H, W, 3|4) colour values, written by hand (Pillow writes
    16-bit gray only)."""
    h, w = a.shape[:2]
    kind = {2: 0, 3: 2}[a.ndim] if a.ndim == 2 or a.shape[2] == 3 else 6
    raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, kind, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def pgm16(a: np.ndarray) -> bytes:
    return f"P5 {a.shape[1]} {a.shape[0]} 65535\n".encode() + a.astype(">u2").tobytes()


SIXTEEN = {
    "png I;16": lambda: saved(Image.fromarray(RAMP16), "PNG"),
    "tiff I;16": lambda: saved(Image.fromarray(RAMP16), "TIFF"),
    "pgm (mode I)": lambda: pgm16(RAMP16),
    "tiff I (32-bit)": lambda: saved(Image.fromarray(RAMP16.astype(np.int32)), "TIFF"),
}


@pytest.mark.parametrize("name", list(SIXTEEN))
@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_ramp_decodes_to_the_8_bit_ramp(name: str, channels: int) -> None:
    """Every 16-bit value v gives round(v / 257): the whole range, not the lowest 1/256 of it
    (clipped, 99.6% of the ramp was 255)."""
    data = SIXTEEN[name]()
    mode = open_image(data).mode
    assert mode in ("I;16", "I;16B", "I"), mode
    got = np.asarray(decode_image(data, channels)).astype(np.int64)
    want = np.rint(RAMP16 / 257).astype(np.int64)
    if channels == 3:
        assert got.shape == (256, 256, 3) and (got == got[:, :, :1]).all()
        got = got[:, :, 0]
    assert np.array_equal(got, want)
    assert (got == 255).mean() < 0.005 and np.abs(got - RAMP16 / 257).max() <= 0.5


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N", "I"])
def test_every_16_bit_mode_follows_the_rule(mode: str) -> None:
    """The modes no file here decodes to (I;16B, I;16L, I;16N) as well: built in memory."""
    img = Image.new(mode, (256, 256))
    img.putdata(RAMP16.ravel().tolist())
    assert np.array_equal(np.asarray(to_8bit(img)), np.rint(RAMP16 / 257).astype(np.uint8))


def test_16_bit_colour_pngs_are_read_as_8_bit_by_pillow_within_1() -> None:
    """Pillow reads a 16-bit RGB(A) PNG as 8-bit (the high byte): within 1 of v / 257."""
    for bands in (3, 4):
        a = np.repeat(RAMP16[..., None], bands, axis=2)
        got = np.asarray(decode_image(png16(a), 3)).astype(np.int64)
        assert got.shape == (256, 256, 3)
        assert np.abs(got - np.rint(RAMP16 / 257)[..., None]).max() <= 1


def test_float_images_in_0_1_are_scaled_and_others_clipped() -> None:
    """A float ramp over [0, 1] gives round(255 v) (it was all 0 or 1: black); a float image
    outside [0, 1] is clipped to 0..255 and rounded; NaN gives 0."""
    got = np.asarray(decode_image(saved(Image.fromarray(RAMP_F), "TIFF"), 1)).astype(np.int64)
    assert np.array_equal(got, np.rint(RAMP_F.astype(np.float64) * 255))
    assert got.max() == 255 and np.abs(got - RAMP_F * 255).max() <= 0.5
    wide = np.array([[-20.0, 0.4, 1.6, 100.2], [254.6, 300.0, np.nan, 7.0]], np.float32)
    got = np.asarray(decode_image(saved(Image.fromarray(wide), "TIFF"), 1))
    assert got.tolist() == [[0, 0, 2, 100], [255, 255, 0, 7]]


def test_every_decode_path_gives_the_same_8_bit_pixels(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """16-bit PNGs (stored as given) and a float TIFF (re-encoded by `oocid shard`): the
    in-memory decode, the streamed one (DecodeFixed, per-sample decode_image) and the lazy
    one (load_image on open_image) give the same pixels, those of the rule; `oocid shard`
    counts them in image_stats and says so in one warning."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    want = {}
    for i in range(3):
        a = rng.integers(0, 65536, (12, 12), dtype=np.uint16)
        (src / f"d{i}.png").write_bytes(saved(Image.fromarray(a), "PNG"))
        want[f"d{i}.png"] = np.rint(a / 257).astype(np.uint8)
    f = rng.random((12, 12), dtype=np.float32)
    Image.fromarray(f).save(src / "f.tif")
    want["f.tif"] = np.rint(f.astype(np.float64) * 255).astype(np.uint8)
    Image.fromarray(want["d0.png"]).save(src / "plain.png")  # already 8-bit: not counted
    want["plain.png"] = want["d0.png"]
    m = write_shards(src, tmp_path / "out", shard_size=2, progress=False)
    err = capsys.readouterr().err
    assert m.image_stats["high_depth"] == 4
    lines = [ln for ln in err.splitlines() if "16-bit or floating-point" in ln]
    assert len(lines) == 1 and "4 images have" in lines[0], err
    memory, _, valid = decode_all(m, 1)
    assert valid.all()
    fixed = DecodeFixed(1, 12, 12)
    for path in m.shard_paths():
        for s in iter_samples(path):
            expect = want[s.path]
            assert np.array_equal(memory[s.index, 0], expect), s.path
            assert np.array_equal(fixed(s.image)[0].numpy(), expect), s.path
            assert np.array_equal(np.asarray(decode_image(s.image, 1)), expect), s.path
            lazy, _ = load_image(open_image(s.image), 1, (12, 12))
            assert np.array_equal(np.asarray(lazy), expect), s.path


def test_a_user_file_is_turned_upright_by_its_exif_orientation() -> None:
    """A 30 x 20 (w x h) PNG tagged orientation 6 is shown turned 90 degrees clockwise:
    decode_file gives that (20 x 30, its left column on top), decode_image (shards, stored
    upright already) the pixels as stored; an invalid orientation is ignored."""
    a = np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", exif=exif.tobytes())
    got = np.asarray(decode_file(buf.getvalue(), 1))
    assert np.array_equal(got, np.rot90(a, k=-1))
    assert np.array_equal(np.asarray(decode_image(buf.getvalue(), 1)), a)
    exif[0x0112] = 42
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", exif=exif.tobytes())
    assert np.array_equal(np.asarray(decode_file(buf.getvalue(), 1)), a)


def test_an_empty_file_is_called_empty() -> None:
    with pytest.raises(OSError, match=r"^empty file \(0 bytes\)$"):
        open_image(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(OSError, match="empty file"):
            decode_file(b"", 3)


def test_the_high_depth_count_is_read_back_and_checked(tmp_path: Path) -> None:
    """image_stats "high_depth" reads back; a manifest from before it (no key) still reads; a
    negative or non-integer count is a DataError."""
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(RAMP16[:8, :8]).save(src / "a.png")
    m = write_shards(src, tmp_path / "out", progress=False)
    assert read_manifest(m.root).image_stats["high_depth"] == 1
    path = m.root / MANIFEST_NAME
    good = json.loads(path.read_text())
    del good["image_stats"]["high_depth"]
    path.write_text(json.dumps(good))
    assert "high_depth" not in read_manifest(m.root).image_stats
    for bad in (-1, 1.5, "1"):
        path.write_text(json.dumps({**good, "image_stats": {**good["image_stats"], "high_depth": bad}}))
        with pytest.raises(DataError, match="image_stats"):
            read_manifest(m.root)


def test_16_bit_images_oocid_shard_resizes_or_turns_are_scaled_first(tmp_path: Path) -> None:
    """The images `oocid shard` re-encodes: a 16-bit PNG over --short-side (resized to a JPEG)
    and a 16-bit TIFF with an EXIF orientation (turned, stored as PNG) keep their brightness."""
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((40, 60), 40000, np.uint16)).save(src / "big.png")
    turned = np.full((10, 20), 20560, np.uint16)  # 80 * 257
    turned[:, :4] = 0
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(turned).save(src / "t.tif", exif=exif.tobytes())
    m = write_shards(src, tmp_path / "out", short_side=16, progress=False)
    got = {s.path: np.asarray(decode_image(s.image, 1)) for s in iter_samples(m.shard_paths()[0])}
    assert got["big.png"].shape == (16, 24)
    assert np.abs(got["big.png"].astype(int) - 156).max() <= 1  # 40000 / 257 = 155.6
    assert got["t.tif"].shape == (20, 10)
    assert (got["t.tif"][:4] == 0).all() and (got["t.tif"][4:] == 80).all()  # left edge on top
    assert m.image_stats["high_depth"] == 2


@pytest.mark.parametrize("name, bits", [("p16.png", 16), ("p8.png", 8), ("t16.tif", 16),
                                        ("t8.tif", 8), ("j8.jpg", 8)])
@pytest.mark.parametrize("wide", [40, 400])  # under --short-side 64 (turned), over (resized)
def test_shard_and_query_turn_every_format_and_depth_upright_alike(
        tmp_path: Path, name: str, bits: int, wide: int) -> None:
    """An image tagged orientation 6 (shown turned 90 degrees clockwise) with a bright left
    edge: stored by `oocid shard` and read as a query, it is upright (the edge on top) and
    the same shape. Pillow turns a TIFF itself as it loads it, a PNG or JPEG not; a 16-bit
    image used to lose its tag on the way to 8 bits."""
    a = np.zeros((wide // 2, wide), np.uint16 if bits == 16 else np.uint8)
    a[:, : wide // 10] = 60000 if bits == 16 else 233
    exif = Image.Exif()
    exif[0x0112] = 6
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(a).save(src / name, exif=exif.tobytes())
    m = write_shards(src, tmp_path / "out", short_side=64, progress=False)
    stored = np.asarray(decode_image(next(iter_samples(m.shard_paths()[0])).image, 1), float)
    query = np.asarray(decode_file((src / name).read_bytes(), 1), float)
    for got in (stored, query):
        h, w = got.shape
        assert h == 2 * w  # upright: taller than wide
        assert got[: h // 20].mean() > 200 and got[h // 5:].mean() < 30, name  # edge on top
