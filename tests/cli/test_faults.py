"""Faults and bad input through the `oocid` command, as a user meets them (README "When things go
wrong"): each case exits with its documented code and one line `oocid: error: <file>: <problem>`
and no traceback, or is skipped and counted where skipping is the policy; after a failed write
the previous checkpoint loads, the bank verifies and `--resume` completes.

Cases: a disk full (RLIMIT_FSIZE) during a checkpoint write and during a bank commit; a
truncated shard (the manifest's size check, and the tar reader's); a garbage image member
(skipped, counted); a garbage json member; a non-image file and a broken image in the source
folder (skipped, listed); a manifest whose identity does not match its shard list; shards whose
sample indices do not match the manifest; a bank of other shards, of the wrong dtype, without
metadata; a checkpoint from another config; a config that is not TOML, an override with an
unknown key or a NaN; NaN and Inf from the model (injected: skipped and counted; 20 in a row:
diverged, exit 5); a second trainer on a bank in use; a dead trainer's stale lock. Trainings
are tiny (48 gray 16x16 images); the time is Python and torch starting in each process, so
the cases that take one command are prepared and started in the background (as many at a time
as there are CPUs) by the module fixture, and each test waits for its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import ENV, Run, run_process
from PIL import Image

from oocid.bank.store import open_store
from oocid.bank.verify import verify_store
from oocid.checkpoint import load_checkpoint
from oocid.data.manifest import MANIFEST_NAME, manifest_identity
from oocid.data.writer import write_shards

N, SHARD = 48, 16

CONFIG = """
[model]
arch = "small"
channels_last = false
[data]
image_size = 16
augment = "gray"
in_memory = "{in_memory}"
batch_size = 16
workers = 0
shuffle_buffer = 16
mean = [0.5]
std = [0.25]
[loss]
kind = "softmax"
temperature = 0.1
[optim]
epochs = {epochs}
lr = 0.03
momentum = {momentum}
schedule = "cosine"
[train]
eval_every = 0
threads = 1
"""

# The real entry point, with faults: FAULT_FSIZE sets RLIMIT_FSIZE (Python ignores SIGXFSZ,
# so a write past it fails with EFBIG, as on a full disk); FAULT_CALLS poisons the model's
# features at the listed forward calls ("2,5") or from one on ("7-") with FAULT_VALUE (nan, inf).
FAULTS = r"""
import os, resource, sys
if "FAULT_FSIZE" in os.environ:
    size = int(os.environ["FAULT_FSIZE"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
if "FAULT_CALLS" in os.environ:
    from oocid import models
    real, calls = models.Embedder.forward, {"n": 0}
    spec, value = os.environ["FAULT_CALLS"], float(os.environ["FAULT_VALUE"])
    def poisoned(self, x):
        calls["n"] += 1
        hit = calls["n"] >= int(spec[:-1]) if spec.endswith("-") else str(calls["n"]) in spec.split(",")
        f = real(self, x)
        return f * value if hit else f
    models.Embedder.forward = poisoned
sys.argv = ["oocid", *sys.argv[1:]]
from oocid.cli.entry import main
main()
"""


def oocid(*args: object, fsize: int | None = None, poison: tuple[str, str] | None = None) -> Run:
    """`python -m oocid ARGS`, or with `fsize` (RLIMIT_FSIZE in bytes) or `poison`
    ((FAULT_CALLS, FAULT_VALUE)) the same through FAULTS (no preexec_fn: threads run here)."""
    argv = [str(a) for a in args]
    env = dict(ENV)
    cmd = [sys.executable, "-m", "oocid", *argv]
    if fsize is not None:
        env["FAULT_FSIZE"] = str(fsize)
    if poison is not None:
        env.update(FAULT_CALLS=poison[0], FAULT_VALUE=poison[1])
    if fsize is not None or poison is not None:
        cmd = [sys.executable, "-c", FAULTS, *argv]
    return run_process(cmd, argv, env)


def ok(run: Run) -> Run:
    assert run.rc == 0, run
    assert "Traceback" not in run.out + run.err, run
    return run


def assert_error(run: Run, code: int, names: Sequence[str]) -> str:
    """Exit `code`, one stderr line `oocid: error: ...` matching every pattern of `names`."""
    assert "Traceback" not in run.out + run.err, run
    assert run.rc == code, run
    errors = [ln for ln in run.err.splitlines() if ln.startswith("oocid: error: ")]
    assert len(errors) == 1 and run.err.strip().splitlines()[-1] == errors[0], run
    for name in names:
        assert re.search(name, errors[0]), f"{name!r} not in: {errors[0]}"
    return errors[0]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_args(shards: Path, bank: Path, out: Path, cfg: Path | None, *extra: object) -> list[object]:
    return ["train", "--shards", shards, "--bank", bank, "--out", out, "--no-progress",
            *(["--config", cfg] if cfg is not None else []), *extra]


# ---- data and its corruptions ----------------------------------------------------------------


def make_shards(root: Path, n: int = N, shard: int = SHARD, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "d.npz", images=rng.integers(0, 256, (n, 16, 16), dtype=np.uint8),
             labels=np.arange(n) % 3)
    write_shards(root / "d.npz", root / "shards", shard_size=shard, progress=False)
    return root / "shards"


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def members(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def write_members(shard: Path, items: list[tuple[str, bytes]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())


def reseal_manifest(shards: Path) -> None:
    """Make manifest.json describe the shard files as they are now (sizes, sha256, identity),
    as if the damage had been there when `oocid shard` wrote them."""
    path = shards / MANIFEST_NAME
    m = json.loads(path.read_text())
    for s in m["shards"]:
        data = (shards / s["name"]).read_bytes()
        s["nbytes"], s["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    from oocid.data.manifest import ShardInfo

    infos = tuple(ShardInfo(**s) for s in m["shards"])
    m["identity"] = manifest_identity(m["n"], m["shard_size"], infos)
    path.write_text(json.dumps(m))


def edit_shard(shards: Path, name: str, change: Callable[[list[tuple[str, bytes]]], None]) -> None:
    items = members(shards / name)
    change(items)
    write_members(shards / name, items)
    reseal_manifest(shards)


@dataclass
class Setup:
    work: Path
    shards: Path
    cfg: Path  # in memory, 2 epochs
    stream_cfg: Path  # streamed, 2 epochs
    base_bank: Path  # trained 1 epoch with cfg
    base_run: Path
    runs: dict[str, Future[Run]] = field(default_factory=dict)  # the one-command cases

    def run(self, case: str) -> Run:
        return self.runs[case].result()


# case name -> prepares its inputs, returns its command line (registered by `@one_command`)
ONE_COMMAND: dict[str, Callable[[Setup], list[object]]] = {}


def one_command(*names: str) -> Callable[[Callable[..., list[object]]], Callable[..., list[object]]]:
    """Register a case's preparation; with several names, it is called as fn(setup, name)."""
    def register(fn: Callable[..., list[object]]) -> Callable[..., list[object]]:
        for name in names:
            ONE_COMMAND[name] = (lambda s, n=name: fn(s, n)) if len(names) > 1 else fn
        return fn
    return register


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("faults")
    shards = make_shards(work)
    cfg = work / "cfg.toml"
    cfg.write_text(CONFIG.format(in_memory="yes", epochs=2, momentum=0.9))
    stream_cfg = work / "stream.toml"
    stream_cfg.write_text(CONFIG.format(in_memory="no", epochs=2, momentum=0.9))
    bank, run = work / "base.npy", work / "base-run"
    ok(oocid(*train_args(shards, bank, run, cfg, "--epochs", 1)))
    s = Setup(work, shards, cfg, stream_cfg, bank, run)
    pool = ThreadPoolExecutor(max_workers=32)  # threads wait; SLOTS bounds the processes
    for name, prepare in ONE_COMMAND.items():
        s.runs[name] = pool.submit(oocid, *prepare(s))
    yield s
    pool.shutdown(wait=True, cancel_futures=True)


def private_copy(s: Setup, name: str) -> tuple[Path, Path]:
    """A copy of the base run (bank with its sidecar files, run folder) to damage."""
    dst = s.work / name
    dst.mkdir()
    for p in s.base_bank.parent.glob(s.base_bank.name + "*"):
        if not p.name.endswith(".lock"):
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, dst / p.name)
    shutil.copytree(s.base_run, dst / "run")
    return dst / s.base_bank.name, dst / "run"


def assert_intact(bank: Path, run: Path, step: int) -> None:
    """The bank verifies at committed step `step` and last.pt (that step's) loads."""
    rep = verify_store(bank)
    assert rep.ok, rep.problems
    with open_store(bank, read_only=True) as st:
        assert st.meta.committed_step == step and not st.pending_journal
    assert load_checkpoint(run / "last.pt")["step"] == step
    assert not list(run.glob("*.tmp")), list(run.glob("*"))


# ---- disk full -------------------------------------------------------------------------------


def test_disk_full_during_the_checkpoint_write(setup: Setup) -> None:
    """A limit below the checkpoint's size but above everything else (the bank's journal of
    48 x 128 rows is 25 KB): the epoch's checkpoint write fails, exit 4, naming the file."""
    bank, run = private_copy(setup, "full-ckpt")
    step = load_checkpoint(run / "last.pt")["step"]
    size = (run / "last.pt").stat().st_size
    limit = size // 2
    assert limit > 4 * N * 128 * 4, "the journal must fit under the limit"
    res = oocid(*train_args(setup.shards, bank, run, None, "--resume", "--epochs", 2), fsize=limit)
    assert_error(res, 4, (re.escape(str(run / f"ckpt-{2 * step:09d}.pt")),
                          "could not write checkpoint: disk full"))
    assert_intact(bank, run, step)
    ok(oocid(*train_args(setup.shards, bank, run, None, "--resume", "--epochs", 2)))
    assert [m["epoch"] for m in metrics(run)] == [1, 2]
    assert verify_store(bank).ok


@pytest.mark.parametrize("kind", ["zarr"])  # npy: the checkpoint test above; tests/bank/test_store.py
def test_disk_full_during_the_bank_commit(tmp_path: Path, kind: str) -> None:
    """2048 rows: the epoch's journal (1 MB) exceeds the limit, the checkpoint (SGD without
    momentum, 0.47 MB) does not: the bank commit fails, exit 4, naming the bank; the new
    checkpoint file is there but unpaired, so --resume takes the previous one."""
    shards = make_shards(tmp_path, n=2048, shard=256)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG.format(in_memory="yes", epochs=2, momentum=0.0)
                   .replace("batch_size = 16", "batch_size = 256"))
    bank, run = tmp_path / f"bank.{kind}", tmp_path / "run"
    ok(oocid(*train_args(shards, bank, run, cfg, "--epochs", 1)))
    ckpt = (run / "last.pt").stat().st_size
    limit = 768 * 1024
    assert ckpt < limit < 2048 * 128 * 4, ckpt
    res = oocid(*train_args(shards, bank, run, None, "--resume", "--epochs", 2), fsize=limit)
    assert_error(res, 4, (re.escape(str(bank)),
                          r"could not write bank journal: disk full \(File too large\)"))
    assert_intact(bank, run, 8)
    ok(oocid(*train_args(shards, bank, run, None, "--resume", "--epochs", 2)))
    assert [m["epoch"] for m in metrics(run)] == [1, 2]
    with open_store(bank, read_only=True) as st:
        assert st.meta.committed_step == 16
    assert verify_store(bank).ok


