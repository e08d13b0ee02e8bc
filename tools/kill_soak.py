"""Kill soak: SIGKILL training runs at random moments and check that nothing is lost.

Toy runs: a fresh `oocid train` on a tiny synthetic set (96 gray 16x16 images in 6 shards,
the small conv net, NCE with K = 16, 3 epochs of 6 steps, a checkpoint every 1 or 2 steps), so
checkpoint writes and bank commits take a good share of the run. Eight variants: bank.npy |
bank.zarr, a full cache | a partial one (4 of 6 chunks: evicted chunks are written back between
checkpoints), in-memory | streamed data.

Big runs (`big/...`, four variants: .npy | Zarr, full | partial cache): a bank over 256 MB,
`--big-rows` (default 600,000) gray 8x8 images in shards of 2,000 (a 1 MB chunk each), built
once per soak from an .npz with oocid's shard writer and kept in the work folder; batch 4,096
in memory. With the full cache a run is `--max-steps 6` with a checkpoint every 2 steps, and a
batch touches every chunk, so each commit writes the whole bank (307 MB at 600,000 rows: a
268 MB journal part and the record); with the partial cache (16 chunks) a run is
`--max-steps 24` with a checkpoint every 4 and evicts about 25 chunks into journal parts
between its commits. Timed kills of a big run fall between its first checkpoint
(after the 30 s decode of the images) and last.pt naming its last one (before the exit).

The variants cycle, two kills each in turn (toy variants first, then the big ones). Two kinds
of kill alternate:

    timer   the parent sends SIGKILL at a uniform random moment between the bank's creation
            (big runs: the first checkpoint) and the run's end (measured by an uninterrupted
            calibration run of the same variant);
    inject  the trainer kills itself with SIGKILL just before its k-th durability call
            (os.fsync / fdatasync / replace / rename / link / unlink, counted once the bank
            exists), k uniform over the calls of the calibration run: this lands kills inside
            checkpoint writes, journal writes, journal applies, metadata updates and the
            last.pt link with certainty.

The calibration run of a variant is also its uninterrupted twin: computed once, kept for the
soak. After each kill, the kill counts as survived when all of these hold:
    1. `oocid bank verify BANK` exits 0;
    2. the checkpoint named by the bank's committed step (and last.pt, if any) loads: torch.load
       through oocid.checkpoint.load_checkpoint, then oocid.train.loop.model_from_checkpoint;
    3. the same command with `--resume` exits 0 without a traceback (a big run with
       `--max-steps` the steps it still lacks; when the kill came after its last commit point,
       check 5 comes first and the resume then runs one step more);
    4. metrics.jsonl then holds each epoch exactly once, the bank's committed step is the full
       run's, and `oocid bank verify` exits 0 again;
    5. (bit-exact, unless --no-exact) the bank's rows and the model weights of the final
       checkpoint equal the twin's bit for bit.

Where a kill landed is reported: for an injected kill, the call and the innermost oocid function;
for a timed one, what the files left behind show (a checkpoint .tmp, a journal, ...) or "step".

Usage:
    python tools/kill_soak.py                  # 50 kills, seed 0
    python tools/kill_soak.py --kills 8 --seed 3 --keep
    python tools/kill_soak.py --kills 2 --only big --big-rows 4000   # a toy-size big run
    python tools/kill_soak.py --kills 34 --skip big                 # the toy variants only
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
DIM = 128  # bank row width (model.dim), float32
# big runs: --max-steps BIG_STEPS of batch BIG_BATCH, a checkpoint every BIG_EVERY steps; with
# the partial cache (BIG_PARTIAL_CHUNKS) BIG_PARTIAL_STEPS and a checkpoint every 4, so that
# evictions come between the commits (6 steps evict about one chunk)
BIG_ROWS, BIG_SHARD, BIG_BATCH, BIG_STEPS, BIG_EVERY = 600_000, 2000, 4096, 6, 2
BIG_PARTIAL_CHUNKS, BIG_PARTIAL_STEPS = 16, 24

CONFIG = """
[model]
arch = "small"
channels_last = false
[data]
image_size = {size}
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

