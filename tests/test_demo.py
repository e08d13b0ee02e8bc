"""`oocid demo` end to end at one epoch: the numbers it reports and the two pictures it names."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from oocid.demo import format_demo, run_demo
from oocid.eval.retrieval import sheet_size


def test_demo_writes_its_numbers_and_pictures(tmp_path: Path) -> None:
    res = run_demo(tmp_path / "demo", epochs=1, progress=False, say=lambda m: None)
    for key in ("learned_top1", "learned_bank_top1", "untrained_top1", "pixels_top1",
                "pixels_centered_top1"):
        assert 0.1 < res[key] <= 1.0, (key, res[key])  # 10 classes: chance is 0.1
    curve, sheet = (Path(p) for p in res["pictures"])
    assert curve.name == "learning_curve.png" and sheet.name == "neighbours.png"
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.size == sheet_size(10, 9, 56)  # a query + 8, per class
    with Image.open(curve) as im:
        assert im.format == "PNG"
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["pictures"] == res["pictures"]
    text = format_demo(res)
    assert f"picture: {sheet}" in text and f"picture: {curve}" in text