# ---- outputs that cannot be written -------------------------------------------------------------
# A regular file as the parent folder: ENOTDIR, which blocks root too (permission bits do not).

UNWRITABLE = {  # case -> (the path named, what could not be written)
    "embed": ("nf-embed/feats.npy", "features"),
    "bank-init": ("nf-init/sub/bank.zarr", "bank"),
    "train-out": ("nf-out/run/config.json", "the run's config"),
    "train-bank": ("nf-bank/bank.npy", "bank"),
}


@one_command(*(f"unwritable:{c}" for c in UNWRITABLE))
def unwritable(setup: Setup, name: str) -> list[object]:
    case = name.split(":")[1]
    (setup.work / f"nf-{case.split('-')[-1]}").write_text("a file, not a folder")
    w = setup.work
    return {"embed": ["embed", "--checkpoint", setup.base_run / "last.pt", "--shards",
                      setup.shards, "--out", w / "nf-embed" / "feats.npy", "--device", "cpu"],
            "bank-init": ["bank", "init", w / "nf-init" / "sub" / "bank.zarr", "--shards",
                          setup.shards],
            "train-out": train_args(setup.shards, w / "tu.npy", w / "nf-out" / "run", setup.cfg),
            "train-bank": train_args(setup.shards, w / "nf-bank" / "bank.npy", w / "tb",
                                     setup.cfg),
            }[case]


