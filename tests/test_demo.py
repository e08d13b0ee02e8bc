"""`oocid demo` end to end at one epoch: the numbers it reports and the two pictures it names."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from oocid.config import demo_config
from oocid.demo import DEFAULT_TOP1, format_demo, run_demo
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


def _result(epochs: int) -> dict[str, object]:
    return {"k": 200, "temperature": 0.07, "test_images": 2000, "learned_top1": 0.651,
            "learned_bank_top1": 0.6, "untrained_top1": 0.678, "pixels_top1": 0.743,
            "pixels_centered_top1": 0.799, "epochs": epochs, "train_seconds": 9.0,
            "total_seconds": 12.0}


def test_a_short_demo_says_it_is_not_the_methods_result() -> None:
    """Fewer epochs than the demo's default: one line naming the default run's number (the
    README's table); the default run has no such line; one epoch is singular."""
    full = demo_config().optim.epochs
    short = format_demo(_result(5)).splitlines()
    assert short[-2] == "  trained 5 epochs in 9.0 s; total 12.0 s"
    assert short[-1] == (f"  5 of the demo's {full} epochs: a short run learns less; the default run "
                         f"gives {DEFAULT_TOP1:.3f}")
    assert "  trained 1 epoch in 9.0 s; total 12.0 s" in format_demo(_result(1)).splitlines()
    assert "too few" not in format_demo(_result(full))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert re.search(rf"learned features \(NPID\) +{DEFAULT_TOP1:.3f}\n", readme)
