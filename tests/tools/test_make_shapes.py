"""tools/make_shapes.py: the mixed-size colour set the no-config recipe was measured on."""

from __future__ import annotations

from pathlib import Path

from helpers import load_tool
from PIL import Image


def test_layout_sizes_formats_and_the_same_files_for_a_seed(tmp_path: Path) -> None:
    tool = load_tool("make_shapes")
    tool.main([str(tmp_path / "a"), "--train", "6", "--val", "2"])
    tool.make_shapes(tmp_path / "b", 6, 2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert len(files) == 5 * (6 + 2)
    assert {p.parts[0] for p in files} == {"train", "val"}
    assert {p.parts[1] for p in files} == set(tool.CLASSES)
    assert {p.suffix for p in files} == {".png", ".jpg"}
    sizes = set()
    for p in files:
        assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes()
        with Image.open(tmp_path / "a" / p) as im:
            assert im.mode == "RGB"
            sizes.add(im.size)
    assert sizes <= set(tool.SIZES) and len(sizes) > 1  # mixed sizes, from the five
    tool.make_shapes(tmp_path / "c", 6, 2, seed=1)
    assert (tmp_path / "c" / files[0]).read_bytes() != (tmp_path / "a" / files[0]).read_bytes()