@pytest.mark.parametrize("case", list(UNWRITABLE))
def test_an_output_that_cannot_be_written_is_exit_4_before_any_work(setup: Setup,
                                                                    case: str) -> None:
    """embed, bank init and train with an output below a file: one line naming the output and
    the file in the way, exit 4, nothing written (train: neither bank nor run folder)."""
    path, what = UNWRITABLE[case]
    folder = path.split("/")[0]
    assert_error(setup.run(f"unwritable:{case}"), 4, (
        re.escape(f"{setup.work / path}: could not write {what}: {setup.work / folder} is not "
                  "a folder"),))
    assert (setup.work / folder).read_text() == "a file, not a folder"
    assert not (setup.work / "tu.npy").exists() and not (setup.work / "tb").exists()


def test_embed_that_runs_out_of_space_keeps_the_earlier_output(setup: Setup) -> None:
    """A file size limit (RLIMIT_FSIZE: EFBIG, as a full disk) above the (48, 128) rows'
    memory map but below the .npz: exit 4 naming the output, the .npz of the earlier run is
    unchanged and no temporary file is left."""
    out = setup.work / "space" / "feats.npz"
    out.parent.mkdir()
    args = ["embed", "--checkpoint", setup.base_run / "last.pt", "--shards", setup.shards,
            "--out", out, "--device", "cpu", "--no-progress"]
    ok(oocid(*args))
    before = out.read_bytes()
    assert N * 128 * 4 + 128 < 25_000 < len(before), len(before)
    assert_error(oocid(*args, fsize=25_000), 4, (re.escape(str(out)),
                                                 r"could not write features: disk full"))
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["feats.npz"]


