"""What a new user's first runs meet, run as `oocid` processes: the recipe (no --config) on a
bank larger than the device cache, --loss infonce without --nce-k, a resume with a changed
setting and the advice it gets, the step a --max-steps stop reports, and a validation set that
is the training set."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from helpers import ENV, Run, run_process, tiny_npz

from oocid.checkpoint import load_checkpoint
from oocid.data.manifest import read_manifest
from oocid.data.writer import write_shards
from oocid.eval.classes import not_held_out

N = 128  # 16 px grayscale images in 8 shards of 16 (8 bank chunks)
HELD_OUT = ("oocid: warning: the validation shards are the training shards: the accuracy is "
            "not on held-out images")


def oocid(*args: object) -> Run:
    argv = [str(a) for a in args]
    return run_process([sys.executable, "-m", "oocid", *argv], argv, ENV)


def ok(*args: object) -> Run:
    run = oocid(*args)
    assert run.rc == 0 and "Traceback" not in run.out + run.err, run
    return run


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("trial")
    write_shards(tiny_npz(work / "d.npz", n=N), work / "shards", shard_size=16, progress=False)
    return work / "shards"


def test_the_recipe_trains_a_bank_larger_than_the_cache_with_infonce(shards: Path,
                                                                     tmp_path: Path) -> None:
    """No --config and --cache-mb under the bank (128 rows x 128 x 4 B = 64 KB; 0.03 MB holds
    61 rows): loss.kind auto resolves to InfoNCE with the recipe's K (half the rows), where the
    recipe's softmax stopped the run."""
    run = ok("train", "--shards", shards, "--bank", tmp_path / "b.zarr", "--out", tmp_path / "r",
             "--epochs", 1, "--cache-mb", 0.03, "--no-progress")
    lines = run.err.splitlines()  # the recipe's line, then the loss it resolved to
    assert lines[0].startswith("oocid: recipe for ") and ("exact softmax (t 0.1) while the bank "
                                                          "fits the device cache, else InfoNCE "
                                                          "K 64") in lines[0], run
    assert lines[1].startswith("oocid: loss.kind = auto -> infonce (the bank of 128 rows does "
                               "not fit"), run
    assert load_checkpoint(tmp_path / "r" / "last.pt")["config"]["loss"]["kind"] == "infonce"
    assert run.last_json()["epochs"] == 1, run


def test_loss_infonce_needs_no_nce_k_and_the_val_set_is_named_the_training_set(
        shards: Path, tmp_path: Path) -> None:
    """`--loss infonce` on 128 images runs with the recipe's K 64 (the default 4096 needed
    --nce-k); `--val` and `knn --shards` given the training shards say so in one line."""
    run = ok("train", "--shards", shards, "--bank", tmp_path / "b.npy", "--out", tmp_path / "r",
             "--epochs", 1, "--loss", "infonce", "--val", shards, "--no-progress")
    assert load_checkpoint(tmp_path / "r" / "last.pt")["config"]["loss"]["nce_k"] == 64
    assert run.err.splitlines().count(HELD_OUT) == 1, run
    knn = ok("knn", "--checkpoint", tmp_path / "r" / "last.pt", "--bank", tmp_path / "b.npy",
             "--shards", shards, "--k", 5)
    assert knn.err.splitlines() == [HELD_OUT], knn
    assert "kNN top-1" in knn.out, knn


def test_only_the_same_shard_list_is_named_the_training_set(shards: Path, tmp_path: Path
                                                            ) -> None:
    write_shards(tiny_npz(tmp_path / "v.npz", n=32, seed=1), tmp_path / "v", shard_size=16,
                 progress=False)
    train = read_manifest(shards)
    assert not_held_out(train, read_manifest(tmp_path / "v")) is None
    assert not_held_out(train, read_manifest(shards)) == HELD_OUT


def test_max_steps_below_one_is_refused_before_any_step(shards: Path, tmp_path: Path) -> None:
    """`--max-steps 0` (say, for an untrained baseline) ran one step and reported "stopped at
    step 1": the stop was checked only after a step. Now 0 and -1 are input errors, with no
    bank or run folder left behind."""
    for n in (0, -1):
        run = oocid("train", "--shards", shards, "--bank", tmp_path / "b.zarr", "--out",
                    tmp_path / "r", "--max-steps", n, "--no-progress")
        assert run.rc == 2 and run.err.splitlines() == [
            f"oocid: error: --max-steps must be >= 1, got {n}"], run
        assert not (tmp_path / "r").exists() and not (tmp_path / "b.zarr").exists()


def test_max_steps_after_an_epoch_end_reports_its_own_step_and_resume_advice_works(
        shards: Path, tmp_path: Path) -> None:
    """4 steps an epoch (batch 32): --max-steps 2, then --resume --max-steps 4 ends epoch 1 at
    step 4 and stops at 6; the JSON line, the stop line and the checkpoint all say 6. A resume
    that changes data.batch_size is refused with advice that works: --resume without the
    override, or --config with the run's config.json."""
    bank, out = tmp_path / "b.zarr", tmp_path / "r"
    first = ["train", "--shards", shards, "--bank", bank, "--out", out, "--no-progress"]
    ok(*first, "--epochs", 3, "--batch-size", 32, "--max-steps", 2)
    run = ok(*first, "--resume", "--max-steps", 4)
    assert run.out.splitlines()[0] == "stopped at step 6 (--max-steps); continue with --resume"
    assert run.last_json()["step"] == 6, run
    assert run.last_json()["epochs"] == 1 and run.last_json()["epoch"] == 1, run
    assert load_checkpoint(out / "last.pt")["step"] == 6
    assert (out / "ckpt-000000006.pt").is_file()

    changed = oocid(*first, "--resume", "--batch-size", 64)
    assert changed.rc == 2 and len(changed.err.splitlines()) == 1, changed
    assert re.search(r"different config \(data\.batch_size 32 -> 64\); resume without changing "
                     r"it: with no --config, --resume reads the run's config from "
                     + re.escape(str(out / "config.json")), changed.err), changed
    done = ok(*first, "--resume", "--config", out / "config.json")
    assert done.last_json()["step"] == 12 and done.last_json()["epochs"] == 3, done
