"""The parts of the one-call GPU check (`tools/gpu_check.sh` runs each under its own timeout).

    python3 tools/gpu_check.py [--dry-run] [--out DIR] [--work DIR] PART
    python3 tools/gpu_check.py --dry-run all        # every part in this process, toy size, CPU

Parts: preflight, parity, cache, demo, fp16_shared, compile_nce, resume, bench, pipeline, and
`table` (the summary). Each part appends JSON lines {"part", "check", "status", ...} to
OUT/results.jsonl, status "pass", "fail" or "skip" (with a "reason": a part that only makes
sense on CUDA is skipped in a dry run, never silently); `table` prints them as a table, then
one JSON summary line, and exits 1 naming the parts that failed. `--dry-run` (or
GPU_CHECK_SMALL=1) runs everything at a toy size on the CPU, so the script cannot rot between
the rare sessions with a GPU (tests/tools/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # imported lazily: preflight reports a missing package itself
    from oocid.config import Precision

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
DEMO_TOP1 = 0.827  # docs/benchmarks.md, "The demo": learned features, 90 epochs on a CPU
DEMO_UNTRAINED_TOP1 = 0.678  # the same network untrained (same page)
KNN_SLACK = 0.03  # the demo on a GPU must land within this of the CPU number
# The short streamed runs (5 epochs) are not expected to pass the untrained network: on this
# data InfoNCE needs tens of epochs to pass it (tools/results/bench_accuracy_negatives_demo.txt: 0.64-0.66
# after 8 epochs against 0.678 untrained). They must stay above this floor, which a collapsed or
# broken run falls under (tools/results/bench_accuracy.txt: 0.12-0.48 for collapsed runs).
SHORT_RUN_FLOOR = 0.5


class Check:
    """One part's context: where results go, the size, the device; `record` writes a line."""

    def __init__(self, part: str, out: Path, work: Path, dry: bool) -> None:
        self.part, self.out, self.work, self.dry = part, out, work, dry
        self.device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
        self.cuda = self.device.type == "cuda"
        self.failed = False

    def record(self, check: str, status: str, *, part: str | None = None, **fields: Any) -> None:
        """One result line; `part` files it under another part (this part's status unchanged)."""
        rec = {"part": part or self.part, "check": check, "status": status, **fields}
        self.failed |= status == "fail" and part is None
        with open(self.out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")
        print(json.dumps(rec, default=str), flush=True)

    def expect(self, check: str, ok: bool, **fields: Any) -> None:
        self.record(check, "pass" if ok else "fail", **fields)

    def skip(self, check: str, reason: str) -> None:
        self.record(check, "skip", reason=reason)


# ---- preflight ------------------------------------------------------------------------------

def part_preflight(c: Check) -> None:
    """Imports, versions, the CUDA device, /dev/shm: a failure here stops the whole check."""
    versions: dict[str, str] = {}
    needed = ("oocid", "zarr", "numcodecs", "google_crc32c", "webdataset", "yaml", "tqdm", "PIL",
              "torchvision", "torch")
    for mod in needed:
        try:
            m = __import__(mod)
            versions[mod] = str(getattr(m, "__version__", "?"))
        except Exception as e:  # anything an import raises is the message to show
            c.record(f"import {mod}", "fail", error=f"{type(e).__name__}: {e}",
                     hint="carry the wheels in .whl/ (tools/gpu_check.sh's header)")
    c.expect("imports", len(versions) == len(needed), versions=versions, python=sys.version.split()[0])
    try:  # the CLI (typer) only serves the pipeline part's `oocid shard`: not a reason to stop
        import oocid.cli.app  # noqa: F401
        c.record("import oocid.cli.app (typer)", "pass", part="pipeline")
    except Exception as e:
        c.record("import oocid.cli.app (typer)", "fail", part="pipeline", error=f"{type(e).__name__}: {e}")
    shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    shm_gb = None if shm is None else round(shm.f_blocks * shm.f_frsize / 2**30, 2)
    c.expect("/dev/shm", shm_gb is not None and shm_gb >= 1.0, gib=shm_gb,
             why="DataLoader workers pass batches through shared memory")
    if c.dry:
        c.skip("CUDA device", "dry run: the CPU stands in for the GPU")
        return
    if not torch.cuda.is_available():
        c.record("CUDA device", "fail", error="torch.cuda.is_available() is False")
        return
    p = torch.cuda.get_device_properties(0)
    try:
        bf16: bool | None = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument
        bf16 = None
    c.expect("CUDA device", True, name=p.name, capability=f"{p.major}.{p.minor}",
             memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda, bf16=bf16)


# ---- parity of the custom autograd Functions -----------------------------------------------

def _parity_cases(dev: torch.device, g: torch.Generator) -> list[tuple[str, Callable[..., Any],
                                                                         tuple[Any, ...]]]:
    """(name, fn(x, *consts) -> Tensor, consts) for every custom autograd Function."""
    from oocid.method.fast import dense_scores_apply, gathered_scores, infonce_shared, negative_scores
    from oocid.method.kernels import scores_nt

    def unit(*shape: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    b, k, d, t = 32, 96, 128, 512
    assert dense_scores_apply(b, k, t) and not dense_scores_apply(b, k, 40 * k)
    table, small = unit(t, d), unit(t, d)
    pos = torch.randint(0, t, (b, k), generator=g)
    return [("_InfoNCEShared (infonce_shared)", lambda x, p, n: infonce_shared(x, p, n, 0.07),
             (unit(b, d), unit(k, d))),
            ("_GatheredScores (gathered_scores)", gathered_scores, (table, pos)),
            ("_DenseScores (negative_scores, small table)", negative_scores, (small, pos)),
            ("_ScoresNT (scores_nt)", scores_nt, (unit(k, d),))]


def _reference(name: str, x: torch.Tensor, consts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The float64 CPU forms of the same sums (the plain forms in oocid.method.npid)."""
    if name.startswith("_InfoNCEShared"):
        p, n = consts
        logits = torch.cat([(x * p).sum(1, keepdim=True), x @ n.t()], 1) / 0.07
        loss: torch.Tensor = (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
        return loss
    if name.startswith("_ScoresNT"):
        scores: torch.Tensor = x @ consts[0].t()
        return scores
    table, pos = consts
    return (table[pos] * x[:, None, :]).sum(-1)


def part_parity(c: Check) -> None:
    """Forward and gradient to x of each Function on the device, under each autocast, against
    float64 on the CPU. The Functions compute in float32 with autocast off inside, so given the
    same input values the forward must match to float32 rounding; the gradient reaching a
    low-precision input is rounded to that precision once."""
    modes: list[tuple[str, torch.dtype | None]] = [("fp32", None), ("bf16", torch.bfloat16)]
    if c.cuda:
        modes.append(("fp16", torch.float16))
    else:
        c.skip("fp16 autocast", "dry run on the CPU: fp16 autocast is checked on CUDA only")
    g = torch.Generator().manual_seed(0)
    for name, fn, consts in _parity_cases(c.device, g):
        x64 = torch.nn.functional.normalize(torch.randn(32, 128, generator=g, dtype=torch.float64), dim=1)
        for mode, dtype in modes:
            x = x64.float().to(c.device).requires_grad_(True)
            dev_consts = tuple(a.float().to(c.device) if a.is_floating_point() else a.to(c.device)
                               for a in consts)
            with torch.autocast(c.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                xin = x.to(dtype) if dtype is not None else x  # as an autocast layer hands it over
                out = fn(xin, *dev_consts)
            up = torch.randn(out.shape, generator=g, dtype=torch.float64)
            torch.autograd.backward((out * up.to(out.device, out.dtype)).sum())
            xr = xin.detach().double().cpu().requires_grad_(True)
            ref = _reference(name, xr, consts)
            torch.autograd.backward((ref * up).sum())
            ref = ref.detach()
            assert x.grad is not None and xr.grad is not None
            fwd = float((out.detach().double().cpu() - ref).abs().max() / ref.abs().max())
            grad_rel = float((x.grad.double().cpu() - xr.grad).abs().max() / xr.grad.abs().max())
            grad_tol = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 2e-3}[mode]
            ok = out.dtype == torch.float32 and fwd < 1e-4 and grad_rel < grad_tol
            c.expect(f"{name} {mode}", ok, out_dtype=str(out.dtype), fwd_rel_err=f"{fwd:.1e}",
                     grad_rel_err=f"{grad_rel:.1e}", tol=f"fwd 1e-4, grad {grad_tol:g}")


# ---- cache stress ---------------------------------------------------------------------------

def part_cache(c: Check) -> None:
    """ChunkCache with small chunks through thousands of gather / draw / update / end_step calls
    interleaved with large matmuls, then flush: the store must equal a host mirror exactly."""
    from oocid.bank.cache import ChunkCache
    from oocid.bank.create import create_store
    from oocid.method.npid import momentum_update

    n, r, slots, steps, mm = (4000, 50, 12, 300, 256) if c.dry else (200_000, 512, 40, 3000, 4096)
    shutil.rmtree(c.work / "stress.zarr", ignore_errors=True)
    store = create_store(c.work / "stress.zarr", n, 128, chunk_rows=r, seed=1)
    mirror = store.read_rows(0, n).copy()
    cache = ChunkCache(store, slots * r, c.device, steps_per_epoch=steps // 3, pool_chunks=4)
    rng = np.random.default_rng(0)
    g = torch.Generator(device=c.device).manual_seed(0)
    big = torch.randn(mm, mm, device=c.device)
    writes: list[tuple[np.ndarray, torch.Tensor]] = []
    mismatch = 0
    t0 = time.perf_counter()
    for s in range(steps):
        chunks = rng.choice(store.n_chunks, size=int(rng.integers(1, 4)), replace=False)
        rows = np.concatenate([np.arange(*store.chunk_range(int(ch))) for ch in chunks])
        idx_np = rng.choice(rows, size=min(len(rows), 64), replace=False)
        idx = torch.from_numpy(idx_np).to(c.device)
        old = cache.gather(idx)
        table, at = cache.draw((16, 32), g)
        neg = table[at]
        big = torch.tanh(big @ big) if s % 4 == 0 else big  # keep the device busy meanwhile
        feat = torch.randn(len(idx_np), 128, device=c.device) + neg.mean((0, 1))  # reads the draw
        new = momentum_update(old, torch.nn.functional.normalize(feat, dim=1), 0.5)
        cache.update(idx, new)
        writes.append((idx_np, new.clone()))
        if s % 100 == 0:  # an exact read-back of the rows written so far
            for i_np, rows_new in writes:
                mirror[i_np] = rows_new.cpu().numpy()
            writes.clear()
            mismatch += int(not np.array_equal(cache.gather(idx).cpu().numpy(), mirror[idx_np]))
        cache.end_step()
    for i_np, rows_new in writes:
        mirror[i_np] = rows_new.cpu().numpy()
    cache.flush(steps)
    cache.close()
    equal = bool(np.array_equal(store.read_rows(0, n), mirror))
    c.expect("flush equals the host mirror", equal and mismatch == 0 and bool(torch.isfinite(big).all()),
             steps=steps, rows=n, chunk_rows=r, read_back_mismatches=mismatch,
             seconds=round(time.perf_counter() - t0, 1), **cache.stats())
    store.close()


# ---- end to end on the demo data ------------------------------------------------------------

def demo_shards(c: Check) -> tuple[Path, Path]:
    """The demo data as train / val shards under WORK (a subset in a dry run), made once."""
    from oocid.data.writer import write_shards
    from oocid.demo import demo_data_path

    train, val = c.work / "shards" / "train", c.work / "shards" / "val"
    if not (val / "manifest.json").exists():
        src = demo_data_path()
        if c.dry:
            d = np.load(src)
            src = c.work / "subset.npz"
            np.savez(src, train_images=d["train_images"][:2000], train_labels=d["train_labels"][:2000],
                     test_images=d["test_images"][:500], test_labels=d["test_labels"][:500],
                     class_names=d["class_names"])
        write_shards(src, train, shard_size=250, seed=0, split="train", progress=False)
        write_shards(src, val, shard_size=1000, seed=0, split="test", progress=False)
    return train, val


def untrained_top1(c: Check) -> float:
    """The untrained network's kNN from the demo part if it ran, else the documented one."""
    try:
        for line in open(c.out / "results.jsonl"):
            rec = json.loads(line)
            if rec.get("untrained_top1") is not None:
                return float(rec["untrained_top1"])
    except OSError:
        pass
    return DEMO_UNTRAINED_TOP1


def check_metrics(c: Check, name: str, recs: list[dict[str, Any]], short: bool = True,
                  **extra: Any) -> None:
    """Finite losses, no skipped steps, bad samples or scaler skips; kNN above the untrained
    network (a full run) or above SHORT_RUN_FLOOR (a short one, the untrained number recorded)."""
    ok = bool(recs) and all(math.isfinite(r["loss"]) and r["skipped_steps"] == 0
                            and r["bad_samples"] == 0 and r.get("scaler_skips", 0) == 0 for r in recs)
    last = recs[-1] if recs else {}
    c.expect(f"{name}: finite, nothing skipped", ok, epochs=len(recs), loss=last.get("loss"),
             scaler_skips=sum(r.get("scaler_skips", 0) for r in recs), steps=last.get("step"),
             images_per_s=last.get("images_per_s"), **extra)
    top1, base = last.get("knn_top1"), untrained_top1(c)
    if c.dry:
        c.skip(f"{name}: kNN", f"dry run (1 epoch on a subset): kNN {top1}")
    elif short:
        c.expect(f"{name}: kNN above {SHORT_RUN_FLOOR} (short run)", top1 is not None
                 and top1 > SHORT_RUN_FLOOR, knn_top1=top1, untrained_top1=base)
    else:
        c.expect(f"{name}: kNN above untrained", top1 is not None and top1 > base, knn_top1=top1,
                 untrained_top1=base)


def streamed_cfg(c: Check, precision: Precision, epochs: int) -> Any:
    from oocid.config import demo_config

    cfg = demo_config()
    cfg.data.in_memory, cfg.data.workers, cfg.data.shuffle_buffer = "no", 2 if c.dry else 4, 256
    cfg.loss.kind, cfg.loss.nce_k = "infonce", 64 if c.dry else 4096
    cfg.optim.epochs = 1 if c.dry else epochs
    cfg.train.device, cfg.train.precision, cfg.train.eval_every = str(c.device), precision, 0
    rows = 2000 if c.dry else 10_000
    cfg.bank.cache_mb = 0.6 * rows * 512 / 2**20  # a partial cache: 60 % of the bank
    return cfg


def part_demo(c: Check) -> None:
    """The demo's recipe in memory: exact softmax, bf16 on CUDA; kNN near the CPU number."""
    from oocid.config import demo_config
    from oocid.demo import run_demo

    cfg = demo_config()
    cfg.train.device, cfg.train.precision = str(c.device), "bf16" if c.cuda else "32"
    if c.dry:
        train, val = demo_shards(c)
        from oocid.train.loop import train as run_train

        cfg.optim.epochs = 1
        fresh(c.work / "demo", c.work / "demo.zarr")
        run_train(cfg, train, c.work / "demo.zarr", c.work / "demo", val=val, progress=False)
        check_metrics(c, "softmax in memory", _metrics(c.work / "demo"), precision=cfg.train.precision)
        c.skip("demo kNN within 0.03 of the CPU", "dry run: the demo's 90 epochs run on CUDA only")
        return
    res = run_demo(c.work / "demo", progress=False, cfg=cfg)
    check_metrics(c, "softmax in memory", _metrics(c.work / "demo" / "run"), short=False,
                  precision="bf16")
    top1 = res["learned_top1"]
    c.expect("demo kNN within 0.03 of the CPU", abs(top1 - DEMO_TOP1) <= KNN_SLACK
             and top1 > res["untrained_top1"], learned_top1=top1, cpu_top1=DEMO_TOP1,
             untrained_top1=res["untrained_top1"], train_seconds=res["train_seconds"])


def fresh(*paths: Path) -> None:
    """Remove what an earlier run of the same part left (a part can be rerun alone)."""
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def part_fp16_shared(c: Check) -> None:
    """Streamed from shards through a partial cache, fp16 with a grad scaler, shared negatives."""
    from oocid.train.loop import train

    train_dir, val = demo_shards(c)
    if not c.cuda:
        c.skip("fp16 grad scaler", "dry run on the CPU: fp16 autocast is CUDA only; run in float32")
    cfg = streamed_cfg(c, "16" if c.cuda else "32", 5)
    cfg.loss.negatives = "shared"
    run = c.work / "fp16_shared"
    fresh(run, c.work / "fp16_shared.zarr")
    train(cfg, train_dir, c.work / "fp16_shared.zarr", run, val=val, progress=False)
    scaler = torch.load(run / "last.pt", map_location="cpu", weights_only=False).get("scaler")
    check_metrics(c, "fp16 shared, streamed", _metrics(run),
                  scale=None if scaler is None else scaler.get("scale"))


def part_compile_nce(c: Check) -> None:
    """bf16 + torch.compile, per-sample NCE with the moving-average Z, accumulate 2; the
    recompiles and graph breaks counted in this process."""
    from torch._dynamo.utils import counters

    from oocid.train.loop import train

    train_dir, val = demo_shards(c)
    cfg = streamed_cfg(c, "bf16" if c.cuda else "32", 5)
    cfg.loss.kind, cfg.loss.z, cfg.optim.accumulate, cfg.train.compile = "nce", "ema", 2, True
    counters.clear()
    run = c.work / "compile_nce"
    fresh(run, c.work / "compile_nce.zarr")
    compile_ = torch.compile
    if c.dry:  # dynamo traces as on the GPU (graph breaks count), without inductor's CPU codegen
        c.skip("inductor codegen", "dry run: backend aot_eager (inductor's C++ build takes a minute)")
        torch.compile = functools.partial(compile_, backend="aot_eager")
    try:
        train(cfg, train_dir, c.work / "compile_nce.zarr", run, val=val, progress=False)
    finally:
        torch.compile = compile_
    breaks = {k: int(v) for k, v in counters["graph_break"].items()}
    frames = {k: int(v) for k, v in counters["frames"].items()}
    stats = {k: int(v) for k, v in counters["stats"].items()}
    check_metrics(c, "bf16 compile nce ema acc2", _metrics(run))
    graphs = stats.get("unique_graphs", 0)
    # counted, not asserted away: a break costs speed, not correctness; a storm of recompiles
    # (a graph per batch shape or per step) fails the part
    c.expect("compile: graph breaks and recompiles", graphs <= 8, graph_breaks=breaks,
             graph_break_count=sum(breaks.values()), frames=frames, unique_graphs=graphs)


def part_resume(c: Check) -> None:
    """Stop after a few steps with a checkpoint, then --resume to the end."""
    from oocid.train.loop import train

    train_dir, val = demo_shards(c)
    cfg = streamed_cfg(c, "16" if c.cuda else "32", 2)
    run, bank = c.work / "resume", c.work / "resume.zarr"
    fresh(run, bank)
    first = train(cfg, train_dir, bank, run, val=val, progress=False, max_steps=5)
    scaler = torch.load(run / "last.pt", map_location="cpu", weights_only=False).get("scaler")
    done = train(cfg, train_dir, bank, run, val=val, progress=False, resume=True)
    recs = _metrics(run)
    c.expect("resume: every epoch once", [r["epoch"] for r in recs] == list(range(1, cfg.optim.epochs + 1))
             and first.step == 5, stopped_at=first.step, final_step=done.step,
             scale_at_stop=None if scaler is None else scaler.get("scale"))
    check_metrics(c, "resume", recs)


# ---- ResNet-50 benchmark and the shard pipeline ----------------------------------------------

def _bench_train(argv: list[str]) -> list[dict[str, Any]]:
    """tools/bench_train.py in this process; its JSON last line, its report kept in OUT."""
    sys.path.insert(0, str(TOOLS))
    import bench_train

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        bench_train.main(argv)
    text = buf.getvalue()
    print(text, flush=True)
    rows: list[dict[str, Any]] = json.loads(text.strip().splitlines()[-1])
    return rows


def part_bench(c: Check) -> None:
    """ResNet-50 at 224 px bf16, B 256, K 4096, N 1.28 M: the model alone and the NPID step on the
    full bank (InfoNCE per-sample and shared, NCE with EMA Z, exact softmax) and through a 10 %
    cache whose window holds many times K rows (pool 12 chunks: window 19, 77,824 rows)."""
    work = str(c.work / "bench")
    if c.dry:
        c.skip("resnet50 224 px", "dry run: ResNet-50 at 224 px runs on CUDA only; small net, toy N")
        base = ["--model", "small", "--rows", "40960", "--batch", "32", "--k", "64", "--steps", "2",
                "--warmup", "1", "--rounds", "1", "--no-pipeline", "--no-profile", "--device", "cpu",
                "--workdir", work]
    else:
        base = ["--model", "resnet50", "--steps", "20", "--warmup", "5", "--rounds", "2",
                "--no-pipeline", "--no-profile", "--workdir", work]
    runs = [("full bank, infonce", ["--cache-fraction", "1", "--loss", "infonce"]),
            ("full bank, nce ema", ["--cache-fraction", "1", "--loss", "nce", "--negatives", "per-sample"]),
            ("full bank, softmax", ["--cache-fraction", "1", "--loss", "softmax", "--negatives", "shared"]),
            ("10% cache, infonce", ["--cache-fraction", "0.3" if c.dry else "0.1",
                                    "--pool-chunks", "1" if c.dry else "12",
                                    "--loss", "infonce"])]
    for name, extra in runs:
        if c.cuda:
            torch.cuda.reset_peak_memory_stats()
        rows = _bench_train(base + extra)
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if c.cuda else None
        for r in rows:
            c.expect(f"{name} {r['negatives']}", r["npid_images_per_s"] > 0, model=r["model"],
                     npid_images_per_s=r["npid_images_per_s"], model_images_per_s=r["model_images_per_s"],
                     ratio=r["ratio"], window_chunks=r["window_chunks"], pool_chunks=r["pool_chunks"],
                     cache_rows=r["cache_rows"], peak_gib=peak)
    if c.cuda:
        _profile_step(c)
    else:
        c.skip("profiled steps (syncs, launches)", "dry run: CUDA runtime calls are counted on CUDA only")


def _profile_step(c: Check) -> None:
    """Host syncs and kernel launches of one NPID step (per-sample, 10 % cache), InfoNCE and NCE
    with the moving-average Z: NCE's Z stays on the device, so it may add launches, not syncs."""
    sys.path.insert(0, str(TOOLS))
    import bench_train
    from torch.profiler import ProfilerActivity, profile

    from oocid.bank.store import open_store

    total: dict[str, int] = {}
    for loss in ("infonce", "nce"):
        a = bench_train.parse_args(["--model", "resnet50", "--cache-fraction", "0.1", "--pool-chunks", "12",
                                    "--workdir", str(c.work / "bench"), "--workers", "8", "--loss", loss])
        store = open_store(bench_train.ensure_bank(Path(a.workdir), a.rows))
        g = torch.Generator().manual_seed(1)
        images = [torch.randn(a.batch, 3, 224, 224, generator=g).to(c.device)]
        idx = [torch.from_numpy(x).to(c.device)
               for x in bench_train.stream_index_batches(a.rows, a.batch, 8, 6)]
        runner = bench_train.NPIDRunner(a, "resnet50", "per-sample", 224, store, images, idx,
                                        c.device, "bf16")
        runner.run(5, count=False)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            runner.run(1, count=False)
        runner.close()
        store.close()
        calls = {e.key: e.count for e in prof.key_averages()}
        syncs = {k: v for k, v in calls.items() if "Synchronize" in k or k in (
            "cudaMemcpy", "aten::item", "aten::_local_scalar_dense")}
        launches = sum(v for k, v in calls.items() if "LaunchKernel" in k)
        total[loss] = sum(syncs.values())
        ok = loss == "infonce" or total[loss] <= total["infonce"]
        c.expect(f"profiled step {loss} (syncs, launches)", ok, syncs=syncs, kernel_launches=launches)


def part_pipeline(c: Check) -> None:
    """The shard pipeline (tools/bench_pipeline.py) at 8 and 16 workers against the model."""
    model_ips = None
    try:
        for line in open(c.out / "results.jsonl"):
            rec = json.loads(line)
            if rec["part"] == "bench" and rec.get("model_images_per_s"):
                model_ips = rec["model_images_per_s"]
    except OSError:
        pass
    args = ["--images", "32", "--batch", "16", "--passes", "1", "--profile", "2"] if c.dry \
        else ["--images", "2000", "--passes", "1", "--profile", "20"]
    fresh(c.work / "pipe")  # bench_pipeline reuses a shard set made for another --images
    for w in ((1, 2) if c.dry else (8, 16)):
        p = subprocess.run([sys.executable, str(TOOLS / "bench_pipeline.py"), "--workdir",
                            str(c.work / "pipe"), "--workers", str(w), *args],
                           capture_output=True, text=True, cwd=ROOT)
        (c.out / f"bench_pipeline_{w}.txt").write_text(p.stdout + p.stderr)
        if p.returncode != 0:
            c.record(f"{w} workers", "fail", error=p.stderr[-2000:])
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        keeps = None if model_ips is None else r["oocid_images_per_s"] >= model_ips
        c.expect(f"{w} workers", True, oocid_images_per_s=r["oocid_images_per_s"],
                 torchvision_images_per_s=r["torchvision_images_per_s"], model_images_per_s=model_ips,
                 keeps_up=keeps)


# ---- the table ------------------------------------------------------------------------------

def table(out: Path) -> int:
    """Print results.jsonl as a table and a JSON summary last; 1 if any part failed."""
    path = out / "results.jsonl"
    recs = [json.loads(line) for line in open(path)] if path.exists() else []
    print(f"\n{'part':<12} {'check':<46} {'status':<6} details")
    print("-" * 110)
    for r in recs:
        details = {k: v for k, v in r.items() if k not in ("part", "check", "status")}
        text = json.dumps(details, default=str)
        print(f"{r['part']:<12} {r['check'][:46]:<46} {r['status']:<6} {text[:200]}")
    failed = sorted({r["part"] for r in recs if r["status"] == "fail"})
    summary = {"passed": sum(r["status"] == "pass" for r in recs),
               "failed": sum(r["status"] == "fail" for r in recs),
               "skipped": sum(r["status"] == "skip" for r in recs), "failed_parts": failed,
               "parts": sorted({r["part"] for r in recs})}
    if failed:
        print(f"== FAILED parts: {' '.join(failed)}")
    print(json.dumps(summary))
    return 1 if failed or not recs else 0


PARTS: dict[str, Callable[[Check], None]] = {
    "preflight": part_preflight, "parity": part_parity, "cache": part_cache, "demo": part_demo,
    "fp16_shared": part_fp16_shared, "compile_nce": part_compile_nce, "resume": part_resume,
    "bench": part_bench, "pipeline": part_pipeline}


def run_part(name: str, out: Path, work: Path, dry: bool) -> int:
    """One part; an exception is recorded as the part's failure (the next part still runs)."""
    c = Check(name, out, work, dry)
    t0 = time.perf_counter()
    try:
        PARTS[name](c)
    except Exception as e:  # the record names what broke; the traceback goes to the log
        traceback.print_exc()
        c.record("ran to the end", "fail", error=f"{type(e).__name__}: {e}"[:1000])
    c.record("time", "pass" if not c.failed else "fail", seconds=round(time.perf_counter() - t0, 1))
    return 1 if c.failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=[*PARTS, "all", "table"])
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_SMALL") == "1",
                   help="toy size on the CPU (also GPU_CHECK_SMALL=1)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/oocid-gpu-check")))
    p.add_argument("--work", type=Path, default=Path(os.environ.get("WORK", "/tmp/oocid-gpu-work")))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.dry_run:
        torch.set_num_threads(1)
    if a.part == "table":
        return table(a.out)
    if a.part == "all":
        for name in PARTS:
            if run_part(name, a.out, a.work, a.dry_run) and name == "preflight":
                break
        return table(a.out)
    return run_part(a.part, a.out, a.work, a.dry_run)


if __name__ == "__main__":
    raise SystemExit(main())
