"""`oocid plot`: a PNG of loss and kNN accuracy from metrics.jsonl."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from oocid.errors import DataError, InputError
from oocid.eval.plot import H, W, nice_ticks, plot_run, y_range


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


def test_ticks_are_round_and_labelled_once() -> None:
    """What a user saw before: epoch ticks 1 3 5 6 8 10 off the points, loss ticks 12.19,
    10.8, 9.406, an accuracy axis to 1.482."""
    assert nice_ticks(1, 10, 6, integer=True) == ([2, 4, 6, 8, 10], 0)
    assert nice_ticks(9.406, 12.19) == ([9.5, 10.0, 10.5, 11.0, 11.5, 12.0], 1)
    assert y_range([0.932], bounds=(0.0, 1.0))[1] == 1.0
    lo, hi = y_range([0.5, 0.6], bounds=(0.0, 1.0))
    assert lo == pytest.approx(0.495) and hi == pytest.approx(0.605)


@given(st.floats(-1e4, 1e4), st.floats(1e-3, 1e4), st.integers(3, 8))
def test_ticks_inside_evenly_spaced_with_distinct_labels(lo: float, span: float, n: int) -> None:
    hi = lo + span
    ticks, dec = nice_ticks(lo, hi, n)
    assert 2 <= len(ticks) <= 2 * n + 1
    eps = 1e-9 * max(1.0, abs(lo), abs(hi))
    assert all(lo - eps <= t <= hi + eps for t in ticks)
    step = ticks[1] - ticks[0]
    assert all(math.isclose(b - a, step, rel_tol=1e-6) for a, b in itertools.pairwise(ticks))
    mantissa = step / 10 ** math.floor(round(math.log10(step), 6))  # the difference may be 0.00999...
    assert any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (1, 2, 2.5, 5))
    labels = [f"{t:.{dec}f}" for t in ticks]
    assert len(set(labels)) == len(labels)
    assert all(math.isclose(float(x), t, rel_tol=1e-9, abs_tol=1e-9 * step)
               for x, t in zip(labels, ticks, strict=True))
