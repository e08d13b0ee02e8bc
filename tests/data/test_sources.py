"""What `oocid shard` takes from a folder: the image extensions, the folders it leaves out
(hidden ones, `__MACOSX`, empty class folders) and how its summary counts what it skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import ENV, oocid_argv, run_process
from PIL import Image

from oocid.data.manifest import IMAGE_EXTS
from oocid.data.reader import iter_samples
from oocid.data.writer import write_shards
from oocid.errors import InputError


def gray(path: Path, value: int = 90, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path, format=fmt)


def test_jfif_jpe_and_netpbm_files_are_images(tmp_path: Path) -> None:
    """.jfif and .jpe are JPEG names, .pbm/.pgm/.ppm/.pnm Netpbm ones: all sharded (the JPEGs
    as given, the Netpbm ones re-encoded to PNG), none skipped."""
    src = tmp_path / "src"
    gray(src / "a.jfif", 10, "JPEG")
    gray(src / "b.jpe", 20, "JPEG")
    gray(src / "c.pgm", 30, "PPM")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(src / "d.ppm")
    Image.new("1", (8, 8), 1).save(src / "e.pbm")
    gray(src / "f.pnm", 40, "PPM")
    assert {".jfif", ".jpe", ".pbm", ".pgm", ".ppm", ".pnm"} <= IMAGE_EXTS
    m = write_shards(src, tmp_path / "out", progress=False)
    assert m.n == 6 and m.skipped == ()
    exts = {s.path: s.key for s in iter_samples(m.shard_paths()[0])}
    assert set(exts) == {"a.jfif", "b.jpe", "c.pgm", "d.ppm", "e.pbm", "f.pnm"}
    assert m.image_stats["formats"] == {"jpg": 2, "png": 4}


def test_macosx_folders_are_left_out_and_empty_classes_skipped_with_a_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A macOS zip's `__MACOSX` folder is left out as hidden folders are; a class folder with no
    image (empty, or only a non-image file) is left out with one warning naming it, and the
    classes are the other folders, labelled in their sorted order."""
    src = tmp_path / "src"
    for c in ("ant", "cat"):
        for i in range(2):
            gray(src / c / f"{i}.png", 40 * i)
    (src / "bee").mkdir()
    (src / "dog").mkdir()
    (src / "dog" / "readme.txt").write_text("soon")
    gray(src / "__MACOSX" / "ant" / "._0.png")  # resource forks: would be class "__MACOSX"
    gray(src / ".git" / "x.png")
    m = write_shards(src, tmp_path / "out", progress=False)
    err = capsys.readouterr().err.splitlines()
    assert m.classes == ("ant", "cat") and m.n == 4
    labels = {s.path: s.label for s in iter_samples(m.shard_paths()[0])}
    assert labels == {"ant/0.png": 0, "ant/1.png": 0, "cat/0.png": 1, "cat/1.png": 1}
    for c in ("bee", "dog"):
        lines = [ln for ln in err if f"{src / c}: class folder has no image files" in ln]
        assert len(lines) == 1 and lines[0].startswith("oocid: warning: "), err
    assert not any("__MACOSX" in ln for ln in err), err
    assert [s["path"] for s in m.skipped] == ["dog/readme.txt"]


def test_a_source_whose_class_folders_are_all_empty_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    with pytest.raises(InputError, match="no image files found"):
        write_shards(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_shard_summary_tells_skipped_names_from_unreadable_images(tmp_path: Path) -> None:
    """A .txt is skipped for its name ("not an image extension"), a zero-byte .jpg as an empty
    file, a broken .png as unreadable; the summary counts the kinds apart; one class, one
    shard and one sample are said in the singular."""
    src = tmp_path / "src"
    gray(src / "only" / "a.png")
    (src / "only" / "notes.txt").write_text("x")
    (src / "only" / "zero.jpg").write_bytes(b"")
    (src / "only" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    res = run_process(oocid_argv("shard", str(src), str(tmp_path / "out"), "--no-progress"),
                      [], ENV)
    assert res.rc == 0, res
    assert f"skipped {src / 'only' / 'notes.txt'}: not an image extension" in res.err, res
    assert f"skipped {src / 'only' / 'zero.jpg'}: empty file (0 bytes)" in res.err, res
    assert "skipped 3 of 4 inputs: 2 unreadable, 1 without an image extension" in res.err, res
    assert res.out.strip() == (f"wrote 1 sample in 1 shard to {tmp_path / 'out'}, 1 class; "
                               "skipped 2 unreadable, 1 without an image extension"), res


def test_shard_warns_once_of_16_bit_images(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 30000 + i, np.uint16)).save(src / f"{i}.png")
    gray(src / "c.png")
    res = run_process(oocid_argv("shard", str(src), str(tmp_path / "out"), "--no-progress"),
                      [], ENV)
    assert res.rc == 0, res
    lines = [ln for ln in res.err.splitlines() if "16-bit" in ln]
    assert lines == ["oocid: warning: 2 images have 16-bit or floating-point pixels; they are "
                     "read as 8-bit (16-bit values / 257, floats in [0, 1] x 255, other floats "
                     "clipped to 0..255)"], res
