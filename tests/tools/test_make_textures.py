"""tools/make_textures.py: the colour textures the no-config recipe was measured on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import load_tool
from PIL import Image


def test_layout_sizes_and_the_same_files_for_a_seed(tmp_path: Path) -> None:
    tool = load_tool("make_textures")
    tool.main([str(tmp_path / "a"), "--train", "4", "--val", "2"])
    tool.make_textures(tmp_path / "b", 4, 2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 7 * (4 + 2)
    assert {p.parts[1] for p in files} == set(tool.CLASSES)
    sizes = set()
    for p in files:
        assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes()
        with Image.open(tmp_path / "a" / p) as im:
            assert im.mode == "RGB" and im.width == im.height and 40 <= im.width <= 64
            sizes.add(im.width)
            assert np.asarray(im).std() > 5, p  # a pattern or noise, not a flat colour
    assert len(sizes) > 3
    tool.make_textures(tmp_path / "c", 4, 2, seed=1)
    assert (tmp_path / "c" / files[0]).read_bytes() != (tmp_path / "a" / files[0]).read_bytes()
