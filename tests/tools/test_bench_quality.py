"""tools/bench_quality.py at toy size: the demo set measured for both recipes, a missing
Fashion-MNIST folder skipped with its reason, the table, the PNG and the JSON last line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import load_tool
from PIL import Image


def test_toy_run_measures_or_skips_every_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    tool = load_tool("bench_quality")
    png = tmp_path / "q.png"
    assert tool.main(["--toy", "--sets", "demo,fmnist", "--threads", "1", "--budget-s", "30",
                      "--fmnist-dir", str(tmp_path / "absent"), "--out", str(png)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = json.loads(out[-1])
    measured = [r for r in rows if "skipped" not in r]
    skipped = {r["set"]: r["skipped"] for r in rows if "skipped" in r}
    assert {(r["set"], r["recipe"]) for r in measured} == {("demo", "default"), ("demo", "demo")}
    assert "dataset-fashion-mnist" in skipped["fmnist"]
    for r in measured:
        assert r["train_images"] == tool.TOY_TRAIN and r["test_images"] == tool.TOY_TEST
        assert 1 <= r["epochs"] <= tool.TOY_EPOCHS
        for key, _ in tool.COLUMNS:
            assert 0.0 <= r[key] <= 1.0, key
    text = "\n".join(out[:-1])
    assert "raw px" in text and "learned" in text and "fmnist  skipped:" in text
    table_rows = [line for line in out if line.startswith("demo ")]
    assert len(table_rows) == 2
    img = Image.open(png)
    assert img.size[0] > 500
    assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 5


def test_unknown_set_is_refused() -> None:
    with pytest.raises(SystemExit):
        load_tool("bench_quality").main(["--sets", "cifar"])


def test_epochs_fit_the_budget() -> None:
    rule = load_tool("bench_quality").epochs_in_budget
    assert rule(90, 0.1, 40, 120.0) == 27  # 0.9 * 120 s / (0.1 s * 40 steps)
    assert rule(90, 0.01, 40, 120.0) == 90  # the recipe's own epochs fit
    assert rule(90, 10.0, 40, 120.0) == 1  # at least one epoch
    assert rule(90, 0.1, 40, 120.0, cap=2) == 2
    assert rule(90, 0.0, 40, 120.0) == 90  # no probe steps timed: the recipe's epochs