def test_shard_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """`oocid shard` whose first shard hits a file size limit (EFBIG, as a full disk): exit 4
    naming the shard, no traceback (not even one printed when the tar stream is collected),
    and no output folder left behind."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (64, 16, 16), dtype=np.uint8))
    out = tmp_path / "out"
    assert_error(oocid("shard", tmp_path / "d.npz", out, "--shard-size", 32, "--no-progress",
                       fsize=4_000), 4, (re.escape(str(out / "shard-000000.tar")),
                                         r"could not write shard: disk full"))
    assert not out.exists()


# ---- corrupt shards and source folders ---------------------------------------------------------


@one_command("truncated-size")
def truncated_size(setup: Setup) -> list[object]:
    shards = copy_shards(setup.shards, setup.work / "trunc-size")
    p = shards / "shard-000001.tar"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return train_args(shards, setup.work / "ts.npy", setup.work / "ts", setup.cfg)


def test_truncated_shard_fails_the_manifests_size_check(setup: Setup) -> None:
    assert_error(setup.run("truncated-size"), 3, (r"shard-000001\.tar",
                                                  r"size \d+ B, manifest says \d+ B"))


@one_command("truncated-tar:cfg", "truncated-tar:stream_cfg")
def truncated_tar(setup: Setup, name: str) -> list[object]:
    cfg = name.split(":")[1]
    shards = copy_shards(setup.shards, setup.work / f"trunc-tar-{cfg}")
    p = shards / "shard-000002.tar"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    reseal_manifest(shards)
    return train_args(shards, setup.work / f"tt-{cfg}.npy", setup.work / f"tt-{cfg}",
                      getattr(setup, cfg))


@pytest.mark.parametrize("cfg", ["cfg", "stream_cfg"])
def test_truncated_tar_stops_training_with_its_name(setup: Setup, cfg: str) -> None:
    """The manifest resealed to the truncated file: the tar reader itself finds the damage,
    in the in-memory decode and in the stream."""
    p = setup.work / f"trunc-tar-{cfg}" / "shard-000002.tar"
    assert_error(setup.run(f"truncated-tar:{cfg}"), 3, (re.escape(str(p)), "truncated"))


def damaged_copy(setup: Setup, name: str) -> Path:
    """The shards with 512 bytes of shard-000001.tar overwritten over its third member's
    header; the file keeps its size, so the manifest's size check passes."""
    shards = copy_shards(setup.shards, setup.work / name)
    p = shards / "shard-000001.tar"
    with tarfile.open(p) as tar:
        at = tar.getmembers()[2].offset
    data = bytearray(p.read_bytes())
    data[at:at + 512] = bytes(range(256)) * 2
    p.write_bytes(bytes(data))
    return shards


