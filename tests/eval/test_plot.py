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
from oocid.eval.plot import PAD_B, PAD_T, H, W, nice_ticks, plot_run, y_range


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


def test_a_small_change_is_drawn_small(tmp_path: Path) -> None:
    """What a user saw: a kNN curve from 0.694 to 0.700 drawn over an axis of 0.694-0.700, so a
    0.6-point change looked like a collapse; a loss from 5.84 to 5.80 the same. Each curve now
    takes a small part of its panel's height (the accuracy axis spans at least 0.1, the loss axis
    a tenth of the loss)."""
    lines = [{"epoch": e, "loss": 5.84 - e / 100, "knn_top1": 0.700 - e * 0.0015}
             for e in range(5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    img = Image.open(plot_run(tmp_path)).convert("RGB")
    for panel, color in ((0, (31, 119, 180)), (1, (214, 39, 40))):
        rows = [y for y in range(panel * H, (panel + 1) * H) for x in range(W)
                if img.getpixel((x, y)) == color]
        assert rows
        assert max(rows) - min(rows) < 0.15 * (H - PAD_T - PAD_B)  # was the whole height


def test_the_minimum_span_stays_within_bounds() -> None:
    for ys in ([0.694, 0.7], [0.98, 0.99], [0.0, 0.01], [0.5]):
        lo, hi = y_range(ys, bounds=(0.0, 1.0), min_span=0.1)
        assert 0.0 <= lo <= min(ys) and max(ys) <= hi <= 1.0 and hi - lo >= 0.1 - 1e-12
    assert y_range([0.98, 0.99], bounds=(0.0, 1.0), min_span=0.1) == pytest.approx((0.9, 1.0))
    assert y_range([0.694, 0.7], bounds=(0.0, 1.0), min_span=0.1) == pytest.approx((0.647, 0.747))
    lo, hi = y_range([5.80, 5.84], min_span=0.584)
    assert hi - lo == pytest.approx(0.584) and (lo + hi) / 2 == pytest.approx(5.82)


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
