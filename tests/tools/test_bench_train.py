"""tools/bench_train.py at a toy size: it runs the real NPIDStep over an on-disk bank through a
partial cache with both kinds of negatives, and its last line is the JSON the README promises
(a few seconds; the real benchmark is `python tools/bench_train.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TOOLS, load_tool


def test_bench_train_toy_size(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TOOLS))  # it imports bench_bank, as a script would
    tool = load_tool("bench_train")
    threads = torch.get_num_threads()  # the tool sets its own; the rest of the suite keeps ours
    try:
        code = tool.main(["--model", "small", "--negatives", "per-sample,shared",
                          "--rows", "200000", "--steps", "4", "--warmup", "1", "--rounds", "2",
                          "--batch", "32", "--k", "64", "--stream-images", "256",
                          "--workdir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = json.loads(out[-1])
    assert [r["negatives"] for r in rows] == ["per-sample", "shared"]
    for r in rows:
        for key in ("model", "npid_images_per_s", "model_images_per_s", "pipeline_images_per_s",
                    "ratio"):
            assert key in r
        assert r["model"] == "small" and not r["full"]  # a partial cache: the out-of-core path
        assert r["npid_images_per_s"] > 0 and r["model_images_per_s"] > 0
        # ratio is rounded to 3 places from unrounded rates; the rates to 1 place
        npid, model = r["npid_images_per_s"], r["model_images_per_s"]
        slack = 5e-4 + (npid / model) * (0.05 / npid + 0.05 / model) * 1.01
        assert r["ratio"] == pytest.approx(npid / model, abs=slack)
        assert r["pipeline_in_memory_images_per_s"] > 0
        assert r["pipeline_stream_images_per_s"] > 0
        prof = r["profile_ms_per_step"]  # the step's parts, as instrumented
        assert prof["model forward"] > 0 and prof["bank draw (negatives, located)"] > 0
        assert prof["bank gather (positives)"] > 0 and prof["bank update (write rows)"] > 0
    assert any(line.startswith("small") and "shared" in line for line in out)  # the table