CHANGED = (r"shard-000001\.tar: sha256 does not match the manifest \(the shard changed after "
           r"`oocid shard`\)$")


@one_command("damaged")
def damaged(setup: Setup) -> list[object]:
    return train_args(damaged_copy(setup, "damaged"), setup.work / "dm.npy", setup.work / "dm",
                      setup.cfg)


def test_damage_of_unchanged_size_is_not_called_truncated(setup: Setup) -> None:
    """Without --verify-checksums the tar reader finds the damage: it says damaged (not
    truncated), where, and points at --verify-checksums."""
    with tarfile.open(setup.shards / "shard-000001.tar") as tar:  # the intact original
        at, after = tar.getmembers()[2].offset, tar.getmembers()[1].name
    line = assert_error(setup.run("damaged"), 3, (
        re.escape(str(setup.work / "damaged" / "shard-000001.tar")),
        re.escape(f"damaged tar: corrupt header at byte {at} (after member {after})"),
        "run with --verify-checksums"))
    assert "truncated" not in line


@one_command("verify:train", "verify:train-val", "verify:embed", "verify:knn", "verify:search")
def verify_checksums(setup: Setup, name: str) -> list[object]:
    cmd = name.split(":")[1]
    shards = damaged_copy(setup, f"verify-{cmd}")
    ckpt = setup.base_run / "last.pt"
    query = setup.work / "query.png"
    Image.fromarray(np.full((16, 16), 99, np.uint8)).save(query)
    return {"train": train_args(shards, setup.work / "v.npy", setup.work / "v", setup.cfg,
                                "--verify-checksums"),
            "train-val": train_args(setup.shards, setup.work / "vv.npy", setup.work / "vv",
                                    setup.cfg, "--val", shards, "--verify-checksums"),
            "embed": ["embed", "--checkpoint", ckpt, "--shards", shards, "--out",
                      setup.work / "ve.npy", "--device", "cpu", "--verify-checksums"],
            "knn": ["knn", "--checkpoint", ckpt, "--bank", setup.base_bank, "--shards",
                    setup.shards, "--train-shards", shards, "--device", "cpu",
                    "--verify-checksums"],
            "search": ["knn", "--checkpoint", ckpt, "--bank", setup.base_bank, "--query", query,
                       "--train-shards", shards, "--device", "cpu", "--verify-checksums"],
            }[cmd]


@pytest.mark.parametrize("cmd", ["train", "train-val", "embed", "knn", "search"])
def test_verify_checksums_names_the_changed_shard(setup: Setup, cmd: str) -> None:
    """--verify-checksums on each command that reads shards (the training shards, --val, the
    shards embedded, kNN's training shards): one line naming the shard whose sha256 is not the
    manifest's, before anything is written."""
    assert_error(setup.run(f"verify:{cmd}"), 3,
                 (re.escape(str(setup.work / f"verify-{cmd}")) + "/" + CHANGED,))
    for out in ("v.npy", "v", "vv.npy", "vv", "ve.npy"):
        assert not (setup.work / out).exists(), out


@one_command("garbage-image:cfg", "garbage-image:stream_cfg")
def garbage_image(setup: Setup, name: str) -> list[object]:
    cfg = name.split(":")[1]
    shards = copy_shards(setup.shards, setup.work / f"garbage-img-{cfg}")

    def garbage(items: list[tuple[str, bytes]]) -> None:
        i = next(i for i, (name, _) in enumerate(items) if name.startswith("000000020."))
        items[i] = (items[i][0], b"\x89PNG but not really" * 10)

    edit_shard(shards, "shard-000001.tar", garbage)
    return train_args(shards, setup.work / f"gi-{cfg}.npy", setup.work / f"gi-{cfg}",
                      getattr(setup, cfg))


@pytest.mark.parametrize("cfg", ["cfg", "stream_cfg"])
def test_garbage_image_member_is_skipped_and_counted(setup: Setup, cfg: str) -> None:
    res, run = ok(setup.run(f"garbage-image:{cfg}")), setup.work / f"gi-{cfg}"
    assert re.search(r"oocid: warning: skipped bad sample shard-000001\.tar:000000020", res.err), res
    recs = metrics(run)
    assert [(m["bad_samples"], m["images"]) for m in recs] == [(1, N - 1)] * 2, recs


