"""`oocid plot RUN_DIR`: a PNG of loss and kNN accuracy over epochs from metrics.jsonl.

Drawn with PIL alone (no plotting dependency): one panel per series, axes with tick labels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from oocid.atomic import atomic_open
from oocid.errors import DataError, InputError

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 640, 300, 70, 20, 34, 44


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: no metrics (is {run_dir} an oocid run folder?)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{n}: not a JSON line") from None
        if not isinstance(rec, dict) or "epoch" not in rec:
            raise DataError(f"{path}:{n}: a metrics line without an epoch")
        rows.append(rec)
    if not rows:
        raise DataError(f"{path}: has no epochs yet")
    return rows


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> tuple[list[float], int]:
    """(ticks, decimals to print them with): the multiples inside [lo, hi] of a round step (1,
    2, 2.5 or 5 times a power of ten; whole numbers where `integer`), as close to `n` as any."""
    if hi <= lo:
        return [lo], 0 if integer else 3
    mag = 10.0 ** math.floor(math.log10((hi - lo) / max(n - 1, 1)))
    steps = [m * mag * k for k in (0.1, 1, 10) for m in (1, 2, 2.5, 5)]
    if integer:
        steps = [x for x in steps if x >= 1 and x == int(x)] or [1.0]

    def ticks(step: float) -> list[float]:
        return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]

    step = min(reversed(steps), key=lambda x: abs(len(ticks(x)) - n))  # ties: the larger step
    decimals = len(f"{step:.10f}".rstrip("0").split(".")[1])
    return ticks(step) or [lo], decimals


def y_range(ys: list[float], bounds: tuple[float, float] | None = None,
            min_span: float = 0.0) -> tuple[float, float]:
    """The y axis for `ys`: their span plus 5 % each side (a flat series: +-0.5), kept inside
    `bounds` (an accuracy: 0-1); at least `min_span` wide, about the series' middle and shifted
    to stay inside `bounds`, so that a small change does not fill the panel like a large one."""
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    margin = 0.05 * (hi - lo)
    lo, hi = lo - margin, hi + margin
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
        if bounds is not None:
            shift = max(bounds[0] - lo, 0.0) - max(hi - bounds[1], 0.0)
            lo, hi = max(lo + shift, bounds[0]), min(hi + shift, bounds[1])
    return lo, hi


ACC_MIN_SPAN = 0.1  # an accuracy axis spans at least 10 points
LOSS_MIN_SPAN = 0.1  # a loss axis spans at least a tenth of the loss's size


def _panel(title: str, xs: list[float], ys: list[float], color: tuple[int, int, int],
           bounds: tuple[float, float] | None = None, min_span: float = 0.0) -> Image.Image:
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, x1, y0, y1 = PAD_L, W - PAD_R, PAD_T, H - PAD_B
    d.text((PAD_L, 8), title, fill="black", font=font)
    d.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = y_range(ys, bounds, min_span)

    def px(x: float) -> float:
        return x0 + (x - xlo) / max(xhi - xlo, 1e-12) * (x1 - x0) if xhi > xlo else (x0 + x1) / 2

    def py(y: float) -> float:
        return y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    yt, dec = nice_ticks(ylo, yhi)
    for t in yt:
        d.line([x0 - 4, py(t), x0, py(t)], fill="black")
        d.line([x0, py(t), x1, py(t)], fill=(235, 235, 235))
        d.text((4, py(t) - 6), f"{t:.{dec}f}", fill="black", font=font)
    for t in nice_ticks(xlo, xhi, 6, integer=True)[0]:
        d.line([px(t), y1, px(t), y1 + 4], fill="black")
        d.text((px(t) - 8, y1 + 8), f"{t:.0f}", fill="black", font=font)
    d.text(((x0 + x1) // 2 - 15, H - 18), "epoch", fill="black", font=font)
    pts = [(px(x), py(y)) for x, y in zip(xs, ys, strict=True)]
    if len(pts) > 1:
        d.line(pts, fill=color, width=2)
    for p in pts:
        d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
    return img


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write RUN_DIR/metrics.png (or `out`): loss, and kNN top-1 where measured."""
    rows = read_metrics(run_dir)
    panels = []
    loss = [(r["epoch"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    if loss:
        panels.append(_panel(f"training loss ({run_dir.name})", [e for e, _ in loss],
                             [v for _, v in loss], (31, 119, 180),
                             min_span=LOSS_MIN_SPAN * max(abs(v) for _, v in loss)))
    knn = [(r["epoch"], r["knn_top1"]) for r in rows if isinstance(r.get("knn_top1"), (int, float))]
    if knn:
        panels.append(_panel("kNN top-1 on the validation shards", [e for e, _ in knn],
                             [v for _, v in knn], (214, 39, 40), bounds=(0.0, 1.0),
                             min_span=ACC_MIN_SPAN))
    if not panels:
        raise DataError(f"{run_dir / 'metrics.jsonl'}: nothing to plot")
    img = Image.new("RGB", (W, H * len(panels)), "white")
    for i, p in enumerate(panels):
        img.paste(p, (0, i * H))
    out = out if out is not None else run_dir / "metrics.png"
    save_image(img, out)
    return out


PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
           (140, 86, 75), (227, 119, 194), (23, 190, 207)]


def line_chart(out: Path, series: dict[str, list[tuple[float, float]]], flat: dict[str, float], *,
               title: str, xlabel: str, ylabel: str, width: int = 760, height: int = 440) -> Path:
    """Lines of (x, y) points per label, plus labelled horizontal reference lines; a legend."""
    pts = [p for s in series.values() for p in s]
    if not pts and not flat:
        raise DataError(f"{out}: nothing to plot")
    xs = [x for x, _ in pts] or [0.0, 1.0]
    ys = [y for _, y in pts] + list(flat.values())
    xlo, xhi = min(xs), max(xs)
    if xhi - xlo < 1e-12:
        xlo, xhi = xlo - 0.5, xhi + 0.5
    ylo, yhi = y_range(ys)
    legend_w = 230
    img = Image.new("RGB", (width + legend_w, height), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, x1, y0, y1 = PAD_L, width - PAD_R, PAD_T, height - PAD_B

    def px(x: float) -> float:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)

    def py(y: float) -> float:
        return y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    d.text((PAD_L, 8), title, fill="black", font=font)
    d.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    yt, dec = nice_ticks(ylo, yhi, 6)
    for t in yt:
        d.line([x0 - 4, py(t), x0, py(t)], fill="black")
        d.line([x0, py(t), x1, py(t)], fill=(235, 235, 235))
        d.text((4, py(t) - 6), f"{t:.{dec}f}", fill="black", font=font)
    for t in sorted(set(xs)):
        d.line([px(t), y1, px(t), y1 + 4], fill="black")
        d.text((px(t) - 8, y1 + 8), f"{t:.3g}", fill="black", font=font)
    d.text(((x0 + x1) // 2 - 40, height - 18), xlabel, fill="black", font=font)
    d.text((4, y0 - 16), ylabel, fill="black", font=font)
    ly = y0
    for i, (label, s) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        line = [(px(x), py(y)) for x, y in sorted(s)]
        if len(line) > 1:
            d.line(line, fill=color, width=2)
        for p in line:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
        d.line([width + 5, ly + 6, width + 25, ly + 6], fill=color, width=2)
        d.text((width + 30, ly), label, fill="black", font=font)
        ly += 16
    for j, (label, y) in enumerate(flat.items()):
        color = (90 + 40 * (j % 3), 90 + 40 * (j % 3), 90 + 40 * (j % 3))
        for xa in range(int(x0), int(x1), 12):  # dashed
            d.line([xa, py(y), min(xa + 6, x1), py(y)], fill=color, width=1)
        d.line([width + 5, ly + 6, width + 25, ly + 6], fill=color, width=1)
        d.text((width + 30, ly), f"{label} ({y:.3f})", fill="black", font=font)
        ly += 16
    save_image(img, out)
    return out


def save_image(img: Image.Image, path: Path, fmt: str = "PNG") -> None:
    """Write an image (PNG, or `fmt`: "JPEG" at quality 90) all or nothing (oocid.atomic);
    WriteError naming the path on failure."""
    with atomic_open(path, "image") as f:
        img.save(f, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
