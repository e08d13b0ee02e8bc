"""Benchmark the out-of-core bank (oocid.bank.cache.ChunkCache over oocid.bank.store) against a plain
in-memory tensor bank (oocid.bank.incore.InCoreBank), per training step, with no model and no loss.

For each N (rows) and cache fraction F (cache budget = F * N rows), one training step's bank
work is timed as the official code does it, through the banks' general gather (B batch, K
negatives, D dims; NPIDStep itself takes negatives located by `draw`, never gathers (B, K, D)
rows and reuses the positives for the update):
    pos = bank.gather(idx)                                  # (B, D) positives
    neg = bank.sample((B, K) | (K,), gen); w = bank.gather(neg)   # negatives
    new = momentum_update(bank.gather(idx), f, 0.5)         # after the optimiser step
    bank.update(idx, new); bank.end_step()
`f` are random unit features precomputed outside the timed region. The positives follow what
the streaming trainer (oocid.data.stream.ShardStream + DataLoader) feeds: shards (= bank chunks of
4096 consecutive rows) in a shuffled order dealt round-robin to `--workers` workers, each with a
`--shuffle-buffer`-sample reservoir, batches taken round-robin from the workers. The cache and
the in-memory bank see the same positive sequence.

Every configuration runs in its own subprocess, so the peak RSS reported is its own; the
in-memory reference runs once per N (its own subprocess) and is reused for that N's ratios.
Banks are created once under --workdir and reused across runs (rows' content is irrelevant for
timing; runs keep training them, rows stay unit).

Usage:
    python tools/bench_bank.py                          # N in 1e5, 1.28e6, 1e7; F in 1, .1, .01
    python tools/bench_bank.py --rows 20000 --cache-fraction 0.5 --steps 20   # one config
Prints an environment line, a table and footnotes; the LAST line is a JSON list with one object
per configuration. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_ROWS = (100_000, 1_280_000, 10_000_000)
DEFAULT_FRACTIONS = (1.0, 0.1, 0.01)
CHUNK_ROWS = 4096  # = shard size: chunk c holds the indices of shard c


def log(msg: str) -> None:
    print(f"[bench_bank {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


# ---- the positives the streaming trainer feeds ------------------------------------------------


def _worker_stream(shards: np.ndarray, n: int, buffer: int, rng: np.random.Generator) -> Iterator[int]:
    """One DataLoader worker of ShardStream: its shards in order, a reservoir shuffle buffer."""
    buf: list[int] = []
    for s in shards:
        for i in range(int(s) * CHUNK_ROWS, min((int(s) + 1) * CHUNK_ROWS, n)):
            if len(buf) < buffer:
                buf.append(i)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], i = i, buf[j]
            yield i
    rng.shuffle(buf)
    yield from buf


def positive_batches(n: int, batch: int, workers: int, buffer: int, seed: int) -> Iterator[np.ndarray]:
    """Batches of B indices as the trainer sees them (endless: epoch after epoch): the
    workers' batches in turn, their short last batches joined into whole ones."""
    epoch = 0
    n_shards = -(-n // CHUNK_ROWS)
    while True:
        held: list[int] = []  # the short batches' indices, joined as oocid.data.stream does
        order = np.random.default_rng([seed, 4, epoch]).permutation(n_shards)
        streams = [
            _worker_stream(order[w::workers], n, buffer, np.random.default_rng([seed, 5, epoch, w]))
            for w in range(workers)
        ]
        live = list(range(workers))
        while live:  # DataLoader: batches round-robin from the workers
            for w in list(live):
                out = []
                for i in streams[w]:
                    out.append(i)
                    if len(out) == batch:
                        break
                if len(out) < batch:
                    live.remove(w)
                    held += out
                    if len(held) >= batch:
                        out, held = held[:batch], held[batch:]
                    else:
                        out = []
                if out:
                    yield np.asarray(out, dtype=np.int64)
        if held:
            yield np.asarray(held, dtype=np.int64)
        epoch += 1


# ---- banks on disk ----------------------------------------------------------------------------


def bank_path(workdir: Path, rows: int, dim: int, store: str) -> Path:
    return workdir / f"bank_{rows}x{dim}.{store}"


def ensure_bank(workdir: Path, rows: int, dim: int, store: str) -> Path:
    """Create the bank once; reuse it when it exists with the right shape."""
    from oocid.bank.create import _remove, create_store
    from oocid.bank.store import open_store

    path = bank_path(workdir, rows, dim, store)
    workdir.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            with open_store(path) as s:
                if (s.n_rows, s.dim, s.chunk_rows, s.meta.dtype) == (rows, dim, CHUNK_ROWS, "float32"):
                    return path
        except Exception as e:
            log(f"{path}: unusable ({e}); recreating")
        _remove(path)
        for ext in (".meta.json", ".journal", ".journal.tmp"):
            Path(str(path) + ext).unlink(missing_ok=True)
    gb = rows * dim * 4 / 1e9
    log(f"creating {path} ({rows} x {dim} float32, {gb:.2f} GB); this takes a while for big N")
    t = time.perf_counter()
    create_store(path, rows, dim, chunk_rows=CHUNK_ROWS, seed=0).close()
    log(f"created {path} in {time.perf_counter() - t:.1f} s")
    return path


# ---- one configuration (child process) --------------------------------------------------------


def _budget_and_pool(
    rows: int, fraction: float, workers: int, pool_chunks: int = 0, buffer: int = 2048,
    k: int = 4096
) -> tuple[int, int | None, str]:
    """(budget rows, pool chunks (as train.make_cache sizes it unless `pool_chunks`), "" or why
    n/a)."""
    budget = round(fraction * rows)
    if budget >= rows:
        return rows, None, ""
    slots = budget // CHUNK_ROWS
    n_chunks = -(-rows // CHUNK_ROWS)
    if slots >= n_chunks:
        return budget, None, ""
    if slots < 3:
        return budget, None, "n/a (budget below 3 chunks)"
    from oocid.bank.sizing import default_pool_chunks, positives_pool, window_target_rows

    pool = pool_chunks or default_pool_chunks(  # = make_cache
        budget, CHUNK_ROWS, positives_pool(budget, CHUNK_ROWS, workers, buffer),
        window_target_rows(k, rows))
    return budget, pool, ""


def run_child(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from oocid.bank.store import open_store
    from oocid.method.npid import momentum_update, random_unit_rows

    torch.set_num_threads(a.threads)
    kind = a.child
    path = bank_path(Path(a.workdir), a.rows, a.dim, a.store)
    store = open_store(path)
    n, b, k, d = a.rows, a.batch, a.k, a.dim
    spe = -(-n // b)  # steps per epoch, as StreamData.steps_per_epoch
    res: dict[str, Any] = {
        "kind": kind,
        "rows": n,
        "cache_fraction": a.cache_fraction,
        "store": a.store,
        "negatives": a.negatives,
        "steps": a.steps,
        "warmup": a.warmup,
        "batch": b,
        "k": k,
        "dim": d,
        "steps_per_epoch": spe,
    }
    budget, pool, na = _budget_and_pool(n, a.cache_fraction, a.workers, a.pool_chunks,
                                        a.shuffle_buffer, a.k)
    t0 = time.perf_counter()
    if kind == "memory":
        from oocid.bank.incore import InCoreBank

        bank: Any = InCoreBank(store, torch.device("cpu"))
    else:
        if na:
            res["na"] = na
            store.close()
            return res
        from oocid.bank.cache import ChunkCache

        bank = ChunkCache(store, budget, torch.device("cpu"), steps_per_epoch=spe, pool_chunks=pool)
        res.update(
            budget_rows=budget,
            pool_chunks=pool,
            slots=bank.n_slots,
            window_slots=bank.w,
            pool_slots=bank.n_slots - bank.w,
            full=bank.full,
        )
    res["init_s"] = time.perf_counter() - t0
    res["rss_after_init_mb"] = peak_rss_mb()

    feats = random_unit_rows(16 * b, d, torch.Generator().manual_seed(1)).view(16, b, d)
    gen = torch.Generator().manual_seed(2)
    batches = positive_batches(n, b, a.workers, a.shuffle_buffer, a.seed)
    shape = (b, k) if a.negatives == "per-sample" else (k,)
    parts = ("gather_pos", "sample", "gather_neg", "gather_pos2", "momentum", "update", "end_step")
    acc = dict.fromkeys(parts, 0.0)
    io0: tuple[int, int, int] = (0, 0, 0)
    stats0: dict[str, int] = {}
    total = 0.0
    clock = time.perf_counter
    for step in range(a.warmup + a.steps):
        if step == a.warmup:  # start of the timed steps: settle the background I/O first
            if kind == "cache" and bank.io is not None:
                bank.io.drain()
            io0 = (store.bytes_read, store.bytes_written, store.journal_bytes_written)
            stats0 = bank.stats() if kind == "cache" else {}
            acc = dict.fromkeys(parts, 0.0)
            total = 0.0
        idx = torch.from_numpy(next(batches))
        f = feats[step % 16][: len(idx)]
        t = [clock()]
        pos = bank.gather(idx)
        t.append(clock())
        neg = bank.sample(shape, gen)
        t.append(clock())
        w = bank.gather(neg)
        t.append(clock())
        old = bank.gather(idx)
        t.append(clock())
        new = momentum_update(old, f, 0.5)
        t.append(clock())
        bank.update(idx, new)
        t.append(clock())
        if kind == "cache":
            bank.end_step()
        t.append(clock())
        for name, x, y in zip(parts, t, t[1:], strict=False):
            acc[name] += y - x
        total += t[-1] - t[0]
        del pos, neg, w, old, new
        if (step + 1) % max(1, (a.warmup + a.steps) // 5) == 0:
            log(f"  {kind} N={n} F={a.cache_fraction}: step {step + 1}/{a.warmup + a.steps}")
    steps = a.steps
    res["bank_ms_per_step"] = 1e3 * total / steps
    res["breakdown_ms"] = {p: round(1e3 * v / steps, 3) for p, v in acc.items()}
    if kind == "cache" and not bank.full and a.io_steps != 0:
        # I/O phase: the timed steps cover too few chunk turnovers to extrapolate disk traffic
        # to an epoch, so carry on along the same positive stream with everything but the
        # per-sample negatives' gather (they are drawn from the resident window and never load
        # a chunk); its time is reported as io_phase_ms_per_step.
        io_steps = min(spe, a.io_steps) if a.io_steps >= 0 else spe
        t1 = clock()
        for step in range(io_steps):
            idx = torch.from_numpy(next(batches))
            f = feats[step % 16][: len(idx)]
            bank.gather(idx)
            if a.negatives == "shared":
                bank.gather(bank.sample(shape, gen))
            bank.update(idx, momentum_update(bank.gather(idx), f, 0.5))
            bank.end_step()
            if (step + 1) % max(1, io_steps // 4) == 0:
                log(f"  I/O phase N={n} F={a.cache_fraction}: step {step + 1}/{io_steps}")
        res["io_steps"] = io_steps
        res["io_phase_ms_per_step"] = 1e3 * (clock() - t1) / max(1, io_steps)
        steps += io_steps
    if kind == "cache":
        if bank.io is not None:  # count the write-backs / read-aheads the steps queued
            bank.io.drain()
        rd = store.bytes_read - io0[0]
        wr = store.bytes_written - io0[1]
        jr = store.journal_bytes_written - io0[2]
        bank_bytes = n * d * store.dtype.itemsize
        scale = spe / steps / bank_bytes
        st = bank.stats()
        res.update(
            read_per_epoch=rd * scale,
            written_per_epoch=(wr + jr) * scale,
            rows_written_per_epoch=wr * scale,
            journal_written_per_epoch=jr * scale,
            chunk_loads=st["chunk_loads"] - stats0.get("chunk_loads", 0),
            writebacks=st["writebacks"] - stats0.get("writebacks", 0),
        )
        if not a.no_flush:
            t1 = clock()
            bank.flush(a.warmup + a.steps)
            res["flush_ms"] = 1e3 * (clock() - t1)
            res["flush_bytes"] = (store.bytes_written - io0[1] - wr) + (
                store.journal_bytes_written - io0[2] - jr
            )
        bank.close()
    store.close()
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def spawn(a: argparse.Namespace, kind: str, rows: int, fraction: float, io_steps: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        kind,
        "--rows",
        str(rows),
        "--cache-fraction",
        repr(fraction),
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--io-steps",
        str(io_steps),
        "--batch",
        str(a.batch),
        "--k",
        str(a.k),
        "--dim",
        str(a.dim),
        "--negatives",
        a.negatives,
        "--store",
        a.store,
        "--workdir",
        a.workdir,
        "--workers",
        str(a.workers),
        "--shuffle-buffer",
        str(a.shuffle_buffer),
        "--seed",
        str(a.seed),
        "--threads",
        str(a.threads),
        "--pool-chunks",
        str(a.pool_chunks),
    ] + ([] if io_steps else ["--no-flush"])
    log(f"run {kind} N={rows}" + (f" F={fraction}" if kind == "cache" else ""))
    t = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        log(f"  {kind} N={rows} F={fraction} failed with exit code {p.returncode}")
        return {"kind": kind, "rows": rows, "cache_fraction": fraction, "error": f"exit code {p.returncode}"}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    log(
        f"  done in {time.perf_counter() - t:.1f} s: "
        + (
            out.get("na")
            or f"{out.get('bank_ms_per_step', float('nan')):.1f} ms/step, "
            f"peak RSS {out.get('peak_rss_mb', float('nan')):.0f} MB"
        )
    )
    return out


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's result over its rounds: the fastest round's timing and breakdown,
    the first round's I/O counts, the largest peak RSS; every round's ms/step in rounds_ms."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    fast = min(ok, key=lambda r: r["bank_ms_per_step"])
    out["bank_ms_per_step"], out["breakdown_ms"] = fast["bank_ms_per_step"], fast["breakdown_ms"]
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    out["rounds_ms"] = [round(r["bank_ms_per_step"], 1) for r in ok]
    return out


# ---- the table -------------------------------------------------------------------------------


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def report(results: list[dict[str, Any]], env: str) -> None:
    cols = (
        "rows",
        "cache %",
        "store",
        "negatives",
        "bank ms/step",
        "in-mem ms/step",
        "ratio",
        "read/epoch",
        "written/epoch",
        "flush ms",
        "RSS MB",
        "in-mem RSS MB",
    )
    lines = []
    for r in results:
        base = [f"{r['rows']:,}", f"{100 * r['cache_fraction']:g}", r["store"], r["negatives"]]
        if r.get("na") or r.get("error"):
            lines.append([*base, r.get("na") or r["error"]])
            continue
        lines.append(
            [
                *base,
                _f(r["bank_ms_per_step"], ".1f"),
                _f(r["memory_bank_ms_per_step"], ".1f"),
                _f(r["ratio"], ".2f"),
                _f(r.get("read_per_epoch"), ".2f") + "x",
                _f(r.get("written_per_epoch"), ".2f") + "x",
                _f(r.get("flush_ms"), ".0f"),
                _f(r["peak_rss_mb"], ".0f"),
                _f(r["memory_bank_peak_rss_mb"], ".0f"),
            ]
        )
    full = [x for x in lines if len(x) == len(cols)]
    widths = [
        max([len(c)] + [len(x[i]) for x in full] + [len(x[i]) for x in lines if len(x) < len(cols) and i < 4])
        for i, c in enumerate(cols)
    ]
    print(env)
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for x in lines:
        cells = [v.rjust(w) for v, w in zip(x, widths, strict=False)]
        if len(x) < len(cols):  # n/a or failed: the reason after the first four columns
            cells = [*cells[:4], x[4]]
        print("  ".join(cells))
    print("""
bank ms/step: wall time of one step's bank work on the main thread (gather positives, sample and
  gather K negatives, gather positives again, momentum update, update, end_step), mean over the
  timed steps after the warm-up; the cache's background I/O thread runs concurrently on the same
  cores. in-mem: the same ops on InCoreBank (one float32 (N, D) tensor), same positives.
  Each configuration ran --rounds times, interleaved with the in-memory reference, in
  separate subprocesses; the fastest round counts for both (all rounds: "rounds_ms").
ratio = bank ms/step / in-mem ms/step. Breakdown per op is in the JSON ("breakdown_ms").
read/written per epoch: store bytes (rows read; rows written + journal copy) during the timed
  steps plus an I/O phase of io_steps more steps along the same positive stream (min(epoch,
  --io-steps), all bank ops but the per-sample negatives' gather, which never loads), including
  the write-backs / read-aheads they queued (drained before counting), x steps_per_epoch /
  steps counted / bank bytes. Excludes the initial fill and the final flush.
  Reads are pread()s that likely hit the page cache (bank <= RAM), so they cost memcpy, not disk.
flush ms: one ChunkCache.flush(step) (checkpoint commit: dirty chunks + journal) after the run;
  not included in ms/step. RSS: peak ru_maxrss of the configuration's own subprocess.""")
    keep = (
        "rows",
        "cache_fraction",
        "bank_ms_per_step",
        "memory_bank_ms_per_step",
        "ratio",
        "peak_rss_mb",
        "memory_bank_peak_rss_mb",
        "store",
        "negatives",
        "steps",
        "read_per_epoch",
        "written_per_epoch",
        "rows_written_per_epoch",
        "journal_written_per_epoch",
        "flush_ms",
        "flush_bytes",
        "chunk_loads",
        "writebacks",
        "slots",
        "window_slots",
        "pool_slots",
        "init_s",
        "memory_bank_init_s",
        "breakdown_ms",
        "memory_bank_breakdown_ms",
        "io_steps",
        "io_phase_ms_per_step",
        "rounds_ms",
        "memory_bank_rounds_ms",
        "pool_chunks",
        "na",
        "error",
    )
    print(json.dumps([{k: r[k] for k in keep if k in r} for r in results]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--rows", type=int, action="append", help="bank rows N (repeatable; default 1e5, 1.28e6, 1e7)"
    )
    p.add_argument(
        "--cache-fraction",
        type=float,
        action="append",
        help="cache budget as a fraction of the bank (repeatable; default 1, .1, .01)",
    )
    p.add_argument("--steps", type=int, default=60, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps before the timed ones")
    p.add_argument(
        "--io-steps",
        type=int,
        default=5000,
        help="extra steps (no per-sample negatives) over which disk traffic is "
        "counted, at most one epoch; -1: one epoch",
    )
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--k", type=int, default=4096, help="negatives K")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--negatives", choices=("per-sample", "shared"), default="per-sample")
    p.add_argument("--store", choices=("npy", "zarr"), default="npy")
    p.add_argument("--workdir", default="/tmp/oocid-bench")
    p.add_argument("--workers", type=int, default=2, help="data workers the positives imitate")
    p.add_argument("--shuffle-buffer", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pool-chunks",
        type=int,
        default=0,
        help="cache pool chunks for positives; 0: as train.make_cache sizes it",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="timed runs of every configuration, interleaved; the fastest counts "
        "(the I/O phase runs in the first round only)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--child", choices=("cache", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--no-flush", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json-only", action="store_true", help="print only the JSON list (no table)")
    a = p.parse_args(argv)
    if a.child:
        a.rows, a.cache_fraction = a.rows[0], a.cache_fraction[0]
        print(json.dumps(run_child(a)))
        return 0
    import torch

    rows_list = a.rows or list(DEFAULT_ROWS)
    fracs = a.cache_fraction or list(DEFAULT_FRACTIONS)
    for f in fracs:
        if not 0 < f <= 1:
            p.error(f"--cache-fraction {f}: must be in (0, 1]")
    env = (
        f"env: torch {torch.__version__}, numpy {np.__version__}, python "
        f"{sys.version.split()[0]}, cpu_count {os.cpu_count()}, threads {a.threads}; "
        f"B {a.batch}, K {a.k}, D {a.dim}, {a.negatives} negatives, {a.store} store, "
        f"{a.workers} workers x {a.shuffle_buffer}-sample shuffle buffer, chunk/shard "
        f"{CHUNK_ROWS} rows, {a.steps} timed steps after {a.warmup} warm-up"
    )
    log(env)
    results: list[dict[str, Any]] = []
    for rows in rows_list:
        ensure_bank(Path(a.workdir), rows, a.dim, a.store)
        runs: dict[float | None, list[dict[str, Any]]] = {}  # None: the in-memory reference
        for rnd in range(a.rounds):
            log(f"N={rows}: round {rnd + 1}/{a.rounds}")
            runs.setdefault(None, []).append(spawn(a, "memory", rows, 1.0, 0))
            for f in fracs:
                if _budget_and_pool(rows, f, a.workers, a.pool_chunks, a.shuffle_buffer, a.k)[2]:
                    continue
                runs.setdefault(f, []).append(spawn(a, "cache", rows, f, a.io_steps if rnd == 0 else 0))
        mem = _best(runs[None])
        for f in fracs:
            na = _budget_and_pool(rows, f, a.workers, a.pool_chunks, a.shuffle_buffer, a.k)[2]
            r = {"kind": "cache", "rows": rows, "na": na} if na else _best(runs[f])
            r.update(store=a.store, negatives=a.negatives, steps=a.steps, cache_fraction=f)
            if "error" not in mem and not r.get("na") and "error" not in r:
                r["memory_bank_ms_per_step"] = mem["bank_ms_per_step"]
                r["ratio"] = r["bank_ms_per_step"] / mem["bank_ms_per_step"]
                r["memory_bank_peak_rss_mb"] = mem["peak_rss_mb"]
                r["memory_bank_init_s"] = mem["init_s"]
                r["memory_bank_breakdown_ms"] = mem["breakdown_ms"]
                r["memory_bank_rounds_ms"] = mem["rounds_ms"]
            elif "error" in mem and not r.get("na"):
                r.setdefault("error", "in-memory reference " + mem["error"])
            results.append(r)
    if a.json_only:
        keep = [{k: v for k, v in r.items() if k != "kind"} for r in results]
        print(json.dumps(keep))
    else:
        report(results, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
