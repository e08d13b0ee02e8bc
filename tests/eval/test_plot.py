"""`oocid plot`: a PNG of loss and kNN accuracy from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from oocid.errors import DataError, InputError
from oocid.eval.plot import H, W, plot_run


def test_plot_two_panels(tmp_path: Path) -> None:
    lines = [{"epoch": e, "loss": 10.0 / e, **({"knn_top1": 0.5 + e / 100} if e % 2 else {})}
             for e in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = plot_run(tmp_path)
    img = Image.open(out)
    assert out == tmp_path / "metrics.png" and img.size == (W, 2 * H)
    # the loss curve is drawn in blue, the kNN curve in red
    colors = {c for _, c in img.getcolors(1 << 16)}
    assert (31, 119, 180) in colors and (214, 39, 40) in colors


def test_plot_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no metrics"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"metrics\.jsonl:1"):
        plot_run(tmp_path)
