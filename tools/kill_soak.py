"""Kill soak: SIGKILL small training runs at random moments and check that nothing is lost.

Each kill is a fresh `oocid train` on a tiny synthetic set (96 gray 16x16 images in 6 shards,
the small conv net, NCE with K = 16, 3 epochs of 6 steps, a checkpoint every 1 or 2 steps), so
checkpoint writes and bank commits take a good share of the run. The runs cycle through eight
variants: bank.npy | bank.zarr, a full cache | a partial one (4 of 6 chunks: evicted chunks are
written back between checkpoints), in-memory | streamed data. Two kinds of kill alternate:

    timer   the parent sends SIGKILL at a uniform random moment between the bank's creation and
            the run's end (measured by an uninterrupted calibration run of the same variant);
    inject  the trainer kills itself with SIGKILL just before its k-th durability call
            (os.fsync / fdatasync / replace / rename / link / unlink, counted once the bank
            exists), k uniform over the calls of the calibration run: this lands kills inside
            checkpoint writes, journal writes, journal applies, metadata updates and the
            last.pt link with certainty.

After each kill, the kill counts as survived when all of these hold:
    1. `oocid bank verify BANK` exits 0;
    2. the checkpoint named by the bank's committed step (and last.pt, if any) loads: torch.load
       through oocid.checkpoint.load_checkpoint, then oocid.train.loop.model_from_checkpoint;
    3. the same command with `--resume` exits 0 without a traceback;
    4. metrics.jsonl then holds each epoch exactly once, the bank's committed step is the full
       run's, and `oocid bank verify` exits 0 again.

Where a kill landed is reported: for an injected kill, the call and the innermost oocid function;
for a timed one, what the files left behind show (a checkpoint .tmp, a journal, ...) or "step".

Usage:
    python tools/kill_soak.py                  # 50 kills, seed 0 (~15 min on 2 busy cores)
    python tools/kill_soak.py --kills 8 --seed 3 --keep
Prints one line per kill, a summary "survived X/N" and, LAST, a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

N_IMAGES, SHARD_SIZE, EPOCHS, BATCH = 96, 16, 3, 16
STEPS = EPOCHS * (N_IMAGES // BATCH)
CHUNK_MB = SHARD_SIZE * 128 * 4 / 2**20  # one bank chunk, float32, D = 128

CONFIG = """
[model]
arch = "small"
channels_last = false
[data]
image_size = 16
augment = "gray"
in_memory = "{in_memory}"
workers = 0
batch_size = {batch}
shuffle_buffer = 16
mean = [0.5]
std = [0.25]
[loss]
kind = "nce"
nce_k = 16
z = "ema"
temperature = 0.1
[optim]
epochs = {epochs}
schedule = "cosine"
lr = 0.03
[bank]
cache_mb = {cache_mb}
[train]
eval_every = 0
threads = 1
checkpoint_every = {every}
"""

# Runs the real entry point, oocid.cli.app.main, with os's durability calls counted; with
# SOAK_KILL_AT = k > 0 the process SIGKILLs itself just before the k-th one (counted once the
# bank exists) after writing where it was to SOAK_LOG; with k = 0 it writes the count at exit.
INJECT = r"""
import atexit, os, signal, sys, threading
k, bank, log = int(os.environ["SOAK_KILL_AT"]), os.environ["SOAK_BANK"], os.environ["SOAK_LOG"]
state = {"n": 0}
lock = threading.Lock()
exists = os.path.exists

def where():
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if os.sep + "oocid" + os.sep in name and not name.endswith("cli.py"):
            return f"{f.f_code.co_name} ({os.path.basename(name)}:{f.f_lineno})"
        f = f.f_back
    return "outside oocid"

def wrap(name, fn):
    def call(*a, **kw):
        if exists(bank):
            with lock:
                state["n"] += 1
                hit = state["n"] == k
            if hit:
                with open(log, "w") as fh:
                    fh.write(f"{name} in {where()}")
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **kw)
    return call

for name in ("fsync", "fdatasync", "replace", "rename", "link", "unlink"):
    setattr(os, name, wrap(name, getattr(os, name)))
if k == 0:
    atexit.register(lambda: open(log, "w").write(str(state["n"])))