@one_command("garbage-json")
def garbage_json(setup: Setup) -> list[object]:
    shards = copy_shards(setup.shards, setup.work / "garbage-json")

    def garbage(items: list[tuple[str, bytes]]) -> None:
        i = next(i for i, (name, _) in enumerate(items) if name == "000000035.json")
        items[i] = (items[i][0], b"\x00{not json")

    edit_shard(shards, "shard-000002.tar", garbage)
    return train_args(shards, setup.work / "gj.npy", setup.work / "gj", setup.stream_cfg)


def test_garbage_json_member_stops_training_with_shard_and_sample(setup: Setup) -> None:
    assert_error(setup.run("garbage-json"), 3, (r"shard-000002\.tar: sample 000000035: bad json member",))


@one_command("swapped")
def swapped(setup: Setup) -> list[object]:
    shards = copy_shards(setup.shards, setup.work / "swapped")
    a, b = shards / "shard-000000.tar", shards / "shard-000001.tar"
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    reseal_manifest(shards)
    return train_args(shards, setup.work / "sw.npy", setup.work / "sw", setup.cfg)


def test_sample_indices_that_do_not_match_the_manifest(setup: Setup) -> None:
    """Two shards' contents swapped (and the manifest resealed to their bytes): the indices in
    shard-000000.tar are 16..31, where the manifest's range is [0, 16)."""
    a = setup.work / "swapped" / "shard-000000.tar"
    assert_error(setup.run("swapped"), 3,
                 (re.escape(str(a)), r"index 16 where the manifest's range \[0, 16\)"))


@one_command("edited-manifest")
def edited_manifest(setup: Setup) -> list[object]:
    shards = copy_shards(setup.shards, setup.work / "edited")
    m = json.loads((shards / MANIFEST_NAME).read_text())
    m["shards"][1]["sha256"] = "0" * 64
    (shards / MANIFEST_NAME).write_text(json.dumps(m))
    return train_args(shards, setup.work / "ed.npy", setup.work / "ed", setup.cfg)


def test_manifest_edited_after_sharding(setup: Setup) -> None:
    assert_error(setup.run("edited-manifest"), 3,
                 (r"manifest\.json", "identity does not match the shard list"))


