"""`knn --query` reads its images as `oocid shard` stores them: turned upright by their EXIF
orientation, 16-bit and float pixels scaled to 8 bits, the same image extensions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from helpers import tiny_config, tiny_npz
from PIL import Image

from oocid.data.writer import write_shards
from oocid.eval.retrieval import TrainingSide, embed_images, load_queries, query_files
from oocid.models import build_model


def side(tmp_path: Path) -> TrainingSide:
    """A random small model over tiny 16 x 16 grayscale shards (only the manifest is read)."""
    cfg = tiny_config()
    m = write_shards(tiny_npz(tmp_path / "t.npz", n=8), tmp_path / "sh", progress=False)
    torch.manual_seed(0)
    model = build_model("small", 1, 128)
    return TrainingSide(tmp_path / "none.pt", cfg, model, torch.device("cpu"), m, None, False)


def test_a_query_jpeg_with_orientation_6_gives_the_features_of_its_upright_copy(
        tmp_path: Path) -> None:
    """A phone photo: stored sideways (48 x 32), tagged orientation 6 (shown turned 90 degrees
    clockwise). Its query image is 32 x 48 like its upright copy, and its features match the
    copy's (JPEG quality 100 of a smooth image), not those of the sideways pixels."""
    yy, xx = np.mgrid[0:48, 0:32]
    upright = np.clip(xx * 6 + yy * 2, 0, 255).astype(np.uint8)  # 32 wide, 48 high
    sideways = np.rot90(upright, k=1).copy()  # stored as the camera saw it: 48 x 32
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(sideways).save(tmp_path / "phone.jpg", quality=100, exif=exif.tobytes())
    Image.fromarray(upright).save(tmp_path / "up.jpg", quality=100)
    Image.fromarray(sideways).save(tmp_path / "side.jpg", quality=100)
    files = [tmp_path / n for n in ("phone.jpg", "up.jpg", "side.jpg")]
    kept, images = load_queries(files, 1, files)
    assert kept == files
    assert images[0].size == images[1].size == (32, 48)
    diff = np.abs(np.asarray(images[0], np.int64) - np.asarray(images[1], np.int64))
    assert diff.max() <= 3, diff.max()
    f = embed_images(side(tmp_path), images)
    assert float(f[0] @ f[1]) > 0.999
    assert float(f[0] @ f[2]) < float(f[0] @ f[1]) - 1e-3  # the sideways image is another


def test_query_folders_take_the_image_extensions_oocid_shard_takes(tmp_path: Path) -> None:
    """.jfif and .jpe are JPEGs, .pgm a Netpbm image: found in a query folder and decoded;
    a 16-bit PGM is scaled to 8 bits; a .txt is left out."""
    q = tmp_path / "q"
    q.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(q / "a.jfif", format="JPEG")
    Image.new("RGB", (8, 8), (10, 200, 10)).save(q / "b.jpe", format="JPEG")
    (q / "c.pgm").write_bytes(b"P5 4 4 65535\n" + np.full(16, 51400, ">u2").tobytes())
    (q / "notes.txt").write_text("no image")
    files = query_files([q])
    assert [f.name for f in files] == ["a.jfif", "b.jpe", "c.pgm"]
    kept, images = load_queries(files, 1, [q])
    assert kept == files
    assert np.asarray(images[2]).tolist() == [[200] * 4] * 4  # 51400 / 257