# Runs the real entry point, oocid.cli.entry.main, with os's durability calls counted; with
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
    return f"outside oocid (thread {threading.current_thread().name})"

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
from oocid.cli.entry import main
main()
"""


@dataclass(frozen=True)
class Variant:
    store: str  # npy | zarr
    cache: str  # full | partial
    data: str  # mem | stream
    every: int  # checkpoint every N steps
    big: int = 0  # rows of a big run's set (0: the toy set)

    @property
    def name(self) -> str:
        name = f"{self.store}/{self.cache}/{self.data}/ck{self.every}"
        return f"big/{name}" if self.big else name

    @property
    def shard_size(self) -> int:
        """Images per shard, which is the bank's chunk size."""
        return min(BIG_SHARD, max(1, self.big // 32)) if self.big else SHARD_SIZE

    @property
    def batch(self) -> int:
        return min(BIG_BATCH, self.big // (2 * self.steps)) if self.big else BATCH

    @property
    def steps(self) -> int:
        """The bank's committed step at the run's end."""
        if not self.big:
            return STEPS
        return BIG_STEPS if self.cache == "full" else BIG_PARTIAL_STEPS

    @property
    def epochs_logged(self) -> list[int]:
        """The epochs metrics.jsonl holds at the run's end (a big run stops inside its first)."""
        return [] if self.big else list(range(1, EPOCHS + 1))

    def config(self) -> str:
        chunk_mb = self.shard_size * DIM * 4 / 2**20
        if self.cache == "full":  # an explicit budget over the bank: the same cache every start
            cache_mb = 2 * (self.big or N_IMAGES) * DIM * 4 / 2**20
        else:
            cache_mb = (BIG_PARTIAL_CHUNKS if self.big else 4) * chunk_mb
        return CONFIG.format(in_memory="yes" if self.data == "mem" else "no", batch=self.batch,
                             size=8 if self.big else 16, epochs=1 if self.big else EPOCHS,
                             every=self.every, cache_mb=round(cache_mb, 8))


def variants(big_rows: int) -> list[Variant]:
    """The eight toy variants, then the four big ones."""
    toy = [Variant(s, c, d, 1 + ((s == "zarr") ^ (c == "partial")))
           for d in ("mem", "stream") for c in ("full", "partial") for s in ("npy", "zarr")]
    return toy + [Variant(s, c, "mem", BIG_EVERY if c == "full" else 4, big_rows)
                  for c in ("full", "partial") for s in ("npy", "zarr")]


@dataclass
class Calibration:
    seconds: float  # from the clock's start (Case.started) to the run's end (big: last.pt)
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
    note: str = ""


def log(msg: str) -> None:
    print(f"[kill_soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["OOCID_DEBUG"] = "1"  # an internal error's traceback goes to the failure's log
    e["OMP_NUM_THREADS"] = "1"
    return e


def write_set(folder: Path, n: int, side: int, shard_size: int) -> Path:
    """n gray side x side noise images as shards of `shard_size` under folder/shards, written
    with oocid's own shard writer from an .npz; kept and reused when already complete."""
    from oocid.data.writer import write_shards

    shards = folder / "shards"
    if (shards / "manifest.json").exists():
        return shards
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, side, side), dtype=np.uint8)
    np.savez(folder / "data.npz", images=images, labels=np.arange(n) % 3)
    write_shards(folder / "data.npz", shards, shard_size=shard_size, progress=False)
    (folder / "data.npz").unlink()
    return shards


def make_shards(work: Path, variant: Variant) -> Path:
    if not variant.big:
        return write_set(work, N_IMAGES, 16, SHARD_SIZE)
    t0 = time.time()
    shards = write_set(work / f"big-{variant.big}", variant.big, 8, variant.shard_size)
    log(f"{variant.big} 8x8 images in shards of {variant.shard_size}: {shards} "
        f"({time.time() - t0:.0f} s)")
    return shards


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

    def train_args(self, *extra: str, max_steps: int | None = None) -> list[str]:
        """The run's command; a big run stops after `max_steps` (default: all its steps)."""
        steps = ["--max-steps", str(max_steps or self.variant.steps)] if self.variant.big else []
        return ["train", "--shards", str(self.shards), "--bank", str(self.bank), "--out",
                str(self.run), "--config", str(self.cfg), "--no-progress", *steps, *extra]

    def started(self) -> bool:
        """Where a timed kill's clock starts: the bank exists (big runs: the first checkpoint is
        under way, after the images' decode)."""
        if self.variant.big:
            return any(self.run.glob("ckpt-*"))
        return self.bank.exists()

    def finished(self) -> bool:
        """A big run's clock stops once last.pt names its last checkpoint (after its last
        commit: what follows is the process's exit)."""
        last, final = self.run / "last.pt", ckpt_path(self.run, self.variant.steps)
        try:
            return bool(self.variant.big) and os.path.samefile(last, final)
        except OSError:
            return False

    def start(self, kill_at: int | None) -> subprocess.Popen[bytes]:
        """`oocid train`; with `kill_at` (0: count only) through the INJECT wrapper."""
        e = env()
        if kill_at is None:
            argv = [sys.executable, "-m", "oocid", *self.train_args()]
        else:
            e.update(SOAK_KILL_AT=str(kill_at), SOAK_BANK=str(self.bank),
                     SOAK_LOG=str(self.root / "inject.log"))
            argv = [sys.executable, "-c", INJECT, *self.train_args()]
        with open(self.root / "train.err", "wb") as err:
            return subprocess.Popen(argv, env=e, stdout=subprocess.DEVNULL, stderr=err)


def wait_for(case: Case, proc: subprocess.Popen[bytes], timeout: float = 600) -> bool:
    """Wait until the case has `started` (True) or the process ends first (False)."""
    deadline = time.time() + timeout
    while not case.started():
        if proc.poll() is not None or time.time() > deadline:
            return case.started()
        time.sleep(0.01)
    return True


def calibrate(case: Case) -> Calibration:
    """An uninterrupted run of the case's variant, counted; it stays as the variant's twin."""
    case.fresh()
    proc = case.start(kill_at=0)
    if not wait_for(case, proc):
        raise SystemExit(f"calibration of {case.variant.name} never started: "
                         + (case.root / "train.err").read_text()[-2000:])
    t0, t_end = time.time(), None
    while proc.poll() is None:
        if t_end is None and case.finished():
            t_end = time.time()
        time.sleep(0.01)
    if proc.wait() != 0:
        raise SystemExit(f"calibration of {case.variant.name} failed: "
                         + (case.root / "train.err").read_text()[-2000:])
    return Calibration((t_end or time.time()) - t0, int((case.root / "inject.log").read_text()))


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


def ckpt_path(run: Path, step: int) -> Path:
    return run / f"ckpt-{step:09d}.pt"


def compare_with_twin(case: Case, twin: Case) -> str:
    """'' when the case's bank rows and the weights of its committed step's checkpoint equal
    the twin's bit for bit, else what differs."""
    import torch

    from oocid.bank.store import open_store

    step, want = committed_step(case.bank), committed_step(twin.bank)
    if step != want:
        return f"bank committed step {step}, the twin's {want}"
    with open_store(case.bank, read_only=True) as a, open_store(twin.bank, read_only=True) as b:
        if (a.n_rows, a.dim) != (b.n_rows, b.dim):
            return f"bank shape {(a.n_rows, a.dim)}, the twin's {(b.n_rows, b.dim)}"
        differ, span = 0, 65536
        for start in range(0, a.n_rows, span):
            stop = min(start + span, a.n_rows)
            x, y = a.read_rows(start, stop), b.read_rows(start, stop)
            differ += int(np.any(x.view(np.uint32) != y.view(np.uint32), axis=1).sum())
    if differ:
        return f"{differ} of {a.n_rows} bank rows differ from the twin's"
    mine = torch.load(ckpt_path(case.run, step), map_location="cpu", weights_only=False)["model"]
    ref = torch.load(ckpt_path(twin.run, step), map_location="cpu", weights_only=False)["model"]
    bad = sorted(set(mine) ^ set(ref)) + [k for k in ref if k in mine
                                         and not torch.equal(mine[k], ref[k])]
    return f"model weights differ from the twin's: {', '.join(bad[:6])}" if bad else ""


def check_after_kill(case: Case, res: Result, twin: Case | None) -> None:
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
    paths = [ckpt_path(case.run, step)] if step >= 0 else []
    if (case.run / "last.pt").exists():
        paths.append(case.run / "last.pt")
    for p in paths:
        try:
            model_from_checkpoint(load_checkpoint(p), torch.device("cpu"), str(p))
        except Exception as e:
            fail("checkpoint", f"{p}: {type(e).__name__}: {e}")
    res.checks["checkpoint"] = True

    steps_left, final_step = case.variant.steps - max(step, 0), case.variant.steps
    if case.variant.big and steps_left == 0:
        # killed after its last commit point: compare now, then resume for one step more so that
        # the writable open (the replay of a record the kill left) still runs
        res.note = "killed after its last commit: compared, then resumed for one more step"
        if twin is not None:
            if differs := compare_with_twin(case, twin):
                fail("bit-exact", differs)
            res.checks["bit-exact"] = True
            twin = None
        steps_left, final_step = 1, final_step + 1
    r = cli(*case.train_args("--resume", max_steps=steps_left))
    if r.returncode != 0 or "Traceback" in r.stdout + r.stderr:
        fail("resume", f"exit {r.returncode}: {r.stderr}")
    res.checks["resume"] = True

    metrics = case.run / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    epochs = [json.loads(x)["epoch"] for x in lines]
    if epochs != case.variant.epochs_logged:
        fail("metrics", f"epochs in metrics.jsonl: {epochs}")
    res.checks["metrics"] = True
    if (final := committed_step(case.bank)) != final_step:
        fail("final step", f"bank committed step {final}, expected {final_step}")
    v = cli("bank", "verify", str(case.bank))
    if v.returncode != 0:
        fail("final verify", v.stdout + v.stderr)
    res.checks["final verify"] = True
    if twin is not None:
        if differs := compare_with_twin(case, twin):
            fail("bit-exact", differs)
        res.checks["bit-exact"] = True


def one_kill(i: int, case: Case, mode: str, cal: Calibration, rng: random.Random,
             twin: Case | None) -> Result:
    res = Result(i, case.variant.name, mode)
    t_start = time.time()
    limit_s, limit_ops = cal.seconds, cal.ops
    for attempt in range(1, 6):  # redraw when the run ended before the kill
        res.attempts = attempt
        case.fresh()
        if mode == "timer":
            delay = rng.uniform(0.0, limit_s)
            proc = case.start(kill_at=None)
            if not wait_for(case, proc):
                res.failure = "run ended before its clock started: " + (
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
        check_after_kill(case, res, twin)
        res.survived = True
    except RuntimeError as e:
        res.failure = str(e)
    res.seconds = time.time() - t_start
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="Work folder (default: a temp dir).")
    ap.add_argument("--keep", action="store_true", help="Keep every kill's folder.")
    ap.add_argument("--big-rows", type=int, default=BIG_ROWS,
                    help="Images (bank rows) of the big runs' set.")
    ap.add_argument("--only", default="",
                    help="Run only the variants whose name contains this (e.g. big, zarr/partial).")
    ap.add_argument("--skip", default=None,
                    help="Leave out the variants whose name contains this (e.g. big).")
    ap.add_argument("--no-exact", dest="exact", action="store_false",
                    help="Skip the bit-exact comparison with the uninterrupted twin.")
    args = ap.parse_args(argv)
    chosen = [v for v in variants(args.big_rows) if args.only in v.name
              and (args.skip is None or args.skip not in v.name)]
    if not chosen:
        ap.error("no variant left to run: see --only and --skip")
    work = args.work or Path(tempfile.mkdtemp(prefix="oocid-kill-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    t0 = time.time()
    log(f"work folder {work}; {args.kills} kills, seed {args.seed}")
    cals: dict[Variant, Calibration] = {}
    twins: dict[Variant, Case] = {}
    shard_dirs: dict[int, Path] = {}
    results: list[Result] = []
    print(f"{'kill':>4}  {'variant':<30} {'mode':<6} {'step':>4}  {'ok':<3} {'s':>6}  "
          "landed / failure")
    for i in range(args.kills):
        variant = chosen[(i // 2) % len(chosen)]
        mode = ("timer", "inject")[i % 2]
        if variant.big not in shard_dirs:
            shard_dirs[variant.big] = make_shards(work, variant)
        shards = shard_dirs[variant.big]
        case = Case(work / f"kill-{i:03d}", shards, variant)
        if variant not in cals:
            twins[variant] = Case(work / ("twin-" + variant.name.replace("/", "-")), shards, variant)
            cals[variant] = calibrate(twins[variant])
            log(f"calibrated {variant.name} (its twin): {cals[variant].seconds:.1f} s, "
                f"{cals[variant].ops} durability calls after the bank exists")
        res = one_kill(i, case, mode, cals[variant], rng, twins[variant] if args.exact else None)
        results.append(res)
        print(f"{i:>4}  {res.variant:<30} {res.mode:<6} {res.committed_step:>4}  "
              f"{'yes' if res.survived else 'NO':<3} {res.seconds:>6.1f}  {res.landed}"
              f"{'  (' + res.note + ')' if res.note else ''}"
              f"{'  FAILED ' + res.failure if res.failure else ''}", flush=True)
        if res.survived and not args.keep:
            shutil.rmtree(case.root, ignore_errors=True)
    survived = sum(r.survived for r in results)
    exact = sum(r.checks.get("bit-exact", False) for r in results)
    big = [r for r in results if r.variant.startswith("big/")]
    phases = Counter(r.landed.split(": ", 1)[-1].split(" (")[0] for r in results)
    print(f"\nsurvived {survived}/{len(results)} kills in {time.time() - t0:.0f} s "
          f"(bank verifies, checkpoint loads, --resume completes, every epoch logged once); "
          f"big banks ({args.big_rows * DIM * 4 / 1e6:.0f} MB): "
          f"{sum(r.survived for r in big)}/{len(big)}; "
          f"bit-identical to the uninterrupted twin: {exact}/{len(results)}")
    print("landed in: " + "; ".join(f"{k} x{n}" for k, n in phases.most_common()))
    failed = [r for r in results if not r.survived]
    if failed:
        print(f"failed kills kept under {work}: " + ", ".join(str(r.i) for r in failed))
    elif not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"kills": len(results), "survived": survived, "bit_exact": exact,
                      "big_kills": len(big), "big_rows": args.big_rows, "seed": args.seed,
                      "seconds": round(time.time() - t0, 1),
                      "calibration": {v.name: asdict(c) for v, c in cals.items()},
                      "results": [asdict(r) for r in results]}))
    ok = survived == len(results) and (not args.exact or exact == len(results))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