def test_non_image_files_in_the_source_folder_are_skipped_and_listed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(src / c / f"{i}.png")
    (src / "a" / "notes.txt").write_text("not an image")
    (src / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    res = ok(oocid("shard", src, tmp_path / "out", "--shard-size", 4, "--no-progress"))
    assert "wrote 6 samples in 2 shards" in res.out, res
    assert "skipped 1 unreadable, 1 without an image extension" in res.out, res
    assert re.search(r"skipped .*a/notes\.txt: not an image extension", res.err), res
    assert re.search(r"skipped .*b/broken\.jpg: ", res.err), res
    listed = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["skipped"]
    assert sorted(s["path"] for s in listed) == ["a/notes.txt", "b/broken.jpg"]


def test_a_source_of_unreadable_files_only_writes_nothing(tmp_path: Path) -> None:
    """No file of the folder reads as an image: each is named on stderr, the error says nothing
    was written, no line claims a manifest lists them, and no output folder appears; with
    --force over an earlier shard set, that set is left as it was."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("not an image")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    res = oocid("shard", src, tmp_path / "out", "--no-progress")
    assert_error(res, 2, (re.escape(str(src)), r"no readable images \(2 skipped, each named "
                          r"above\); nothing written to " + re.escape(str(tmp_path / "out"))))
    assert re.search(r"skipped .*notes\.txt: not an image extension", res.err), res
    assert re.search(r"skipped .*broken\.jpg: ", res.err), res
    assert "listed in" not in res.err and "manifest" not in res.err, res
    assert not (tmp_path / "out").exists()
    earlier = make_shards(tmp_path / "earlier")
    files = {p.name: p.read_bytes() for p in earlier.iterdir()}
    assert_error(oocid("shard", src, earlier, "--no-progress", "--force"), 2,
                 ("no readable images",))
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == files


# ---- banks and checkpoints that do not fit -----------------------------------------------------


@one_command("other-shards")
def other_shards(setup: Setup) -> list[object]:
    other = make_shards(setup.work / "other", seed=1)  # same N, D and chunking, other images
    m = json.loads((other / MANIFEST_NAME).read_text())
    assert m["identity"] != json.loads((setup.shards / MANIFEST_NAME).read_text())["identity"]
    bank, run = private_copy(setup, "other-shards")
    return train_args(other, bank, run, None, "--resume")


def test_bank_of_other_shards(setup: Setup) -> None:
    assert_error(setup.run("other-shards"), 3,
                 (r"base\.npy belongs to manifest [0-9a-f]{64} but the shards are",))


@one_command("wrong-dtype")
def wrong_dtype(setup: Setup) -> list[object]:
    bank, run = private_copy(setup, "wrong-dtype")
    np.save(bank, np.load(bank).astype(np.float64))
    return train_args(setup.shards, bank, run, None, "--resume")


def test_bank_of_the_wrong_dtype(setup: Setup) -> None:
    """bank.npy replaced by float64 rows of the right shape: train refuses (exit 3) and bank
    verify reports it (exit 1), both naming the file."""
    bank = setup.work / "wrong-dtype" / "base.npy"
    assert_error(setup.run("wrong-dtype"), 3, (re.escape(str(bank)), r"rows \(48, 128\) float64", "float32"))
    assert_error(oocid("bank", "verify", bank), 1, (re.escape(str(bank)), "float64"))


@one_command("no-metadata")
def no_metadata(setup: Setup) -> list[object]:
    np.save(setup.work / "plain.npy", np.ones((N, 128), np.float32))
    return train_args(setup.shards, setup.work / "plain.npy", setup.work / "plain", setup.cfg)


def test_npy_without_bank_metadata(setup: Setup) -> None:
    bank = setup.work / "plain.npy"
    assert_error(setup.run("no-metadata"), 3,
                 (re.escape(str(bank)), r"not an oocid bank \(no plain\.npy\.meta\.json\)"))


@one_command("other-config")
def other_config(setup: Setup) -> list[object]:
    bank, run = private_copy(setup, "other-config")
    ckpt = run / f"ckpt-{load_checkpoint(run / 'last.pt')['step']:09d}.pt"
    state = torch.load(ckpt, weights_only=False)
    state["config"]["optim"]["lr"] = 0.5
    torch.save(state, ckpt)
    return train_args(setup.shards, bank, run, None, "--resume")


def test_checkpoint_from_another_config(setup: Setup) -> None:
    """The run's checkpoint replaced by one written with another learning rate: --resume
    refuses (exit 2) naming the checkpoint and the difference; the bank is unchanged."""
    run = setup.work / "other-config" / "run"
    (ckpt,) = run.glob("ckpt-*.pt")
    assert_error(setup.run("other-config"), 2, (re.escape(str(ckpt)),
                                                r"different config \(optim\.lr 0\.5 -> 0\.03\)"))
    assert (run.parent / "base.npy").read_bytes() == setup.base_bank.read_bytes()


@one_command("no-config-json")
def no_config_json(setup: Setup) -> list[object]:
    bank, run = private_copy(setup, "no-config-json")
    (run / "config.json").unlink()
    return train_args(setup.shards, bank, run, None, "--resume")


def test_resume_without_config_json_asks_for_the_config(setup: Setup) -> None:
    run = setup.work / "no-config-json" / "run"
    assert_error(setup.run("no-config-json"), 2, (re.escape(str(run / "config.json")), "missing", "--config"))


# ---- configs ---------------------------------------------------------------------------------

CONFIG_CASES = {
    "not-toml": ("[optim\nlr = 0.1\n", (), ("not valid TOML",)),
    "unknown-override": (None, ("--set", "loss.bogus=1"), ("unknown config key loss.bogus",)),
    "nan-override": (None, ("--set", "optim.lr=nan"), ("optim.lr must be a finite number",)),
    "wrong-type-override": (None, ("--set", "data.batch_size=many"),
                            ("data.batch_size must be an integer",)),
}


@one_command(*(f"config:{c}" for c in CONFIG_CASES))
def bad_config(setup: Setup, name: str) -> list[object]:
    case = name.split(":")[1]
    text, extra, _ = CONFIG_CASES[case]
    cfg = setup.cfg
    if text is not None:
        cfg = setup.work / f"{case}.toml"
        cfg.write_text(text)
    return train_args(setup.shards, setup.work / f"{case}.npy", setup.work / case, cfg, *extra)


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config(setup: Setup, case: str) -> None:
    text, _, problems = CONFIG_CASES[case]
    names = (re.escape(str(setup.work / f"{case}.toml")),) if text is not None else ("override",)
    assert_error(setup.run(f"config:{case}"), 2, (*names, *problems))
    assert not (setup.work / f"{case}.npy").exists()


# ---- NaN and Inf from the model ----------------------------------------------------------------


@pytest.mark.parametrize(("value", "calls", "skipped"), [("nan", "2,5", [1, 1]),
                                                         ("inf", "3", [1, 0])])
def test_nan_and_inf_features_are_skipped_and_counted(setup: Setup, value: str, calls: str,
                                                      skipped: list[int]) -> None:
    """Forward calls `calls` give non-finite features (3 steps an epoch): those steps are
    skipped and counted in metrics.jsonl, and nothing non-finite reaches the bank."""
    bank, run = setup.work / f"poison-{value}.npy", setup.work / f"poison-{value}"
    res = ok(oocid(*train_args(setup.shards, bank, run, setup.cfg), poison=(calls, value)))
    assert [m["skipped_steps"] for m in metrics(run)] == skipped, res
    assert verify_store(bank).ok


def test_endless_nan_is_divergence_exit_5_and_resume_recovers(setup: Setup) -> None:
    """Every forward from the 4th on gives NaN (as NaN weights would): after 20 skipped steps
    in a row the run stops, exit 5; the bank verifies; resumed without the fault it completes."""
    bank, run = setup.work / "diverge.npy", setup.work / "diverge"
    cfg = setup.work / "diverge.toml"
    cfg.write_text(CONFIG.format(in_memory="yes", epochs=9, momentum=0.9))
    res = oocid(*train_args(setup.shards, bank, run, cfg), poison=("4-", "nan"))
    assert_error(res, 5, ("training diverged: 20 steps in a row", "non-finite"))
    with open_store(bank, read_only=True) as st:
        step = st.meta.committed_step
    assert step == 21 and verify_store(bank).ok  # epochs 1-7 committed (3 steps each)
    assert load_checkpoint(run / "last.pt")["step"] == step
    ok(oocid(*train_args(setup.shards, bank, run, None, "--resume")))
    assert [m["epoch"] for m in metrics(run)] == list(range(1, 10))


# ---- two trainers on one bank ------------------------------------------------------------------


def test_second_trainer_is_refused_and_a_dead_trainers_lock_is_taken_over(setup: Setup) -> None:
    bank, run = setup.work / "locked.npy", setup.work / "locked"
    cfg = setup.work / "long.toml"
    cfg.write_text(CONFIG.format(in_memory="no", epochs=1000, momentum=0.9))
    first = subprocess.Popen([sys.executable, "-m", "oocid",
                              *map(str, train_args(setup.shards, bank, run, cfg))],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock = setup.work / "locked.npy.lock"
    try:
        deadline = time.time() + 120
        while not (bank.exists() and lock.stat().st_size) and time.time() < deadline:
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            time.sleep(0.05)
        second = oocid(*train_args(setup.shards, bank, setup.work / "locked-2", cfg, "--resume"))
        assert_error(second, 2, (re.escape(str(bank)), rf"in use by a running trainer \(pid "
                                 rf"{first.pid}\b"))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock.stat().st_size > 0  # the dead trainer's text is left behind: a stale lock
    third = ok(oocid(*train_args(setup.shards, bank, run, cfg, "--resume", "--max-steps", 1)))
    assert "took over the stale lock of a trainer that died" in third.err, third
    assert verify_store(bank).ok


def test_reseal_keeps_the_manifest_of_intact_shards(tmp_path: Path) -> None:
    """The helper that reseals damaged shards' manifests changes nothing on intact ones."""
    shards = make_shards(tmp_path)
    before = (shards / MANIFEST_NAME).read_text()
    reseal_manifest(shards)
    assert json.loads((shards / MANIFEST_NAME).read_text()) == json.loads(before)
