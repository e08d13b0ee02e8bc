"""tools/bench_accuracy.py's pieces that need no training: the idx reader, the clear message
when Fashion-MNIST is missing, the run specs and the plot."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from helpers import load_tool
from PIL import Image


def write_idx(path: Path, arr: np.ndarray) -> None:
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def test_fmnist_files_become_an_npz_and_missing_ones_say_how_to_get_them(tmp_path: Path) -> None:
    tool = load_tool("bench_accuracy")
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (6, 28, 28)), "train_labels": np.arange(6) % 10,
              "test_images": rng.integers(0, 256, (3, 28, 28)), "test_labels": np.arange(3)}
    with pytest.raises(SystemExit, match="dataset-fashion-mnist"):
        tool.fmnist_npz(tmp_path, tmp_path / "f.npz")
    for key, name in tool.FMNIST_FILES.items():
        write_idx(tmp_path / name, arrays[key])
    with np.load(tool.fmnist_npz(tmp_path, tmp_path / "f.npz")) as z:
        for key, want in arrays.items():
            assert np.array_equal(z[key], want)
        assert len(z["class_names"]) == 10


def test_specs_and_plot(tmp_path: Path) -> None:
    tool = load_tool("bench_accuracy")
    s = tool.parse_spec("nce_ema:4096:0.1", "shared", 3)
    assert (s.loss, s.k, s.cache_fraction, s.seed) == ("nce_ema", 4096, 0.1, 3)
    with pytest.raises(SystemExit, match="needs the bank in core"):
        tool.parse_spec("softmax:0:0.1", "shared", 0)
    with pytest.raises(SystemExit, match="LOSS:K:CACHE_FRACTION"):
        tool.parse_spec("nce:4096", "shared", 0)
    fixed = tool.parse_spec("infonce:4096:0.1:per-sample", "shared", 0)
    assert fixed.negatives == "per-sample" and fixed.name == "infonce-k4096-c0.1-per-sample-s0"
    with pytest.raises(SystemExit, match="LOSS:K:CACHE_FRACTION"):
        tool.parse_spec("infonce:4096:0.1:some", "shared", 0)
    # the default runs hold the library's out-of-core default as it ships
    from oocid.config import LossConfig, auto_loss

    shipped = [tool.parse_spec(r, "shared", 0) for r in tool.DEFAULT_RUNS]
    assert any((sp.loss, sp.k, sp.negatives) == (auto_loss(fits=False), LossConfig().nce_k,
                                                   LossConfig().negatives) and sp.cache_fraction < 1
               for sp in shipped)
    cfg = tool.config_for(tool.parse_spec("nce:512:0.1", "shared", 0), 60000)
    assert cfg.loss.kind == "nce" and cfg.loss.z == "oneshot" and cfg.loss.nce_k == 512
    assert int(cfg.bank.cache_mb * 2**20) // (128 * 4) == 6000  # 10 % of the rows
    rows = [{"loss": "pixels", "k": None, "cache_fraction": None, "top1": 0.79},
            {"loss": "softmax", "k": None, "cache_fraction": 1.0, "top1": 0.83}] + [
        {"loss": "nce", "k": k, "cache_fraction": c, "top1": 0.5 + 0.01 * i}
        for i, k in enumerate((1, 10, 512, 4096)) for c in (1.0, 0.1)]
    tool.plot_k(rows, tmp_path / "p.png")
    img = Image.open(tmp_path / "p.png")
    assert img.size[0] > 500 and len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 5
