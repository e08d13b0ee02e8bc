"""The `oocid` command where its output goes to a pipe or a file, and the first-hour rough
edges of issue 14: help readable without a terminal, no progress-bar frames in a log, refusals
that name what is wrong (one line, exit 2), kNN output that suits the data.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_npz

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


def one_line_error(p: subprocess.CompletedProcess[str], *names: str) -> str:
    """Exit 2 and exactly one stderr line `oocid: error: ...` naming each of `names`."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, (p.returncode, p.stderr)
    assert lines[0].startswith("oocid: error: "), lines
    for name in names:
        assert name in lines[0], lines
    return lines[0]


def test_shard_into_existing_shards_needs_force(tmp_path: Path) -> None:
    src, out = tiny_npz(tmp_path / "a.npz", n=20), tmp_path / "shards"
    assert oocid("shard", src, out, "--shard-size", 8, "--no-progress").returncode == 0
    before = (out / "manifest.json").read_bytes()
    p = oocid("shard", src, out, "--shard-size", 4, "--no-progress")
    assert "--force" in one_line_error(p, str(out))
    assert (out / "manifest.json").read_bytes() == before  # untouched
    p = oocid("shard", src, out, "--shard-size", 4, "--no-progress", "--force")
    assert p.returncode == 0, p.stderr
    assert "in 5 shards" in p.stdout
    assert sorted(x.name for x in out.glob("shard-*.tar")) == [f"shard-{i:06d}.tar" for i in range(5)]


def unlabeled_npz(path: Path, n: int = 20) -> Path:
    images = np.random.default_rng(0).integers(0, 256, (n, 16, 16), dtype=np.uint8)
    np.savez(path, images=images)
    return path


def test_train_val_on_unlabeled_shards_is_refused_up_front(tmp_path: Path) -> None:
    tr, va = tmp_path / "train", tmp_path / "val"
    assert oocid("shard", tiny_npz(tmp_path / "t.npz", n=20), tr, "--no-progress").returncode == 0
    assert oocid("shard", unlabeled_npz(tmp_path / "u.npz"), va, "--no-progress").returncode == 0
    p = oocid("train", "--shards", tr, "--bank", tmp_path / "b.zarr", "--out", tmp_path / "run",
              "--val", va, "--no-progress")
    one_line_error(p, str(va), "unlabeled")
    assert not (tmp_path / "b.zarr").exists() and not (tmp_path / "run").exists()
    p = oocid("train", "--shards", va, "--bank", tmp_path / "b.zarr", "--out", tmp_path / "run",
              "--val", tr, "--no-progress")
    one_line_error(p, str(va), "unlabeled")


def test_negative_worker_count_is_a_config_error(tmp_path: Path) -> None:
    p = oocid("train", "--shards", tmp_path, "--bank", tmp_path / "b.zarr", "--set", "data.workers=-3")
    one_line_error(p, "data.workers")


DEMO_TOML = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"


def assert_no_bar_frames(text: str) -> None:
    assert "\r" not in text and "it/s" not in text and "%|" not in text, text
    assert "\x1b[" not in text, text  # no cursor movement either


