"""A failing command says one line, and under torchrun says it once per machine: every process
writes it to torchrun's error file (shown in torchrun's failure summary), the first prints it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from oocid.cli.entry import main

BAD = ["oocid", "train", "--shards", "/nonexistent-shards", "--bank", "b.zarr"]
LINE = "oocid: error: /nonexistent-shards: no such shard folder"


def fail_with(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
              env: dict[str, str]) -> str:
    for key in ("TORCHELASTIC_ERROR_FILE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", BAD)
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    return capsys.readouterr().err


def test_a_plain_run_prints_the_line(monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert fail_with(monkeypatch, capsys, {}) == LINE + "\n"


@pytest.mark.parametrize("local_rank, printed", [("0", LINE + "\n"), ("1", "")])
def test_under_torchrun_each_process_records_it_and_the_first_prints_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        local_rank: str, printed: str) -> None:
    error_file = tmp_path / "error.json"
    err = fail_with(monkeypatch, capsys, {"TORCHELASTIC_ERROR_FILE": str(error_file),
                                          "LOCAL_RANK": local_rank})
    assert err == printed
    record = json.loads(error_file.read_text())
    assert record["message"] == LINE and isinstance(record["timestamp"], int)


def test_an_error_file_that_cannot_be_written_leaves_the_line_printed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    err = fail_with(monkeypatch, capsys, {"TORCHELASTIC_ERROR_FILE": str(tmp_path / "no" / "e"),
                                          "LOCAL_RANK": "3"})
    assert err == LINE + "\n"


@pytest.mark.parametrize("argv, line", [
    (["train", "--shard", "s", "--bank", "b.zarr"],
     "oocid: error: No such option: --shard (Possible options: --arch, --shards, --tensorboard) "
     "(see `oocid train --help`)"),
    (["bank", "verify"], "oocid: error: Missing argument 'BANK' (see `oocid bank verify --help`)"),
    (["trian"], "oocid: error: No such command 'trian'. Did you mean 'train'? (see `oocid --help`)"),
])
def test_a_usage_error_is_one_plain_line(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str], argv: list[str],
                                         line: str) -> None:
    """Not typer's framed box of several lines (box-drawing bytes in a log file)."""
    monkeypatch.setattr(sys, "argv", ["oocid", *argv])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    assert capsys.readouterr().err == line + "\n"


def test_version_and_no_arguments(monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from oocid.version import __version__

    monkeypatch.setattr(sys, "argv", ["oocid", "--version"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0 and capsys.readouterr().out == f"oocid {__version__}\n"
    monkeypatch.setattr(sys, "argv", ["oocid"])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    assert e.value.code == 2 and "Usage: oocid" in out.out + out.err and "error" not in out.err


def test_no_arguments_print_the_help_without_rich_too() -> None:
    """typer without rich (TYPER_USE_RICH=0, typer-slim) hands the help over as the usage
    error's message: printed as help, not as an 'oocid: error:' line."""
    import os
    import subprocess

    p = subprocess.run([sys.executable, "-m", "oocid"], capture_output=True, text=True,
                       env={**os.environ, "TYPER_USE_RICH": "0"}, timeout=120, check=False)
    assert p.returncode == 2 and p.stderr == "", p.stderr
    assert p.stdout.startswith("Usage: oocid [OPTIONS] COMMAND") and "shard" in p.stdout
    assert p.stdout.endswith("bank.\n")
