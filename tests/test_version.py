"""One version (oocid/version.py), read by pyproject.toml, `oocid --version` and checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import ENV, kill_shards

import oocid
from oocid.version import __version__


def test_the_installed_version_is_the_version_module() -> None:
    """pyproject.toml reads the version from oocid/version.py: what pip recorded is it."""
    from importlib.metadata import version

    assert version("oocid") == __version__ == oocid.__version__


def test_python_m_oocid_trains_from_the_folder_above_a_clone(tmp_path: Path) -> None:
    """From the folder that holds a clone, `python -m oocid` (and torchrun's `-m oocid`) finds
    the clone's root, a folder named oocid, first: an editable install then imports the package
    as an empty namespace and its modules by themselves. Training used to stop there with an
    internal error (`from oocid import __version__`)."""
    (tmp_path / "oocid").mkdir()  # a clone's root, as seen from the folder above it
    shards = kill_shards(tmp_path, n=32)
    p = subprocess.run([sys.executable, "-m", "oocid", "train", "--shards", str(shards), "--bank",
                        str(tmp_path / "b.zarr"), "--out", str(tmp_path / "run"), "--max-steps",
                        "1", "--no-progress", "--epochs", "1"], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "run" / "last.pt").is_file()