sys.argv = ["oocid", *sys.argv[1:]]
from oocid.cli.app import main
main()
"""


@dataclass(frozen=True)
class Variant:
    store: str  # npy | zarr
    cache: str  # full | partial
    data: str  # mem | stream
    every: int  # checkpoint every N steps

    @property
    def name(self) -> str:
        return f"{self.store}/{self.cache}/{self.data}/ck{self.every}"

    def config(self) -> str:
        return CONFIG.format(in_memory="yes" if self.data == "mem" else "no", batch=BATCH,
                             epochs=EPOCHS, every=self.every,
                             cache_mb=0 if self.cache == "full" else round(4 * CHUNK_MB, 8))


VARIANTS = [Variant(s, c, d, 1 + ((s == "zarr") ^ (c == "partial")))
            for d in ("mem", "stream") for c in ("full", "partial") for s in ("npy", "zarr")]


@dataclass
class Calibration:
    seconds: float  # from the bank's appearance to the run's end
    ops: int  # durability calls once the bank exists


@dataclass
class Result:
    i: int
    variant: str
    mode: str
    landed: str = ""
    committed_step: int = -1
    survived: bool = False
    failure: str = ""
    seconds: float = 0.0
    attempts: int = 1
    checks: dict[str, bool] = field(default_factory=dict)


def log(msg: str) -> None:
    print(f"[kill_soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["OOCID_DEBUG"] = "1"  # an internal error's traceback goes to the failure's log
    e["OMP_NUM_THREADS"] = "1"
    return e


def make_shards(work: Path) -> Path:
    from oocid.data.writer import write_shards

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (N_IMAGES, 16, 16), dtype=np.uint8)
    np.savez(work / "data.npz", images=images, labels=np.arange(N_IMAGES) % 3)
    write_shards(work / "data.npz", work / "shards", shard_size=SHARD_SIZE, progress=False)
    return work / "shards"


@dataclass
class Case:
    root: Path
    shards: Path
    variant: Variant

    @property
    def bank(self) -> Path:
        return self.root / f"bank.{self.variant.store}"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def cfg(self) -> Path:
        return self.root / "cfg.toml"

    def fresh(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.cfg.write_text(self.variant.config())

    def train_args(self, *extra: str) -> list[str]:
        return ["train", "--shards", str(self.shards), "--bank", str(self.bank), "--out",
                str(self.run), "--config", str(self.cfg), "--no-progress", *extra]

    def start(self, kill_at: int | None) -> subprocess.Popen[bytes]:
        """`oocid train`; with `kill_at` (0: count only) through the INJECT wrapper."""
        e = env()
        if kill_at is None:
            argv = [sys.executable, "-m", "oocid", *self.train_args()]
        else:
            e.update(SOAK_KILL_AT=str(kill_at), SOAK_BANK=str(self.bank),
                     SOAK_LOG=str(self.root / "inject.log"))
            argv = [sys.executable, "-c", INJECT, *self.train_args()]
        return subprocess.Popen(argv, env=e, stdout=subprocess.DEVNULL,
                                stderr=open(self.root / "train.err", "wb"))


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 300) -> bool:
    """Wait until `path` exists (True) or the process ends first (False)."""
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            return path.exists()
        time.sleep(0.01)
    return True


def calibrate(case: Case) -> Calibration:
    case.fresh()
    proc = case.start(kill_at=0)
    if not wait_for(case.bank, proc):
        raise SystemExit(f"calibration of {case.variant.name} never created its bank: "
                         + (case.root / "train.err").read_text()[-2000:])
    t0 = time.time()
    if proc.wait() != 0:
        raise SystemExit(f"calibration of {case.variant.name} failed: "
                         + (case.root / "train.err").read_text()[-2000:])
    return Calibration(time.time() - t0, int((case.root / "inject.log").read_text()))


def landed_from_files(case: Case) -> str:
    """What a timed kill interrupted, as far as the files left behind tell."""
    run, bank = case.run, case.bank
    if list(run.glob("ckpt-*.pt.tmp")):
        return "checkpoint write (tmp file left)"
    if (run / "last.pt.tmp").exists():
        return "last.pt link"
    sidecar = bank if case.variant.store == "zarr" else bank.parent
    if list(sidecar.glob("*journal.tmp")):
        return "bank journal write (uncommitted journal left)"
    if (bank / "journal").exists() or Path(str(bank) + ".journal").exists():
        return "bank journal apply (committed journal left)"
    if list(sidecar.glob("*journal.part-*.tmp")):
        return "bank journal part write (uncommitted part left)"
    if list(sidecar.glob("*journal.part-*")):
        return "step (uncommitted journal parts of evictions left)"
    if list(sidecar.glob("*.json.tmp")):
        return "bank metadata write"
    if list(bank.parent.glob("*.creating")):
        return "bank creation"
    return "step (no write in flight)"


def committed_step(bank: Path) -> int:
    """The bank's committed step as a writable open will see it (a pending journal's step)."""
    from oocid.bank.store import open_store

    with open_store(bank, read_only=True) as st:
        pending = st.pending_step
        return int(pending if pending is not None else st.meta.committed_step)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "oocid", *args], env=env(), capture_output=True,
                          text=True, timeout=600)


def check_after_kill(case: Case, res: Result) -> None:
    import torch

    from oocid.checkpoint import load_checkpoint, model_from_checkpoint

    def fail(what: str, detail: str) -> None:
        res.checks[what] = False
        raise RuntimeError(f"{what}: {' '.join(detail.split())[-600:]}")

    v = cli("bank", "verify", str(case.bank))
    if v.returncode != 0 or "Traceback" in v.stdout + v.stderr:
        fail("verify", v.stdout + v.stderr)
    res.checks["verify"] = True

    step = res.committed_step = committed_step(case.bank)
    paths = [case.run / f"ckpt-{step:09d}.pt"] if step >= 0 else []
    if (case.run / "last.pt").exists():
        paths.append(case.run / "last.pt")
    for p in paths:
        try:
            model_from_checkpoint(load_checkpoint(p), torch.device("cpu"), str(p))
        except Exception as e:
            fail("checkpoint", f"{p}: {type(e).__name__}: {e}")
    res.checks["checkpoint"] = True

    r = cli(*case.train_args("--resume"))
    if r.returncode != 0 or "Traceback" in r.stdout + r.stderr:
        fail("resume", f"exit {r.returncode}: {r.stderr}")
    res.checks["resume"] = True

    epochs = [json.loads(x)["epoch"] for x in (case.run / "metrics.jsonl").read_text().splitlines()]
    if epochs != list(range(1, EPOCHS + 1)):
        fail("metrics", f"epochs in metrics.jsonl: {epochs}")
    res.checks["metrics"] = True
    if (final := committed_step(case.bank)) != STEPS:
        fail("final step", f"bank committed step {final}, expected {STEPS}")
    v = cli("bank", "verify", str(case.bank))
    if v.returncode != 0:
        fail("final verify", v.stdout + v.stderr)
    res.checks["final verify"] = True


def one_kill(i: int, case: Case, mode: str, cal: Calibration, rng: random.Random) -> Result:
    res = Result(i, case.variant.name, mode)
    t_start = time.time()
    limit_s, limit_ops = cal.seconds, cal.ops
    for attempt in range(1, 6):  # redraw when the run ended before the kill
        res.attempts = attempt
        case.fresh()
        if mode == "timer":
            delay = rng.uniform(0.0, limit_s)
            proc = case.start(kill_at=None)
            if not wait_for(case.bank, proc):
                res.failure = "run ended before its bank existed: " + (
                    (case.root / "train.err").read_text()[-600:])
                return res
            t0 = time.time()
            while proc.poll() is None and time.time() - t0 < delay:
                time.sleep(0.005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                res.landed = f"t+{delay:.2f}s: {landed_from_files(case)}"
                break
            limit_s = 0.9 * (time.time() - t0)
        else:
            k = rng.randint(1, max(1, limit_ops))
            proc = case.start(kill_at=k)
            rc = proc.wait()
            if rc == -signal.SIGKILL:
                res.landed = f"op {k}: {(case.root / 'inject.log').read_text()}"
                break
            limit_ops = max(1, k - 1)
        if proc.returncode not in (0, -signal.SIGKILL):
            res.failure = f"run failed before the kill (exit {proc.returncode}): " + (
                (case.root / "train.err").read_text()[-600:])
            return res
    else:
        res.failure = "every attempt ended before its kill"
        return res
    try:
        check_after_kill(case, res)
        res.survived = True
    except RuntimeError as e:
        res.failure = str(e)
    res.seconds = time.time() - t_start
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="Work folder (default: a temp dir).")
    ap.add_argument("--keep", action="store_true", help="Keep every kill's folder.")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="oocid-kill-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    t0 = time.time()
    shards = make_shards(work)
    log(f"work folder {work}; {args.kills} kills, seed {args.seed}")
    cals: dict[Variant, Calibration] = {}
    results: list[Result] = []
    print(f"{'kill':>4}  {'variant':<26} {'mode':<6} {'step':>4}  {'ok':<3} {'s':>5}  landed / failure")
    for i in range(args.kills):
        variant = VARIANTS[(i // 2) % len(VARIANTS)]
        mode = ("timer", "inject")[i % 2]
        case = Case(work / f"kill-{i:03d}", shards, variant)
        if variant not in cals:
            cals[variant] = calibrate(Case(work / "calibration", shards, variant))
            log(f"calibrated {variant.name}: {cals[variant].seconds:.1f} s, "
                f"{cals[variant].ops} durability calls after the bank exists")
        res = one_kill(i, case, mode, cals[variant], rng)
        results.append(res)
        print(f"{i:>4}  {res.variant:<26} {res.mode:<6} {res.committed_step:>4}  "
              f"{'yes' if res.survived else 'NO':<3} {res.seconds:>5.1f}  "
              f"{res.landed}{'  FAILED ' + res.failure if res.failure else ''}", flush=True)
        if res.survived and not args.keep:
            shutil.rmtree(case.root, ignore_errors=True)
    survived = sum(r.survived for r in results)
    phases = Counter(r.landed.split(": ", 1)[-1].split(" (")[0] for r in results)
    print(f"\nsurvived {survived}/{len(results)} kills in {time.time() - t0:.0f} s "
          f"(bank verifies, checkpoint loads, --resume completes, every epoch logged once)")
    print("landed in: " + "; ".join(f"{k} x{n}" for k, n in phases.most_common()))
    failed = [r for r in results if not r.survived]
    if failed:
        print(f"failed kills kept under {work}: " + ", ".join(str(r.i) for r in failed))
    elif not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"kills": len(results), "survived": survived, "seed": args.seed,
                      "seconds": round(time.time() - t0, 1),
                      "calibration": {v.name: asdict(c) for v, c in cals.items()},
                      "results": [asdict(r) for r in results]}))
    sys.exit(0 if survived == len(results) else 1)


if __name__ == "__main__":
    main()
