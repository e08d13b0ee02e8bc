"""The `oocid` console command, run in subprocesses as a user runs it: help for every
subcommand, shard -> train -> knn -> bank verify/info on JPEG ImageFolders (Zarr and .npy
banks, in-memory and streamed data), one-line errors with the documented exit codes, resume.

Trainings are tiny (48 images of 20x24, 2 epochs); the time goes into starting Python and
importing torch in each process. So the `jobs` fixture starts every torch-importing command
in the background, as many at a time as there are CPUs, and each test waits for its own.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helpers
import numpy as np
import pytest
from helpers import Run, run_process
from PIL import Image

from oocid.bank.create import create_store

ENV = {**helpers.ENV, "COLUMNS": "200"}  # help text unwrapped, whatever the terminal

# ImageFolder images: class c is colour COLOURS[c] with pattern c, plus noise. H x W = 20 x 24.
COLOURS = ((200, 40, 40), (40, 180, 60), (50, 60, 210))
H, W = 20, 24
N_TRAIN, N_VAL = 48, 24
STEPS = N_TRAIN // 16  # steps an epoch at batch size 16

# The demo's recipe (configs/demo.toml), shrunk, for 3-channel images.
BASE_CONFIG: dict[str, dict[str, Any]] = {
    "model": {"arch": "small"},
    "data": {"image_size": 16, "augment": "cifar", "crop_scale_min": 0.5, "in_memory": "yes",
             "batch_size": 16, "workers": 0, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    "loss": {"kind": "softmax", "temperature": 0.1},
    "optim": {"epochs": 2, "lr": 0.03, "weight_decay": 5e-4, "schedule": "cosine"},
    "train": {"knn_k": 10, "knn_temperature": 0.07, "eval_every": 0},
}


def oocid(*args: object) -> Run:
    argv = [str(a) for a in args]
    return run_process([sys.executable, "-m", "oocid", *argv], argv, ENV)


def succeeded(run: Run) -> Run:
    assert run.rc == 0, run
    assert "Traceback" not in run.out + run.err, run
    return run


def ok(*args: object) -> Run:
    return succeeded(oocid(*args))


def assert_error(run: Run, code: int, names: Sequence[str]) -> str:
    """Exit `code`, exactly one stderr line `oocid: error: ...` matching each of `names`."""
    assert "Traceback" not in run.out + run.err, run
    assert run.rc == code, run
    lines = [ln for ln in run.err.splitlines() if ln.strip()]
    assert len(lines) == 1, run
    assert lines[0].startswith("oocid: error: "), run
    for name in names:
        assert re.search(name, lines[0]), f"{name!r} not named in: {lines[0]}"
    return lines[0]


def write_config(path: Path, **changes: dict[str, Any]) -> Path:
    """BASE_CONFIG with per-section `changes`, as TOML (JSON scalars and lists are TOML)."""
    sections = {sec: {**values, **changes.get(sec, {})} for sec, values in BASE_CONFIG.items()}
    text = "".join(f"[{sec}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                   + "\n" for sec, values in sections.items())
    path.write_text(text)
    return path


def image(c: int, rng: np.random.Generator, h: int = H, w: int = W) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    pattern = ((yy // 4) % 2, (xx // 4) % 2, (xx // 4 + yy // 4) % 2)[c]  # (h, w) in {0, 1}
    rgb = np.array(COLOURS[c], dtype=np.float64) * (0.6 + 0.4 * pattern[..., None])  # (h, w, 3)
    rgb += rng.normal(0, 12, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def image_folder(root: Path, n: int, seed: int, sizes: dict[int, tuple[int, int]] | None = None
                 ) -> Path:
    """An ImageFolder of n JPEGs in class folders c0, c1, c2; `sizes` maps i -> (h, w)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % len(COLOURS)
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        h, w = (sizes or {}).get(i, (H, W))
        image(c, rng, h, w).save(root / f"c{c}" / f"img{i:03d}.jpg", quality=90)
    return root


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def info(bank: Path) -> dict[str, str]:
    out = ok("bank", "info", bank).out
    return {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines())}


