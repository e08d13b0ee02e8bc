"""tools/gpu_check.sh's dry run: every part at a toy size on the CPU, so the one-call GPU check
cannot rot between the rare sessions that are lent a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402


def test_dry_run_passes_every_part_and_names_each_skip(tmp_path: Path) -> None:
    env = {**os.environ, "GPU_CHECK_SMALL": "1", "OUT": str(tmp_path / "out"),
           "WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["failed"] == 0 and summary["failed_parts"] == []
    assert summary["parts"] == sorted(gpu_check.PARTS)
    recs = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert all(r.get("reason") for r in recs if r["status"] == "skip")  # never silently
    checks = {(r["part"], r["check"]) for r in recs if r["status"] == "pass"}
    assert ("cache", "flush equals the host mirror") in checks
    assert sum(part == "parity" and "bf16" in check for part, check in checks) == 4


def test_table_names_the_failed_parts_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                  ) -> None:
    lines = [{"part": "parity", "check": "x", "status": "pass"},
             {"part": "bench", "check": "timeout", "status": "fail", "seconds": 150},
             {"part": "demo", "check": "y", "status": "skip", "reason": "dry run"}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert gpu_check.table(tmp_path) == 1
    out = capsys.readouterr().out
    assert "FAILED parts: bench" in out
    assert json.loads(out.strip().splitlines()[-1])["failed_parts"] == ["bench"]


def test_a_part_that_raises_is_recorded_as_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    def broken(c: gpu_check.Check) -> None:
        raise RuntimeError("boom")

    monkeypatch.setitem(gpu_check.PARTS, "cache", broken)
    assert gpu_check.run_part("cache", tmp_path, tmp_path, dry=True) == 1
    recs = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert recs[0]["status"] == "fail" and "boom" in recs[0]["error"]
