"""tools/bench_knn.py on a tiny bank: the JSON last line and full agreement with the in-memory
top-k (in process, so it takes seconds; the real benchmark runs each method in its own process)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import load_tool


def test_bench_knn_tiny_bank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tool = load_tool("bench_knn")
    assert tool.main(["--rows", "2000", "--queries", "50", "--workdir", str(tmp_path),
                      "--in-process"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    (r,) = json.loads(last)
    for key in ("rows", "oocid_s", "torch_s", "faiss_s", "peak_rss_mb", "topk_agreement"):
        assert key in r
    assert r["rows"] == 2000 and r["queries"] == 50 and r["k"] == 200
    assert r["oocid_s"] > 0 and r["torch_s"] > 0 and r["peak_rss_mb"] > 0
    assert r["topk_agreement"] == 1.0 and r["topk_agreement_torch"] == 1.0
    assert r["topk_exact_torch"] == 1.0 and r["topk_ties_torch"] == 1.0
    assert r["oocid_cpu_s"] > 0
    if r["faiss_s"] is not None:  # faiss is an optional dependency
        assert r["topk_agreement_faiss"] == 1.0
    assert (tmp_path / "bank_2000x128.npy").is_file()
    assert not list(tmp_path.glob("knn_*.npz"))  # neighbour files are cleaned up


def test_bench_knn_without_faiss(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    tool = load_tool("bench_knn")
    monkeypatch.setattr(tool, "have_faiss", lambda: False)
    assert tool.main(["--rows", "300", "--queries", "5", "--k", "7", "--workdir", str(tmp_path),
                      "--in-process"]) == 0
    out = capsys.readouterr().out
    (r,) = json.loads(out.strip().splitlines()[-1])
    assert r["faiss_s"] is None and r["topk_agreement_faiss"] is None
    assert r["topk_agreement"] == 1.0
    assert "faiss is not installed" in out


def test_agreement_counts_sets_ranks_and_scores() -> None:
    tool = load_tool("bench_knn")
    a = {"index": np.array([[1, 2, 3], [4, 5, 6]]), "sims": np.array([[.9, .8, .7], [.5, .5, .4]])}
    b = {"index": np.array([[1, 3, 2], [5, 4, 7]]), "sims": np.array([[.9, .8, .7], [.5, .5, .4]])}
    # row 0: the same set ranked otherwise; row 1: another set of the same scores (ties)
    assert tool.agreement(a, b) == {"sets": 0.5, "exact": 0.0, "ties": 1.0, "scores": 1.0}
    b["sims"] = np.array([[.9, .8, .7], [.5, .5, .4 + 1e-7]])  # row 1: within tol, not a tie
    assert tool.agreement(a, b) == {"sets": 0.5, "exact": 0.0, "ties": 0.5, "scores": 1.0}
    b["sims"] = np.array([[.9, .8, .7], [.5, .5, .3]])
    assert tool.agreement(a, b)["scores"] == 0.5