def copy_run(bank: Path, out: Path, dst: Path) -> tuple[Path, Path]:
    """A private copy of a run: the bank (with its sidecar files) and the run folder."""
    dst.mkdir()
    for p in bank.parent.glob(bank.name + "*"):  # x.npy, x.npy.meta.json, ...
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, dst / p.name)
    shutil.copytree(out, dst / out.name)
    return dst / bank.name, dst / out.name


# ------------------------------------------------------------------------------ fixtures


@dataclass
class Inputs:
    work: Path
    train: Path  # shards of 48 same-size JPEGs, 3 classes
    val: Path  # shards of 24
    config: Path
    mixed_train: Path  # shards with one image of another size
    mixed_val: Path
    bad: Path  # folder with the bad-input cases' files


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    """ImageFolders sharded with `oocid shard` (size 16), configs, the bad cases' files."""
    work = tmp_path_factory.mktemp("cli")
    tr, va = work / "shards-train", work / "shards-val"
    run = ok("shard", image_folder(work / "imgs-train", N_TRAIN, 0), tr, "--shard-size", 16,
             "--no-progress")
    assert f"wrote {N_TRAIN} samples in 3 shards" in run.out and "3 classes" in run.out, run
    ok("shard", image_folder(work / "imgs-val", N_VAL, 1), va, "--shard-size", 16,
       "--no-progress")
    mtr, mva = work / "mixed-train", work / "mixed-val"
    ok("shard", image_folder(work / "imgs-mixed-train", N_TRAIN, 2, {5: (31, 17)}), mtr,
       "--shard-size", 16, "--no-progress")
    ok("shard", image_folder(work / "imgs-mixed-val", 12, 3, {0: (40, 40)}), mva,
       "--shard-size", 16, "--no-progress")

    d = work / "bad"
    d.mkdir()
    (d / "empty-folder").mkdir()
    ok("bank", "init", d / "rows7.zarr", "--rows", 7)
    ok("bank", "init", d / "dim64.zarr", "--shards", tr, "--dim", 64)
    create_store(d / "knn.zarr", N_TRAIN, 128, chunk_rows=16).close()
    create_store(d / "corrupt.npy", N_TRAIN, 128, chunk_rows=16).close()
    rows = np.load(d / "corrupt.npy", mmap_mode="r+")  # (48, 128) memmap at the data offset
    rows[37, 5] = np.nan
    rows.flush()
    del rows
    (d / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (d / "typo.toml").write_text("[optim]\nlearning_rat = 1\n")
    (d / "wrongtype.toml").write_text('[optim]\nlr = "fast"\n')
    return Inputs(work, tr, va, write_config(work / "tiny.toml"), mtr, mva, d)


# name -> (exit code from oocid/errors.py, patterns the one error line must contain)
BAD: dict[str, tuple[int, tuple[str, ...]]] = {
    "shard-missing-source": (2, ("no-such-folder",)),
    "shard-empty-folder": (2, ("empty-folder",)),
    "train-bank-rows-mismatch": (3, (r"rows7\.zarr", "7 rows", "48")),
    "train-bank-dim-mismatch": (3, (r"dim64\.zarr", "64")),
    "train-unknown-config-key": (2, (r"typo\.toml", r"optim\.learning_rat")),
    "train-config-wrong-type": (2, (r"wrongtype\.toml", r"optim\.lr")),
    "train-missing-shards": (2, ("no-such-shards",)),
    "train-resume-fresh-bank": (2, (r"fresh\.zarr",)),
    "knn-garbage-checkpoint": (3, (r"garbage\.pt",)),
    "verify-corrupted-row": (1, (r"corrupt\.npy", r"\b37\b")),
    # refused before the line about loss.kind = auto (one line in all)
    "train-bank-of-another-kind": (2, (r"bx\.txt", r"\.zarr or \.npy")),
}


def bad_args(i: Inputs) -> dict[str, list[object]]:
    d = i.bad

    def train(bank: str, *extra: object, cfg: Path = i.config, src: Path = i.train
              ) -> list[object]:
        return ["train", "--shards", src, "--bank", d / bank, "--out", d / f"run-{bank}",
                "--config", cfg, "--no-progress", *extra]

    return {
        "shard-missing-source": ["shard", d / "no-such-folder", d / "s1", "--no-progress"],
        "shard-empty-folder": ["shard", d / "empty-folder", d / "s2", "--no-progress"],
        "train-bank-rows-mismatch": train("rows7.zarr"),
        "train-bank-dim-mismatch": train("dim64.zarr"),
        "train-unknown-config-key": train("t1.zarr", cfg=d / "typo.toml"),
        "train-config-wrong-type": train("t2.zarr", cfg=d / "wrongtype.toml"),
        "train-missing-shards": train("t3.zarr", src=d / "no-such-shards"),
        "train-resume-fresh-bank": train("fresh.zarr", "--resume"),
        "knn-garbage-checkpoint": ["knn", "--bank", d / "knn.zarr", "--checkpoint",
                                   d / "garbage.pt", "--shards", i.val, "--device", "cpu"],
        "verify-corrupted-row": ["bank", "verify", d / "corrupt.npy"],
        "train-bank-of-another-kind": train("bx.txt", "--loss", "auto"),
    }


# Outputs a refused command must not leave behind.
NOT_CREATED = {"shard-missing-source": "s1", "shard-empty-folder": "s2",
               "train-unknown-config-key": "t1.zarr", "train-config-wrong-type": "t2.zarr",
               "train-missing-shards": "t3.zarr", "train-resume-fresh-bank": "fresh.zarr",
               "train-bank-of-another-kind": "bx.txt"}


@pytest.fixture(scope="module")
def jobs(inputs: Inputs) -> Iterator[dict[str, Future[Any]]]:
    """Every torch-importing command of this file, started now in the background."""
    i, w = inputs, inputs.work
    pool = ThreadPoolExecutor(max_workers=32)  # threads mostly wait; SLOTS bounds processes
    futures: dict[str, Future[Any]] = {}

    def start(name: str, fn: Callable[[], Any]) -> None:
        futures[name] = pool.submit(fn)

    def train(bank: Path, out: Path, *extra: object, shards: Path = i.train) -> Callable[[], Run]:
        return lambda: oocid("train", "--shards", shards, "--bank", bank, "--out", out,
                             "--no-progress", *extra)

    # 2 epochs, Zarr bank, kNN check on the val shards; then `oocid knn` on its checkpoint.
    start("train-zarr", train(w / "bank.zarr", w / "run", "--config", i.config, "--val", i.val))

    def knn_zarr() -> Run:
        succeeded(futures["train-zarr"].result())
        return oocid("knn", "--bank", w / "bank.zarr", "--checkpoint", w / "run" / "last.pt",
                     "--shards", i.val, "--k", 10, "--out", w / "res.json", "--device", "cpu")

    start("knn-zarr", knn_zarr)

    def knn_unwritable() -> Run:
        succeeded(futures["train-zarr"].result())
        (w / "not-a-folder").write_text("x")  # ENOTDIR below it, even for root
        return oocid("knn", "--bank", w / "bank.zarr", "--checkpoint", w / "run" / "last.pt",
                     "--shards", i.val, "--k", 10, "--out", w / "not-a-folder" / "res.json",
                     "--device", "cpu")

    start("knn-unwritable", knn_unwritable)
    # 1 epoch (`--epochs 1` over the config), .npy bank: the npy test and the resume tests.
    start("train-npy", train(w / "one.npy", w / "run-one", "--config", i.config, "--epochs", 1))
    # Images of different sizes, streamed through the DataLoader (train and per-epoch kNN).
    stream_cfg = write_config(w / "stream.toml", data={"in_memory": "no"},
                              train={"eval_every": 1})
    start("train-stream", train(w / "stream.zarr", w / "run-stream", "--config", stream_cfg,
                                "--val", i.mixed_val, shards=i.mixed_train))
    for name, args in bad_args(i).items():
        start(f"bad:{name}", lambda args=args: oocid(*args))

    def resume(name: str, *extra: object) -> Callable[[], tuple[Run, Path, Path]]:
        def go() -> tuple[Run, Path, Path]:
            succeeded(futures["train-npy"].result())
            bank, out = copy_run(w / "one.npy", w / "run-one", w / f"resume-{name}")
            return oocid("train", "--shards", i.train, "--bank", bank, "--out", out,
                         "--resume", "--no-progress", *extra), bank, out
        return go

    changed = write_config(w / "changed.toml", optim={"lr": 0.1, "epochs": 1})
    start("resume-same", resume("same", "--epochs", 1))  # no --config: config.json + override
    start("resume-changed", resume("changed", "--config", changed))
    start("resume-more", resume("more", "--epochs", 2))
    start("train-max-steps", train(w / "steps.npy", w / "run-steps", "--config", i.config,
                                   "--max-steps", 2))

    def resume_fewer() -> Run:  # the 2-epoch run resumed with --epochs 1
        succeeded(futures["train-zarr"].result())
        bank, out = copy_run(w / "bank.zarr", w / "run", w / "resume-fewer")
        return oocid("train", "--shards", i.train, "--bank", bank, "--out", out, "--resume",
                     "--no-progress", "--epochs", 1)

    start("resume-fewer", resume_fewer)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------ end to end


def test_train_knn_verify_info_zarr(inputs: Inputs, jobs: dict[str, Future[Any]]) -> None:
    w = inputs.work
    run = succeeded(jobs["train-zarr"].result())
    summary = run.last_json()
    assert (summary["epochs"], summary["step"]) == (2, 2 * STEPS), run
    assert [m["epoch"] for m in metrics(w / "run")] == [1, 2]
    assert 0.0 <= summary["knn_top1"] <= 1.0 and "knn_top5" not in summary  # 3 classes
    assert (w / "run" / "last.pt").is_file() and (w / "run" / "config.json").is_file()
    done = run.out.strip().splitlines()[-2]  # the line in words before the JSON
    assert re.fullmatch(rf"done: epochs 1-2 of 2 \({2 * STEPS} steps, \d+ s\); kNN top-1 "
                        rf"{summary['knn_top1']:.4f} \(epoch 2\); checkpoint "
                        rf"{re.escape(str(w / 'run' / 'last.pt'))}", done), run

    knn = succeeded(jobs["knn-zarr"].result())
    res = json.loads((w / "res.json").read_text())
    assert 0.0 <= res["top1"] <= 1.0
    assert "top5" not in res and "top-5" not in knn.out, knn  # 3 classes: top-5 is always 1
    assert (res["queries"], res["bank_rows"], res["k"]) == (N_VAL, N_TRAIN, 10)

    assert f"ok ({N_TRAIN} rows x 128" in ok("bank", "verify", w / "bank.zarr").out
    meta = info(w / "bank.zarr")
    assert (meta["n_rows"], meta["dim"], meta["kind"]) == (str(N_TRAIN), "128", "zarr")
    assert meta["committed_step"] == str(2 * STEPS)


def test_npy_bank(inputs: Inputs, jobs: dict[str, Future[Any]]) -> None:
    w = inputs.work
    run = succeeded(jobs["train-npy"].result())
    assert run.last_json()["epochs"] == 1, run
    assert [m["epoch"] for m in metrics(w / "run-one")] == [1]
    assert f"ok ({N_TRAIN} rows x 128" in ok("bank", "verify", w / "one.npy").out
    meta = info(w / "one.npy")
    assert (meta["n_rows"], meta["kind"], meta["committed_step"]) == (str(N_TRAIN), "npy",
                                                                      str(STEPS))


def test_streamed_images_of_different_sizes(inputs: Inputs,
                                            jobs: dict[str, Future[Any]]) -> None:
    """in_memory = "no": per-sample transforms through the DataLoader (workers 0) for training
    and the per-epoch kNN check; one train and one val JPEG have another size."""
    run = succeeded(jobs["train-stream"].result())
    recs = metrics(inputs.work / "run-stream")
    assert [m["epoch"] for m in recs] == [1, 2], run
    assert all(m["images"] == N_TRAIN and m["bad_samples"] == 0 for m in recs), recs
    assert all(0.0 <= m["knn_top1"] <= 1.0 and "knn_top5" not in m for m in recs), recs


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_with_its_exit_code(inputs: Inputs, jobs: dict[str, Future[Any]],
                                                  case: str) -> None:
    code, names = BAD[case]
    assert_error(jobs[f"bad:{case}"].result(), code, names)
    if case in NOT_CREATED:
        assert not (inputs.bad / NOT_CREATED[case]).exists(), "a refused command left output"


# ------------------------------------------------------------------------------ resume


def test_resume_without_config_reuses_the_runs_config(jobs: dict[str, Future[Any]]) -> None:
    """No --config: the run folder's config.json is the base and `--epochs 1` (its own value)
    applies on top, so nothing changes and there is nothing left to do."""
    run, _, out = jobs["resume-same"].result()
    succeeded(run)
    assert "resumed" in run.err and run.last_json()["epochs"] == 1, run
    assert run.out.splitlines()[0] == (f"run already complete at epoch 1 (step {STEPS}); "
                                       "nothing to do"), run
    assert "lr schedule" not in run.err, run
    assert [m["epoch"] for m in metrics(out)] == [1]


def test_resume_with_a_changed_config_is_an_error(inputs: Inputs,
                                                 jobs: dict[str, Future[Any]]) -> None:
    run, bank, out = jobs["resume-changed"].result()
    assert_error(run, 2, ("different config", r"config\.json"))
    assert [m["epoch"] for m in metrics(out)] == [1]
    assert bank.read_bytes() == (inputs.work / "one.npy").read_bytes()  # untouched


def test_resume_continues_with_more_epochs(jobs: dict[str, Future[Any]]) -> None:
    run, bank, out = jobs["resume-more"].result()
    assert run.rc == 0, run
    assert run.last_json()["epochs"] == 2, run
    assert [m["epoch"] for m in metrics(out)] == [1, 2]
    # cosine over 1 epoch of 3 steps: the last at a quarter of 0.03 (the schedule's end, 0, is
    # no step's); over 2 epochs the next step's lr is half of 0.03
    assert ("oocid: optim.epochs 1 -> 2: the lr schedule is recomputed for 2 epochs; lr 0.015 "
            f"now, 0.0075 at the checkpoint (step {STEPS})") in run.err.splitlines(), run
    assert run.out.splitlines()[0].startswith(f"done: epoch 2 of 2 ({STEPS} steps, "), run
    assert info(bank)["committed_step"] == str(2 * STEPS)


def test_resume_with_fewer_epochs_than_done_is_refused(jobs: dict[str, Future[Any]]) -> None:
    assert_error(jobs["resume-fewer"].result(), 2,
                 ("has already trained 2 epochs", "--epochs above 2"))


def test_max_steps_says_where_it_stopped_before_the_json(jobs: dict[str, Future[Any]]) -> None:
    run = succeeded(jobs["train-max-steps"].result())
    assert run.out.splitlines()[0] == "stopped at step 2 (--max-steps); continue with --resume"
    assert run.last_json()["step"] == 2 and len(run.out.splitlines()) == 2, run


# ------------------------------------------------------------------------------ help

HELP = [
    (["shard"], "--shard-size"),
    (["train"], "--resume"),
    (["knn"], "--checkpoint"),
    (["demo"], "--epochs"),
    (["bank", "info"], "path"),
    (["bank", "verify"], "--tol"),
    (["bank", "init"], "--rows"),
]


@pytest.mark.parametrize(("cmd", "option"), HELP, ids=[" ".join(c) for c, _ in HELP])
def test_help(cmd: list[str], option: str) -> None:
    run = ok(*cmd, "--help")
    assert f"oocid {' '.join(cmd)}" in run.out, run
    assert option in run.out, run


def test_top_level_help_lists_every_command() -> None:
    out = ok("--help").out
    for name in ("shard", "train", "knn", "demo", "bank"):
        assert re.search(rf"\b{name}\b", out), out
    out = ok("bank", "--help").out
    for name in ("info", "verify", "init"):
        assert re.search(rf"\b{name}\b", out), out


def test_knn_out_that_cannot_be_written_is_exit_4_before_any_work(
        jobs: dict[str, Future[Any]], inputs: Inputs) -> None:
    """--out below a file fails with one line before the search, and leaves nothing."""
    run = jobs["knn-unwritable"].result()
    assert_error(run, 4, [r"not-a-folder/res\.json", "could not write results"])
    assert run.out == ""
    assert (inputs.work / "not-a-folder").read_text() == "x"
