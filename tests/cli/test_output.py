"""The `oocid` command where its output goes to a pipe or a file, and the first-hour rough
edges of issue 14: help readable without a terminal, no progress-bar frames in a log, refusals
that name what is wrong (one line, exit 2), kNN output that suits the data.
"""

from __future__ import annotations

import os
import subprocess
import sys

ENV = {k: v for k, v in os.environ.items() if k not in ("OOCID_DEBUG", "COLUMNS")}


def oocid(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m oocid ARGS` with stdout and stderr piped, as in a log or a CI job."""
    return subprocess.run([sys.executable, "-m", "oocid", *map(str, args)], capture_output=True,
                          text=True, env=env or ENV, timeout=300, check=False)


def test_help_piped_is_wide_enough_to_read() -> None:
    p = oocid("train", "--help")
    assert p.returncode == 0, p.stderr
    # Whole phrases on one line, not one or two words a line.
    assert "Bank path: DIR.zarr (Zarr v3) or FILE.npy" in p.stdout, p.stdout
    assert "Continue from the run folder's last checkpoint." in p.stdout, p.stdout
    assert max(len(line) for line in p.stdout.splitlines()) > 100, p.stdout


def test_help_keeps_a_width_the_user_set() -> None:
    p = oocid("train", "--help", env={**ENV, "COLUMNS": "90"})
    assert p.returncode == 0, p.stderr
    assert max(len(line) for line in p.stdout.splitlines()) <= 90, p.stdout