def test_piped_train_and_knn_print_plain_lines(tmp_path: Path) -> None:
    """Progress on (the default) but stderr a pipe: plain lines only; then `oocid knn` with 4
    classes (no top-5) and a k above the training rows (the k used is said)."""
    tr, va = tmp_path / "train", tmp_path / "val"
    p = oocid("shard", tiny_npz(tmp_path / "t.npz", n=48), tr, "--shard-size", 16)
    assert p.returncode == 0, p.stderr
    assert_no_bar_frames(p.stderr)
    assert "oocid: shard 48/48 img (100%)" in p.stderr, p.stderr
    assert oocid("shard", tiny_npz(tmp_path / "v.npz", n=20, seed=1), va).returncode == 0
    run = tmp_path / "run"
    p = oocid("train", "--shards", tr, "--bank", tmp_path / "b.zarr", "--out", run, "--val", va,
              "--config", DEMO_TOML, "--epochs", 2, "--batch-size", 16, "--set",
              "data.image_size=16")
    assert p.returncode == 0, p.stderr
    assert_no_bar_frames(p.stderr)
    epochs = [ln for ln in p.stderr.splitlines() if ln.startswith("oocid: epoch=")]
    assert len(epochs) == 2, p.stderr
    assert "knn_top1=" in epochs[-1] and "knn_top5" not in p.stderr + p.stdout  # 4 classes
    p = oocid("knn", "--bank", tmp_path / "b.zarr", "--checkpoint", run / "last.pt", "--shards",
              va, "--k", 10000, "--k", 5, "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert_no_bar_frames(p.stderr)
    assert "(k=48, all rows; asked 10000," in p.stdout, p.stdout
    assert "(k=5, t=" in p.stdout and "top-5" not in p.stdout, p.stdout


@pytest.mark.parametrize(("tick", "said"), [(1.0, range(20, 200, 20)), (0.01, ()),
                                            (0.2, range(40, 200, 40))])
def test_plain_progress_lines_every_tenth_of_a_long_total(
        monkeypatch: pytest.MonkeyPatch, tick: float, said: range | tuple[()]) -> None:
    """A line each tenth of the total, but none within 5 s of the last: an epoch of 200 steps
    at 1 s a step says every tenth, at 0.01 s nothing on the way (the loop's own epoch line
    says it), at 0.2 s every second tenth (8 s apart)."""
    import io

    import oocid.progress as progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = progress.PlainProgress(200, "epoch 1/3", "step", leave=False, file=out)
    for _ in range(200):
        clock[0] += tick
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == [f"oocid: epoch 1/3 {n}/200 step ({n // 2}%)" for n in said]
    out = io.StringIO()
    with progress.PlainProgress(5, "shard", "img", file=out) as short:  # short: one line, at the end
        for _ in range(5):
            short.update(1)
    assert out.getvalue() == "oocid: shard 5/5 img (100%)\n"


def test_help_names_values_as_the_docs_do() -> None:
    """Repeatable options show the value one use takes (`<int>`, not `<list[int]>`), positionals
    their names as docs/commands.md writes them (SRC OUT, not {src} {out}: typer keeps the
    braces), `bank verify --tol` its defaults; the top-level list gives export a line that
    stands alone (it ended "into the model built as below")."""
    knn = oocid("knn", "--help")
    assert knn.returncode == 0, knn.stderr
    assert "list[" not in knn.stdout, knn.stdout
    assert re.search(r"--k +<int> +Neighbours", knn.stdout), knn.stdout
    assert re.search(r"--bank +<path> +The trained bank", knn.stdout), knn.stdout
    shard = oocid("shard", "--help").stdout
    assert "Usage: oocid shard [OPTIONS] {SRC} {OUT}" in shard, shard
    assert "1e-4 for a float32 bank, 1e-3 for float16" in oocid("bank", "verify", "--help").stdout
    assert "data.batch_size (per process under torchrun)" in oocid("train", "--help").stdout
    top = oocid("--help").stdout
    line = next(x for x in top.splitlines() if " export " in x)
    assert "as below" not in line and line.rstrip(" │").endswith("your own code."), top


def test_a_bank_path_of_another_kind_is_refused_and_leaves_no_lock(tmp_path: Path) -> None:
    """No config (the recipe) and --bank bank.bin: one line, exit 2, no bank.bin.lock, no
    recipe line before the error."""
    assert oocid("shard", tiny_npz(tmp_path / "t.npz"), tmp_path / "s").returncode == 0
    p = oocid("train", "--shards", tmp_path / "s", "--bank", tmp_path / "bank.bin", "--out",
              tmp_path / "run")
    one_line_error(p, "bank.bin", ".zarr or .npy")
    assert not (tmp_path / "bank.bin.lock").exists() and not (tmp_path / "run").exists()


# Ctrl-C, and SIGTERM (a job scheduler's stop, torchrun stopping the other processes): the same
# clean-up and line; the exit code says which (128 + the signal's number).
STOPS = [pytest.param("SIGINT", 130, id="ctrl-c"), pytest.param("SIGTERM", 143, id="sigterm")]


@pytest.mark.parametrize(("sig", "code"), STOPS)
def test_ctrl_c_or_sigterm_says_what_was_kept(tmp_path: Path, sig: str, code: int) -> None:
    """SIGINT during training: exit 130, one line saying the bank and checkpoint are intact,
    and the bank verifies; SIGTERM the same with exit 143."""
    import signal
    import time

    assert oocid("shard", tiny_npz(tmp_path / "t.npz"), tmp_path / "s").returncode == 0
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "oocid", "train", "--shards", str(tmp_path / "s"),
                          "--bank", str(tmp_path / "b.npy"), "--out", str(run), "--epochs",
                          "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**ENV, "OMP_NUM_THREADS": "1"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # an epoch committed: the interrupt lands mid-run
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("oocid: interrupted; the bank and the last checkpoint are intact"), err
    assert "Traceback" not in err
    assert oocid("bank", "verify", tmp_path / "b.npy").returncode == 0


# A `oocid train` whose DataLoader workers are slow: each says so in a file at its first sample.
SLOW_WORKERS = """
import os, sys, time
from pathlib import Path
from oocid.data import stream
it, flags = stream.ShardStream.__iter__, Path(sys.argv[1])
def slow_iter(self):
    for n, sample in enumerate(it(self)):
        if n == 0:
            (flags / str(os.getpid())).write_text("running")
        time.sleep(0.05)
        yield sample
stream.ShardStream.__iter__ = slow_iter
sys.argv = ["oocid", *sys.argv[2:]]
from oocid.cli.entry import main
main()
"""


def test_sigterm_to_the_process_group_with_dataloader_workers(tmp_path: Path) -> None:
    """SIGTERM to every process of the run, as a scheduler sends it: the DataLoader workers die
    of it, and the trainer still stops with its one line and exit 143, no traceback ("DataLoader
    worker is killed by signal" from torch's SIGCHLD handler, before)."""
    import signal
    import time

    assert oocid("shard", tiny_npz(tmp_path / "t.npz"), tmp_path / "s").returncode == 0
    flags = tmp_path / "flags"
    flags.mkdir()
    p = subprocess.Popen([sys.executable, "-c", SLOW_WORKERS, str(flags), "train", "--shards",
                          str(tmp_path / "s"), "--bank", str(tmp_path / "b.npy"), "--out",
                          str(tmp_path / "run"), "--no-progress", "--set", "data.workers=2",
                          "--set", 'data.in_memory="no"'], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**ENV, "OMP_NUM_THREADS": "1"},
                         start_new_session=True)
    deadline = time.monotonic() + 120  # a bound on a hang, not a timed assertion
    while len(list(flags.iterdir())) < 2 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1]
    os.killpg(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "Traceback" not in err and "killed by signal" not in err, err
    assert err.strip().splitlines()[-1].startswith("oocid: interrupted; the bank and the last "
                                                   "checkpoint are intact"), err
    assert oocid("bank", "verify", tmp_path / "b.npy").returncode == 0


# A `oocid shard` that stops once its second shard is open (the first one renamed into place,
# the second still under its temporary name), says so in a file, and waits for the SIGINT.
PAUSED_SHARD = """
import sys, time
from pathlib import Path
from oocid.data import writer
add, flag = writer._ShardWriter.add, Path(sys.argv[1])
def slow_add(self, *a, **kw):
    add(self, *a, **kw)
    if len(self.shards) == 1 and self.n == self.size + 1:
        flag.write_text("paused")
        time.sleep(600)
writer._ShardWriter.add = slow_add
sys.argv = ["oocid", *sys.argv[2:]]
from oocid.cli.entry import main
main()
"""


@pytest.mark.parametrize(("sig", "code"), STOPS)
def test_stop_during_shard_removes_its_partial_set_and_the_rerun_works(
        tmp_path: Path, sig: str, code: int) -> None:
    """SIGINT with one shard finished and the next half written: exit 130, one line saying what
    was removed (not the training line), nothing of the run left in OUT (a folder that was
    there before stays); the same command then runs without --force. SIGTERM: the same, 143."""
    import signal
    import time

    src, out = tiny_npz(tmp_path / "t.npz", n=20), tmp_path / "shards"
    out.mkdir()
    args = ["shard", str(src), str(out), "--shard-size", "8", "--no-progress"]
    flag = tmp_path / "paused"
    p = subprocess.Popen([sys.executable, "-c", PAUSED_SHARD, str(flag), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120  # a bound on a hang, not a timed assertion
    while not flag.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (out / "shard-000000.tar").is_file() and (out / "shard-000001.tar.tmp").is_file()
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == (f"oocid: interrupted; removed the 1 shard this run had written to {out} and "
                    "the one it was writing, and nothing else (run the same command again)"), err
    assert "checkpoint" not in err
    assert list(out.iterdir()) == []  # the folder was there before: kept, empty
    rerun = oocid(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "wrote 20 samples in 3 shards" in rerun.stdout


def test_shards_without_a_manifest_are_an_unfinished_write_the_same_command_replaces(
        tmp_path: Path) -> None:
    """A shard run killed before its manifest (SIGKILL: no clean-up) leaves shards and a
    temporary file; the same command replaces them without --force, saying so in one line."""
    src, out = tiny_npz(tmp_path / "t.npz", n=20), tmp_path / "shards"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"x" * 512)
    (out / "shard-000001.tar.tmp").write_bytes(b"y" * 100)
    p = oocid("shard", src, out, "--shard-size", 8, "--no-progress")
    assert p.returncode == 0, p.stderr
    assert f"oocid: warning: {out}: holds shards but no manifest.json" in p.stderr, p.stderr
    assert sorted(x.name for x in out.iterdir()) == [
        "manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
